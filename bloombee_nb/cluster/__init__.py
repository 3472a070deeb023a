"""Dask is the distributed engine: the scheduler knows who is alive, actors host the stages."""

from .connect import BloombeeCluster, connect
from .placement import Placement, StageSpec, even_spans, place
from .stage import StageActor

__all__ = ["BloombeeCluster", "Placement", "StageActor", "StageSpec", "connect", "even_spans", "place"]
