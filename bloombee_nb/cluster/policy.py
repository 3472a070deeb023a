"""Which models a worker may host: its owner's choice (``bloombee-nb worker … --host/--allow``).

The allow-list is a Dask worker plugin on that worker; every stage checks it before it loads a
span, whoever asked (a swarm's ``host`` or a private ``from_pretrained``). A worker without one
hosts whatever its cluster's members place there (members are trusted: see the README on TLS).
"""

from __future__ import annotations

from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import SwarmError

POLICY = "bloombee-host-policy"  # the worker plugin's name


def model_key(name_or_path: str | Path) -> str:
    """How the swarm names a model: a local checkpoint by its resolved path, anything else as given
    (a Hub id). Workers and clients must name a model the same way to meet in the registry."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else str(name_or_path)


class HostPolicy(WorkerPlugin):
    """The models a worker's owner allows it to host."""

    name = POLICY

    def __init__(self, allowed: list[str]):
        self.allowed = tuple(model_key(m) for m in allowed)

    def check(self, model: str, address: str) -> None:
        if model_key(model) not in self.allowed:
            raise SwarmError(f"the worker {address} hosts only {', '.join(self.allowed)} (its owner's --host/--allow "
                             f"list), not {model}; host it on another worker, or ask the worker's owner to allow it")


def check_allowed(model: str) -> None:
    """Inside a worker, before a stage loads: refuse a model the worker's owner did not allow."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:
        return  # not in a worker (a stage built directly, in tests of the class itself)
    policy = worker.plugins.get(POLICY)
    if policy is not None:
        policy.check(model, worker.address)
