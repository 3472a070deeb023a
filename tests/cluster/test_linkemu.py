"""The link emulator: real namespaces and tbf-shaped veth links, workers in them, torn down after.

Skips (saying why) where it cannot run, e.g. without root; CI machines here are root.
"""

import subprocess

import pytest
import torch

import bloombee_nb as bb
from bloombee_nb.cluster import linkemu
from bloombee_nb.cluster.profiling import measure_links
from bloombee_nb.transport import RAW
from tests.conftest import padded_batch

pytestmark = [pytest.mark.slow,  # network namespaces, shaped links, seconds of traffic each
              pytest.mark.skipif(linkemu.available() is not None, reason=f"link emulator: {linkemu.available()}")]


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_shaped_links_carry_the_set_rate_and_rtt_and_generation_stays_exact(reference, checkpoints):
    with linkemu.LinkEmulator(n_workers=2, scheduler_port=8798) as emu:
        assert all(ns in _namespaces() for ns in emu.namespaces)
        with bb.connect(emu.scheduler_address) as cluster:
            cluster.wait_for_workers(2, 60)
            addrs = cluster.worker_addresses()
            assert all(a.split("//")[1].split(":")[0] in emu.addresses for a in addrs)  # inside the namespaces
            emu.shape(rate_mbit=40, rtt_ms=30, client=cluster.client)
            links = measure_links(cluster.client, addrs, {a: a for a in addrs},
                                  pairs=[("client", addrs[0]), (addrs[0], addrs[1]), (addrs[1], "client")])
            for ln in links:  # no timing windows: a loaded machine moves a measurement, in either direction for
                # bandwidth (a load-inflated RTT is subtracted from the transfer time), so only an order of magnitude
                # is asserted: 40 Mbit/s = 5 MB/s shaped, against hundreds of MB/s for an unshaped veth pair
                assert ln.bandwidth_bytes_per_s < 10 * 5e6, ln
                assert ln.rtt_s >= 0.030, ln  # held in the send path: load only adds to a round trip
            model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster,
                                                                   spans=[(0, 3), (3, 5)], compression="auto")
            prefill_codecs = {p.codec_for(1 << 20) for _, _, p in model.chain.link_codecs()}
            assert RAW not in prefill_codecs  # 5 MB/s: compressing a 1 MiB frame pays on every link
            ids, mask = padded_batch([12, 7], seed=3)
            want = reference["llama"].generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                               pad_token_id=0)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(got, want)
            model.close()
    assert not any(ns in _namespaces() for ns in emu.namespaces)  # torn down
    assert linkemu.BRIDGE not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


def test_a_link_that_drops_for_3s_only_pauses_the_generation(reference, checkpoints):
    """The veth of the worker hosting the middle span goes down for 3 s mid-generation: TCP
    retransmits carry the step once it is back, the watchdog's pings (10 s) do not give up on it,
    no recovery happens, and the output is exact."""
    import threading
    import time

    from transformers.generation.streamers import BaseStreamer

    class DropAt(BaseStreamer):
        def __init__(self, device: str):
            self.device, self.times, self.puts = device, [], 0

        def put(self, value):
            self.puts += 1
            self.times.append(time.perf_counter())
            if self.puts == 3:
                subprocess.run(["ip", "link", "set", self.device, "down"], check=True)
                threading.Timer(3.0, subprocess.run, (["ip", "link", "set", self.device, "up"],),
                                dict(check=True)).start()

        def end(self):
            pass

    with linkemu.LinkEmulator(n_workers=3, scheduler_port=8797) as emu:
        with bb.connect(emu.scheduler_address) as cluster:
            cluster.wait_for_workers(3, 60)
            by_host = {a.split("//")[1].split(":")[0]: a for a in cluster.worker_addresses()}
            model = bb.DistributedModelForCausalLM.from_pretrained(
                checkpoints["llama"], cluster=cluster, workers=[by_host[h] for h in emu.addresses],
                spans=[(0, 2), (2, 4), (4, 5)], call_timeout_s=60)
            ids, _ = padded_batch([6], seed=4)
            want = reference["llama"].generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            streamer = DropAt("bbemu-v1")
            got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, streamer=streamer)
            gap_s = max(b - a for a, b in zip(streamer.times, streamer.times[1:]))
            print(f"\nlink down 3 s: longest gap between tokens {gap_s:.2f} s, recoveries {model.events}")
            assert torch.equal(got, want)
            assert gap_s >= 2.5 and model.events == []  # it paused, and nothing was re-placed
            model.close()
