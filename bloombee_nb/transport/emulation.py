"""Added link latency for benchmarks, injected in the send path.

The kernels here have no ``netem`` qdisc, so round-trip time cannot be added to a link the
usual way. A worker started with ``BLOOMBEE_EMULATED_RTT_MS=<ms>`` delays every message into
and out of it by half that (stages: on arrival and before sending on; probes: the same sum), so
a link u→v carries (d_u + d_v)/2 one way — the same for the hidden states as for the profiler's
probes. Unset (the default) it costs nothing.
"""

from __future__ import annotations

import asyncio
import os
import time

ENV = "BLOOMBEE_EMULATED_RTT_MS"


def emulated_rtt_s() -> float:
    return float(os.environ.get(ENV, 0) or 0) / 1e3


def delay_reply() -> None:
    """Call just before an actor method returns to a peer."""
    if (s := emulated_rtt_s()) > 0:
        time.sleep(s)


async def delay_one_way() -> None:
    """Half the RTT: await it when a message arrives at this worker and again when one leaves it."""
    if (s := emulated_rtt_s()) > 0:
        await asyncio.sleep(s / 2)
