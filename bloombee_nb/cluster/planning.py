"""Solving the planner for what the runtime runs, priced the way it runs.

The runtime executes everything the DP (``bloombee_nb.plan``) chooses: the chain and its spans,
the micro-batch size (a batch of B rows is pipelined as ⌈B/m⌉ micro-batches, and a stage merges
decode steps of different sessions up to m rows) and each stage's weight and KV offload
fractions (streamed from RAM/disk by the stage's ``SpanRunner``). So ``runtime_plan`` gives the
DP its own default choices (``DEFAULT_OFFLOADS``, ``DEFAULT_MICRO_BATCHES``: only values up to
the batch matter, see ``plan.dp.micro_batch_choices``) and only prices the profile as the
runtime relays hidden states: stage to stage ("chain", with the measured chain step overhead)
or through the client ("star", every worker→worker hop = two legs via the client).
"""

from __future__ import annotations

from ..plan import DEFAULT_MICRO_BATCHES, DEFAULT_OFFLOADS, ClusterProfile, Plan, Workload, solve

OFFLOADS = DEFAULT_OFFLOADS              # the stages stream any fraction the DP picks from these
MICRO_BATCHES = DEFAULT_MICRO_BATCHES    # … and the chain pipelines any of these micro-batch sizes


def runtime_plan(profile: ClusterProfile, workload: Workload, relay: str = "chain", **solve_kwargs) -> Plan:
    """The best plan for ``workload``, priced as the runtime relays (``solve_kwargs`` go to ``solve``)."""
    priced = profile.relayed_through_client() if relay == "star" else profile.priced_for_chain()
    solve_kwargs.setdefault("offloads", OFFLOADS)
    solve_kwargs.setdefault("micro_batches", MICRO_BATCHES)
    return solve(priced, workload, **solve_kwargs)
