"""The planner: profiles, a cost model and a dynamic program choosing who hosts which layers.

Pure Python + numpy (no torch, no dask), so it runs anywhere — a notebook widget can re-solve it
on every slider move::

    from bloombee_nb.plan import ClusterProfile, Workload, solve
    plan = solve(ClusterProfile.load("lab.json"), Workload(batch=4, objective="throughput"))
    plan.spans   # [(worker_address, start, end), …]
"""

from .baselines import even_split, petals_greedy
from .dp import DEFAULT_MICRO_BATCHES, DEFAULT_OFFLOADS, solve
from .errors import InfeasiblePlanError, ProfileError
from .evaluate import ChainStage, Plan, StagePlan, evaluate_chain
from .profile import ClusterProfile, LinkProfile, ModelProfile, WorkerProfile, Workload

__all__ = ["ChainStage", "ClusterProfile", "DEFAULT_MICRO_BATCHES", "DEFAULT_OFFLOADS", "InfeasiblePlanError",
           "LinkProfile", "ModelProfile", "Plan", "ProfileError", "StagePlan", "WorkerProfile", "Workload",
           "evaluate_chain", "even_split", "petals_greedy", "solve"]
