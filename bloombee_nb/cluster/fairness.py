"""A fair share of a stage for every client: start-time fair queueing over the clients' steps.

A swarm stage serves many clients. Arrival order alone lets one client's flood of sessions (or
long prompts) take every forward while another client's single session waits behind it. Each
client (a session's ``owner``) carries a virtual time, the work the stage has done for it, in
rows × new positions; the stage takes the ready steps of the client with the least virtual time
first (arrival order within a client and between equals). A client that was idle, or is new,
starts at the stage's current virtual time (the start tag of the step last served), so it gets
its share from now on and cannot bank credit while away.

One client alone sees exactly the old order: all its steps share one virtual time.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

J = TypeVar("J")


class FairShare:
    def __init__(self):
        self.vtime: dict[str, float] = {}   # client -> work served (rows × positions)
        self.now = 0.0                      # start tag of the step served last

    def order(self, jobs: Sequence[J], owner_of: Callable[[J], str]) -> list[J]:
        """``jobs`` with the least-served client's first (a stable sort: arrival order otherwise)."""
        active = {owner_of(j) for j in jobs}
        self.vtime = {o: t for o, t in self.vtime.items() if o in active or t > self.now}  # forget the idle
        for o in active:
            self.vtime[o] = max(self.vtime.get(o, self.now), self.now)
        return sorted(jobs, key=lambda j: self.vtime[owner_of(j)])

    def charge(self, owner: str, work: float) -> None:
        """The stage ran ``work`` (rows × positions) for ``owner``."""
        start = self.vtime.get(owner, self.now)
        self.now = max(self.now, start)
        self.vtime[owner] = start + work
