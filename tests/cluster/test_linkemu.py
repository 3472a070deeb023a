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

pytestmark = pytest.mark.skipif(linkemu.available() is not None, reason=f"link emulator: {linkemu.available()}")


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
            for ln in links:
                assert 0.75 * 5e6 < ln.bandwidth_bytes_per_s < 1.3 * 5e6, ln  # 40 Mbit/s = 5 MB/s
                assert 0.030 <= ln.rtt_s < 0.045, ln
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
