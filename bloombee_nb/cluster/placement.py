"""Which worker hosts which span. The planner (plan/) will choose this; until then, even spans."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NotEnoughWorkersError, SpanError


@dataclass(frozen=True)
class StageSpec:
    worker: str  # Dask worker address
    start: int   # first layer (inclusive)
    end: int     # last layer (exclusive)

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Placement:
    """The ordered chain of stages; spans are contiguous and cover every layer exactly once."""

    stages: tuple[StageSpec, ...]

    def __post_init__(self):
        expect = 0
        for s in self.stages:
            if s.start != expect or s.end <= s.start:
                raise SpanError(f"spans must be contiguous and non-empty from layer 0; got {self.spans}")
            expect = s.end

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.stages]

    @property
    def workers(self) -> list[str]:
        return [s.worker for s in self.stages]

    @property
    def n_layers(self) -> int:
        return self.stages[-1].end if self.stages else 0


def even_spans(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Split ``n_layers`` into ``n_stages`` contiguous spans whose sizes differ by at most one."""
    n_stages = max(1, min(n_stages, n_layers))
    q, r = divmod(n_layers, n_stages)
    bounds = [0]
    for i in range(n_stages):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def place(workers: list[str], n_layers: int, spans: list[tuple[int, int]] | None = None) -> Placement:
    """Assign spans to workers in order. ``spans=None`` splits the layers evenly over all workers."""
    if not workers:
        raise NotEnoughWorkersError("the cluster has no workers; start some with `bloombee-nb worker <scheduler>`")
    spans = spans or even_spans(n_layers, len(workers))
    if len(spans) > len(workers):
        raise NotEnoughWorkersError(f"{len(spans)} spans need {len(spans)} workers, the cluster has {len(workers)}")
    placement = Placement(tuple(StageSpec(w, a, b) for w, (a, b) in zip(workers, spans)))
    if placement.n_layers != n_layers:
        raise SpanError(f"spans {spans} cover layers [0, {placement.n_layers}) but the model has {n_layers} layers")
    return placement
