"""Emulated link latency (and, where the kernel cannot shape, bandwidth) in the send path.

The kernels here have no ``netem`` qdisc, so round-trip time cannot be added to a link the
usual way. Every participant — each worker *and* the client — started with
``BLOOMBEE_EMULATED_RTT_MS=<ms>`` holds every message it sends for half that before it leaves,
so a link between two participants with the same setting has that round-trip time, in both
directions, for the hidden states and for the profiler's probes alike (between settings
``r_u`` and ``r_v`` the round trip is ``(r_u + r_v) / 2``). Unset (the default) it costs nothing.

Bandwidth is shaped for real by ``benchmarks/linkemu.py`` (network namespaces, veth pairs and
``tc … tbf``). Where that cannot run (not root), ``BLOOMBEE_EMULATED_MBIT=<Mbit/s>`` adds
``bytes · 8 / rate`` to the same send-path hold — an *in-process* shaping, labelled as such in
every result that uses it: it serialises a frame's time on the wire but does not model a link
shared by concurrent transfers.
"""

from __future__ import annotations

import asyncio
import os
import time

ENV = "BLOOMBEE_EMULATED_RTT_MS"
ENV_MBIT = "BLOOMBEE_EMULATED_MBIT"


def emulated_rtt_s() -> float:
    return float(os.environ.get(ENV, 0) or 0) / 1e3


def emulated_bandwidth_Bps() -> float:
    """The in-process shaping rate in bytes/s (0: not shaped here)."""
    return float(os.environ.get(ENV_MBIT, 0) or 0) * 1e6 / 8


def send_hold_s(nbytes: int = 0) -> float:
    """How long a message of ``nbytes`` is held before it leaves this participant."""
    s = emulated_rtt_s() / 2
    if (bw := emulated_bandwidth_Bps()) > 0:
        s += nbytes / bw
    return s


def hold_sync(nbytes: int = 0) -> None:
    """Blocking form of :func:`hold`: call just before a reply or message leaves (threads only)."""
    if (s := send_hold_s(nbytes)) > 0:
        time.sleep(s)


async def hold(nbytes: int = 0) -> None:
    """Await just before a message of ``nbytes`` leaves this participant (benchmarks only)."""
    if (s := send_hold_s(nbytes)) > 0:
        await asyncio.sleep(s)
