"""Recovering from lost workers: who is lost, where the spans go now, and what it cost.

A session that meets :class:`~bloombee_nb.errors.StageUnavailableError` asks its model for a chain
of live workers (``Deployment.replacement_chain``) and replays its history there
(``InferenceSession``). This module holds the pure parts:

- :func:`find_lost`: which workers of the failed chain are lost, and why — gone from the scheduler,
  leaving (``bloombee-nb worker`` got SIGTERM), or silent (no answer to a ping: hung);
  :func:`settled_workers` first gives the scheduler a moment to drop a worker whose connection just
  closed, so a killed worker reads as gone, not unreachable;
- :func:`replacement_placement`: the new spans. With a profile, the planner re-solves with the lost
  workers excluded (a worker that came back under the same name at a new address is used at its
  new address); otherwise each lost stage moves, span unchanged, to a live worker that hosts no
  stage of the model (a spare or a replacement that joined), or — when there are not enough —
  the layers are split evenly over the live workers;
- :class:`RecoveryEvent`: what the status and generation panels show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..cluster.placement import Placement, place
from ..cluster.planning import runtime_plan
from ..errors import NotEnoughWorkersError, RecoveryError, StageHungError, StageLeavingError
from ..plan import ClusterProfile, Workload
from ..plan.errors import InfeasiblePlanError

# why a worker is lost: gone from the scheduler, silent, failed a call (connection refused/closed), leaving
GONE, HUNG, UNREACHABLE, LEAVING = "gone", "not answering", "unreachable", "leaving"
# how long a recovery waits for the scheduler to drop a worker whose connection closed (a killed
# worker's is dropped within milliseconds; a worker still listed after this is labelled unreachable)
SETTLE_S = 0.5


@dataclass(frozen=True)
class LostWorker:
    address: str
    name: str
    why: str  # GONE | HUNG | UNREACHABLE | LEAVING

    def __str__(self):
        return f"{self.name} ({self.why})"


@dataclass(frozen=True)
class RecoveryEvent:
    """One session moved to live workers: what was lost, where the spans went, what it cost."""

    at: float                                  # wall clock (time.time()) when the failure was caught
    session_id: str
    lost: tuple[LostWorker, ...]               # empty: nothing found lost (e.g. a timeout); same workers, new stages
    old_spans: tuple[tuple[str, int, int], ...]  # (worker name, first layer, end layer) before
    new_spans: tuple[tuple[str, int, int], ...]  # the same after
    detect_s: float       # the failing call's wait: sent → error (watchdog, timeout or closed connection)
    rebuild_s: float      # find the lost workers, place and load the spans on live ones (0: reused)
    replay_s: float       # re-send the session's history: rebuild its KV cache on the new stages
    replayed_steps: int   # calls replayed (steps, kept paths, rollbacks)
    reused: bool          # another session had already re-placed the spans
    error: str            # the failure that started it
    replayed_on: int = 0  # stages that re-ran the history: the new ones alone when the rest held it (a splice)

    @property
    def recover_s(self) -> float:
        """From the error to the session ready again (the failed call is then retried)."""
        return self.rebuild_s + self.replay_s

    @property
    def pause_s(self) -> float:
        """What the generation stood still for: detection plus recovery."""
        return self.detect_s + self.recover_s

    def describe(self) -> str:
        lost = ", ".join(map(str, self.lost)) or "no worker (a call failed)"
        new = ", ".join(f"{w} {a}–{b - 1}" for w, a, b in self.new_spans)
        how = "joined the spans re-placed by another session" if self.reused else f"re-placed layers on {new}"
        return (f"lost {lost}: paused {self.pause_s:.1f} s (noticed after {self.detect_s:.1f} s), {how}, "
                f"recovered in {self.recover_s:.1f} s ({self.replayed_steps} calls replayed on "
                f"{self.replayed_on} stage{'s' if self.replayed_on != 1 else ''})")


def spans_of(placement: Placement, names: dict[str, str]) -> tuple[tuple[str, int, int], ...]:
    return tuple((names.get(s.worker, s.worker), s.start, s.end) for s in placement.stages)


def find_lost(chain, exc: BaseException, workers: dict[str, dict], names: dict[str, str]) -> dict[str, LostWorker]:
    """address -> LostWorker for the workers of ``chain`` that cannot serve it any more.

    ``workers``: the scheduler's view now (``BloombeeCluster.workers()``). The workers the error
    names failed a call (a closed connection, a timeout, a silent ping): they are lost without
    another try. Every other worker of the chain still listed is pinged through its stage (answered
    on its event loop, so a busy stage still answers); no answer within the chain's
    ``ping_timeout_s`` counts as hung.
    """
    lost = {}
    for address in dict.fromkeys(chain.placement.workers):
        info = workers.get(address)
        if info is None:
            lost[address] = LostWorker(address, names.get(address, address), GONE)
        elif info.get("status", "running") != "running":
            lost[address] = LostWorker(address, names.get(address, address), LEAVING)
    why = LEAVING if isinstance(exc, StageLeavingError) else HUNG if isinstance(exc, StageHungError) else UNREACHABLE
    lost.update({a: LostWorker(a, names.get(a, a), why) for a in getattr(exc, "workers", ())
                 if a not in lost and a in chain.placement.workers})  # it failed a call: not pinged again
    if not chain.released:
        for address, answer in chain.ping(skip=lost).items():
            if answer is None:
                lost[address] = LostWorker(address, names.get(address, address), HUNG)
            elif answer.get("leaving"):
                lost[address] = LostWorker(address, names.get(address, address), LEAVING)
    return lost


def settled_workers(cluster, exc: BaseException, workers: dict[str, dict], *, timeout_s: float = SETTLE_S,
                    poll_s: float = 0.05) -> dict[str, dict]:
    """The scheduler's view once it has caught up with the workers ``exc`` names as unreachable.

    A killed worker's connection to us can close before its connection to the scheduler does; the
    scheduler then still lists it for a moment, and it would be labelled unreachable, not gone.
    Re-asks the scheduler (``cluster.workers()``) until none of them is listed or ``timeout_s``
    passes: a worker still listed then really is unreachable from here.
    """
    if isinstance(exc, (StageLeavingError, StageHungError)):
        return workers
    named = set(getattr(exc, "workers", ()))
    deadline = time.monotonic() + timeout_s
    while named & set(workers) and time.monotonic() < deadline:
        time.sleep(poll_s)
        workers = cluster.workers()
    return workers


def live_workers(workers: dict[str, dict], lost) -> list[str]:
    """Addresses that can take spans: running (not leaving) and not lost."""
    return [a for a, w in workers.items() if w.get("status", "running") == "running" and a not in lost]


def replacement_placement(old: Placement, lost, live: list[str], n_layers: int, *,
                          profile: ClusterProfile | None = None, workload: Workload | None = None,
                          relay: str = "chain", names: dict[str, str] | None = None, formats=(None,)):
    """``(placement, plan or None)`` for the model's layers on ``live`` workers (see the module doc)."""
    names = names or {}
    if not live:
        raise RecoveryError(f"no live worker is left to host the model's {n_layers} layers (lost "
                            f"{', '.join(map(str, lost.values())) or 'all'}); start workers with `bloombee-nb worker "
                            "<scheduler>`: the next step of the session recovers and continues exactly")
    if not lost and all(w in live for w in old.workers):
        return old, None  # nobody lost (a call timed out): the same workers, fresh stages
    if profile is not None:
        try:
            return planned(profile, workload or Workload(), live, n_layers, relay, names, formats)
        except InfeasiblePlanError as exc:
            if not [a for a in live if names.get(a, a) not in {w.name for w in profile.workers}]:
                raise RecoveryError(f"the live workers cannot host the model after losing "
                                    f"{', '.join(map(str, lost.values()))}: {exc}") from None
            # workers the profile never measured joined: try them the way an unplanned model would
    return unplanned(old, live, n_layers), None


