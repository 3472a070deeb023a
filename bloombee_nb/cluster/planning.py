"""Solving the planner for what the runtime can do today.

The DP (``bloombee_nb.plan``) can choose micro-batches and offloading; the runtime so far runs
the whole batch at once and keeps all weights and KV in RAM, and relays hidden states either
stage to stage ("chain") or through the client ("star"). ``runtime_plan`` restricts the DP to
exactly that, so the plan's predicted times describe what will really run. Each later issue
widens one knob.
"""

from __future__ import annotations

from ..plan import ClusterProfile, Plan, Workload, solve

OFFLOADS = (0.0,)     # no offloading in the runtime yet


def runtime_plan(profile: ClusterProfile, workload: Workload, relay: str = "chain", **solve_kwargs) -> Plan:
    """The best plan the current runtime can execute, priced the way it executes."""
    priced = profile.relayed_through_client() if relay == "star" else profile.priced_for_chain()
    solve_kwargs.setdefault("offloads", OFFLOADS)
    solve_kwargs.setdefault("micro_batches", (workload.batch,))
    return solve(priced, workload, **solve_kwargs)
