"""Dask is the distributed engine: the scheduler knows who is alive, actors host the stages.

``StageActor`` (torch) is imported on first use, so ``bb.connect()`` can start the workers'
forkserver (``connect.preload_forkserver``) before this process has imported torch.
"""

from .connect import BloombeeCluster, connect
from .placement import Placement, StageSpec, even_spans, place

__all__ = ["BloombeeCluster", "Placement", "StageActor", "StageSpec", "connect", "even_spans", "place"]


def __getattr__(name):
    if name == "StageActor":
        from .stage import StageActor

        return StageActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
