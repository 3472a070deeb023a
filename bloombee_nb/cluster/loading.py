"""Starting a chain's stage actors on their workers and waiting, with typed errors, for them to load.

Set-up calls (loading a span, installing a codec) are waited for from the client's thread; a
stage that cannot be reached becomes a :class:`~bloombee_nb.errors.StageUnavailableError` (or
``StageHungError`` on a timeout) naming its worker.
"""

from __future__ import annotations

import asyncio

from distributed import Client, wait

from ..errors import BloombeeError, StageHungError, StageLeavingError, StageUnavailableError
from .placement import Placement, StageSpec
from .stage import StageActor


def submit_stages(client: Client, placement: Placement, path: str, per_stage: list[dict] | None = None,
                  **stage_kwargs) -> list:
    """One StageActor future per stage, each pinned to its worker, all loading in parallel;
    ``stage_kwargs`` go to every stage, ``per_stage[i]`` to stage i on top of them."""
    per_stage = per_stage or [{}] * len(placement.stages)
    if len(per_stage) != len(placement.stages):
        raise ValueError(f"per_stage has {len(per_stage)} entries for {len(placement.stages)} stages")
    return [client.submit(StageActor, path, st.start, st.end, actor=True, pure=False,
                          workers=[st.worker], allow_other_workers=False, **{**stage_kwargs, **own})
            for st, own in zip(placement.stages, per_stage)]


def gather_actors(client: Client, futures: list, stages: tuple[StageSpec, ...], poll_s: float = 1.0) -> list:
    """The actor handles of ``futures`` once every stage has loaded its span.

    Loading may take long (a real span is gigabytes), so there is no overall timeout; instead a
    stage whose worker leaves the cluster or stops taking work (``closing_gracefully``: it is
    leaving) while loading fails the whole chain at once, naming it — Dask itself would wait forever
    for a task pinned to a worker that is gone.
    """
    while True:
        try:
            wait(futures, timeout=poll_s)
            return client.gather(futures)
        except TimeoutError:
            pass
        workers = client.sync(client.scheduler.identity, n_workers=-1)["workers"]
        for fut, st in zip(futures, stages):
            state = workers.get(st.worker, {}).get("status")
            if not fut.done() and state != "running":
                for f in futures:
                    f.cancel()
                error = StageLeavingError if state == "closing_gracefully" else StageUnavailableError
                raise error(f"{st.worker} cannot load layers {st.start}–{st.end - 1}: "
                            f"{'it is leaving' if state else 'it left the cluster'}", workers=(st.worker,))


def settle(stage: StageSpec, actor, method: str, *args, timeout_s: float):
    """A set-up call on one stage, waited for; a stage that cannot be reached raises typed."""
    try:
        return getattr(actor, method)(*args).result(timeout=timeout_s)
    except BloombeeError:
        raise
    except (OSError, TimeoutError, KeyError, RuntimeError) as exc:
        raise unavailable(stage, exc) from exc


def unavailable_message(stage: StageSpec) -> str:
    return (f"the worker {stage.worker} hosting layers {stage.start}–{stage.end - 1} did not answer. It is gone or "
            "overloaded: check the cluster (bb.connect(...).workers()) and load the model again so its spans are "
            "placed on live workers.")


def unavailable(stage: StageSpec, exc: BaseException) -> StageUnavailableError:
    """``exc`` (a failed call to ``stage``) as the typed error naming its worker: hung on a timeout."""
    error = StageHungError if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else StageUnavailableError
    return error(f"{unavailable_message(stage)} [{type(exc).__name__}: {exc}]", workers=(stage.worker,))


def release_now(futures, handles=()) -> None:
    """Release ``futures`` and the Futures Dask bound to actor ``handles`` when they were first
    called, now rather than when (or if) the garbage collector gets to them: until then this
    client still wants the keys, and the actors stay alive."""
    for f in [*futures, *(getattr(a, "_future", None) for a in handles)]:
        if f is not None:
            f.release()