def planned(profile: ClusterProfile, workload: Workload, live: list[str], n_layers: int, relay: str,
            names: dict[str, str], formats=(None,)):
    """Re-solve the plan over the profiled workers that are live (at their current addresses)."""
    by_name = {names.get(a, a): a for a in live}
    for w in profile.workers:
        if w.name in by_name:
            profile = profile.with_worker(w.name, address=by_name[w.name])
        else:
            profile = profile.with_worker(w.name, include=False)
    plan = runtime_plan(profile, workload, relay=relay, formats=formats)
    return place(plan.workers, n_layers, plan.layer_spans), plan


def unplanned(old: Placement, live: list[str], n_layers: int) -> Placement:
    """Lost stages move (spans unchanged) to live workers outside the chain; too few: even split."""
    spare = [a for a in live if a not in old.workers]
    missing = [i for i, s in enumerate(old.stages) if s.worker not in live]
    if len(spare) >= len(missing):
        workers = [s.worker for s in old.stages]
        for i, a in zip(missing, spare):
            workers[i] = a
        return place(workers, n_layers, old.spans)
    survivors = list(dict.fromkeys(s.worker for s in old.stages if s.worker in live))
    candidates = survivors + spare
    try:
        return place(candidates[:len(old.stages)], n_layers)
    except NotEnoughWorkersError as exc:  # cannot happen with live non-empty; kept typed
        raise RecoveryError(str(exc)) from None


def recovery_error(lost, placement: Placement, cause: BaseException) -> RecoveryError:
    """The spans could not be loaded on the live workers chosen for them."""
    where = ", ".join(f"{s.worker} (layers {s.start}–{s.end - 1})" for s in placement.stages)
    return RecoveryError(
        f"after losing {', '.join(map(str, lost.values())) or 'a stage'}, loading the model on {where} failed: "
        f"{type(cause).__name__}: {cause}. Check that those workers can read the checkpoint and have the memory, "
        "or start more workers (`bloombee-nb worker <scheduler>`); the session keeps its history and recovers on "
        "its next step")

