"""A TCP delay line: emulated links in front of another system's servers (stdlib only).

    python _delayline.py --rtt-ms 10 --mbit 100 --stats stats.json 41000:40000 41001:40001

Each ``LISTEN:TARGET`` pair forwards connections to ``127.0.0.1:LISTEN`` on to ``127.0.0.1:TARGET``.
Every chunk, in either direction, leaves once the link is free for its ``bytes · 8 / rate`` (one
link per pair and direction, shared by all its connections, as a ``tbf`` qdisc shapes a veth) and
arrives ``RTT / 2`` after that, in order. A server that announces its ``LISTEN`` address (Petals:
``--announce_maddrs``) is reached only through it, so every hop to it costs one link's RTT and
bandwidth, as ``bloombee_nb.transport.emulation`` holds every message our own stages send.

This kernel has no ``netem`` qdisc (see DESIGN.md): the delay is held here, in user space, as it
is in our send path. Prints ``READY`` once listening; writes the bytes each pair forwarded to
``--stats`` every second (the benchmark checks the traffic really crossed it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

CHUNK = 1 << 16


class Wire:
    """One direction of one pair: serialization at ``rate`` (bytes/s, 0: none), then ``delay`` (s)."""

    def __init__(self, rate: float, delay: float):
        self.rate, self.delay, self.free_at, self.bytes = rate, delay, 0.0, 0

    def due(self, nbytes: int) -> float:
        """When a chunk of ``nbytes`` read now arrives at the far end."""
        self.free_at = max(time.monotonic(), self.free_at) + (nbytes / self.rate if self.rate else 0.0)
        self.bytes += nbytes
        return self.free_at + self.delay


class Link:
    """One direction of one connection over ``wire``: chunks delivered in order, each when due."""

    def __init__(self, writer: asyncio.StreamWriter, wire: Wire):
        self.writer, self.wire = writer, wire
        self.queue: asyncio.Queue = asyncio.Queue()

    async def pump(self, reader: asyncio.StreamReader) -> None:
        sender = asyncio.ensure_future(self._deliver())
        try:
            while data := await reader.read(CHUNK):
                self.queue.put_nowait((self.wire.due(len(data)), data))
        finally:
            self.queue.put_nowait((0.0, b""))  # end of stream, after everything queued
            await sender

    async def _deliver(self) -> None:
        while True:
            due, data = await self.queue.get()
            if not data:
                break
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            self.writer.write(data)
            await self.writer.drain()
        try:
            self.writer.write_eof()
        except OSError:
            pass


async def serve(pairs: list[tuple[int, int]], rtt_s: float, rate: float, stats: str | None) -> None:
    wires = {f"{a}:{b}": (Wire(rate, rtt_s / 2), Wire(rate, rtt_s / 2)) for a, b in pairs}  # in, out

    def handler(listen: int, target: int):
        async def on_connect(c_reader, c_writer):
            try:
                s_reader, s_writer = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                c_writer.close()
                return
            inbound, outbound = wires[f"{listen}:{target}"]
            try:
                await asyncio.gather(Link(s_writer, inbound).pump(c_reader), Link(c_writer, outbound).pump(s_reader))
            except (ConnectionError, OSError):
                pass
            finally:
                for w in (c_writer, s_writer):
                    w.close()
        return on_connect

    for a, b in pairs:
        await asyncio.start_server(handler(a, b), "127.0.0.1", a)
    print("READY", flush=True)
    while True:  # until killed
        await asyncio.sleep(1.0)
        if stats:
            with open(stats, "w") as f:
                json.dump({k: {"in": i.bytes, "out": o.bytes} for k, (i, o) in wires.items()}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--mbit", type=float, default=0.0, help="each link's rate (0: not shaped)")
    p.add_argument("--stats", help="JSON file: bytes forwarded per pair, rewritten every second")
    p.add_argument("pairs", nargs="+", help="LISTEN:TARGET ports on 127.0.0.1")
    a = p.parse_args()
    pairs = [tuple(int(x) for x in pair.split(":")) for pair in a.pairs]
    asyncio.run(serve(pairs, a.rtt_ms / 1e3, a.mbit * 1e6 / 8, a.stats))


if __name__ == "__main__":
    main()
