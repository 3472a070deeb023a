"""benchmarks/_delayline.py, the link a real Petals swarm is measured behind: bytes arrive intact and
in order, never earlier than the link's half round trip plus their time on the wire, and are counted.
(Lower bounds only: a busy machine may deliver later, never sooner.)"""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import free_port

DELAYLINE = Path(__file__).parents[1] / "benchmarks" / "_delayline.py"


def test_the_delay_line_holds_each_direction_and_paces_at_the_rate(tmp_path):
    rtt_ms, mbit = 60, 8
    stats = tmp_path / "stats.json"

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[1]
        listen = free_port()
        line = subprocess.Popen([sys.executable, str(DELAYLINE), "--rtt-ms", str(rtt_ms), "--mbit", str(mbit),
                                 "--stats", str(stats), f"{listen}:{target}"], stdout=subprocess.PIPE, text=True)
        try:
            assert line.stdout.readline().strip() == "READY"
            reader, writer = await asyncio.open_connection("127.0.0.1", listen)
            times = []
            for payload in (b"ping", os.urandom(100_000)):
                t0 = time.monotonic()
                writer.write(payload)
                await writer.drain()
                got = await reader.readexactly(len(payload))
                times.append(time.monotonic() - t0)
                assert got == payload  # intact and in order
            writer.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not stats.exists():
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.1)  # the counters are rewritten every second
            return times, json.loads(stats.read_text())
        finally:
            line.kill()
            line.wait()
            server.close()

    (small, big), counted = asyncio.run(run())
    assert small >= rtt_ms / 1e3  # half the round trip each way
    wire_s = 100_000 * 8 / (mbit * 1e6)  # 0.1 s on the wire; the echo's return overlaps all but the last chunk
    assert big >= rtt_ms / 1e3 + wire_s
    ((_, bytes_),) = counted.items()
    assert bytes_ == {"in": 100_004, "out": 100_004}
