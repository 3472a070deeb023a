"""Offloading in the span runner: weights streamed from the checkpoint, the oldest KV in a file.

Every offloaded run is compared bit for bit (``torch.equal``) with the fully resident span on the
same inputs: prefill of a padded batch, decode steps, a rollback into the offloaded KV, and a
token-tree step whose kept path straddles the offloaded KV.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from bloombee_nb._kernels import branching_parents, tree_position_ids
from bloombee_nb.cluster.stage import StageActor
from bloombee_nb.errors import CheckpointNotFoundError, SpanError
from bloombee_nb.model.offload import ColdKVLayer, n_offloaded
from bloombee_nb.model.span import SpanRunner
from tests.conftest import FAMILIES, make_checkpoint, padded_batch
from tests.helpers import positions

FRACTIONS = (0.0, 0.5, 1.0)


def script(runner: SpanRunner, embed, sid="s") -> list[torch.Tensor]:
    """Prefill, 3 decode steps, roll back 4 positions, a 5-node tree, keep a path, 2 more decodes."""
    ids, mask = padded_batch([7, 4, 6])
    g = torch.Generator().manual_seed(3)
    B, D, dt = 3, runner.hidden_size, getattr(runner, "dtype", torch.float32)
    runner.open(sid, B, 32)
    outs = [runner.forward(sid, embed(ids), positions(mask), mask)]
    pos = positions(mask)[:, -1:]
    for _ in range(3):
        pos = pos + 1
        outs.append(runner.forward(sid, torch.randn(B, 1, D, generator=g).to(dt), pos, torch.ones(B, 1, dtype=torch.long)))
    runner.rollback(sid, runner.sessions[sid].length - 4)  # into the offloaded (oldest) part at f = 1
    pos = pos - 4
    parents = branching_parents((2, 1))  # 5 nodes
    past = runner.sessions[sid].length
    tpos = tree_position_ids(parents, pos[:, 0] + 1)
    outs.append(runner.forward(sid, torch.randn(B, 5, D, generator=g).to(dt), tpos, torch.ones(B, 5, dtype=torch.long),
                               parents))
    runner.keep_path(sid, past, [0, 2, 4])
    pos = pos + 3
    for _ in range(2):
        pos = pos + 1
        outs.append(runner.forward(sid, torch.randn(B, 1, D, generator=g).to(dt), pos, torch.ones(B, 1, dtype=torch.long)))
    return outs


@pytest.fixture(scope="module")
def resident_outputs(checkpoints, reference):
    embed = reference["llama"].model.embed_tokens
    with torch.inference_mode():
        return script(SpanRunner(checkpoints["llama"], 0, 5), embed)


@pytest.mark.parametrize("kv", FRACTIONS)
@pytest.mark.parametrize("weights", FRACTIONS)
def test_offloaded_span_is_bit_identical_to_resident(checkpoints, reference, resident_outputs, weights, kv):
    runner = SpanRunner(checkpoints["llama"], 0, 5, weight_offload=weights, kv_offload=kv)
    with torch.inference_mode():
        outs = script(runner, reference["llama"].model.embed_tokens)
    assert len(outs) == len(resident_outputs)
    for i, (a, b) in enumerate(zip(outs, resident_outputs)):
        assert torch.equal(a, b), f"step {i} differs with weight_offload={weights}, kv_offload={kv}"
    n_off = n_offloaded(weights, 5)
    assert runner.offloaded_weight_bytes == (runner.weight_bytes * n_off // 5 if n_off else 0)
    # between steps every offloaded layer is an empty shell again: only the two buffers hold weights
    shells = list(runner.layers)[5 - n_off:]
    assert all(p.is_meta for layer in shells for p in layer.parameters())
    if n_off:
        assert runner.streamer.last.layers == n_off
        assert runner.streamer.buffer_bytes == 2 * runner.weight_bytes // 5
    s = runner.sessions["s"]
    for layer in s.cache.layers:
        if kv:
            assert isinstance(layer, ColdKVLayer)
            assert layer.cold_length == int(kv * s.length) and layer.keys.shape[-2] == s.length - layer.cold_length
        else:
            assert not isinstance(layer, ColdKVLayer)
    assert s.reserved_bytes + s.cold_kv_bytes == 3 * 32 * runner.kv_bytes_per_token
    runner.release()


@pytest.mark.parametrize("kw", [dict(offload_prefetch=False), dict(offload_reader="mmap"), dict(dtype=torch.bfloat16)],
                         ids=["no-prefetch", "mmap-reader", "cast-to-bf16"])
def test_reader_variants_are_exact(checkpoints, reference, resident_outputs, kw):
    """Reads in the compute thread; through load_tensors' mapping; a stored fp32 checkpoint served in bf16
    (read into a staging buffer, then cast as load_span casts)."""
    embed = reference["llama"].model.embed_tokens
    dtype = kw.get("dtype", torch.float32)
    want = resident_outputs
    with torch.inference_mode():
        if dtype != torch.float32:
            want = script(SpanRunner(checkpoints["llama"], 0, 5, dtype=dtype), lambda ids: embed(ids).to(dtype))
        runner = SpanRunner(checkpoints["llama"], 0, 5, weight_offload=0.6, kv_offload=0.5, **kw)
        outs = script(runner, lambda ids: embed(ids).to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(outs, want))
    if runner.device.type == "cpu":  # an accelerator always reads through a pinned host buffer
        assert (runner.streamer._staging is not None) == (dtype != torch.float32)
    runner.release()


def test_split_spans_with_offload_are_exact(checkpoints, reference, resident_outputs):
    """The span cut in two, offloading on both."""
    embed = reference["llama"].model.embed_tokens

    class Two:  # two spans that look like one runner to script()
        def __init__(self):
            self.parts = [SpanRunner(checkpoints["llama"], 0, 2, weight_offload=0.5, kv_offload=0.5),
                          SpanRunner(checkpoints["llama"], 2, 5, weight_offload=1.0, kv_offload=0.3)]
            self.hidden_size, self.sessions = 64, self.parts[0].sessions

        def open(self, *a):
            [p.open(*a) for p in self.parts]

        def forward(self, sid, h, *a):
            for p in self.parts:
                h = p.forward(sid, h, *a)
            return h

        def rollback(self, *a):
            [p.rollback(*a) for p in self.parts]

        def keep_path(self, *a):
            [p.keep_path(*a) for p in self.parts]

    with torch.inference_mode():
        split = script(Two(), embed)
    assert all(torch.equal(a, b) for a, b in zip(split, resident_outputs))


def test_offloaded_pages_leave_the_page_cache(tmp_path):
    """After a step the offloaded layers' file pages are dropped; without drop_page_cache they stay."""
    path = make_checkpoint(tmp_path / "ckpt", n_layers=4, hidden=128)
    fd = os.open(path / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)  # freshly written pages are dirty, and dirty pages cannot be dropped
    os.close(fd)
    h = torch.randn(1, 3, 128)
    cached = {}
    for drop in (True, False):
        # all layers offloaded: a resident layer's mapped pages would pin the large page-cache folio
        # they share with the first offloaded layer's head (up to ~256 KiB of a 580 KiB layer here)
        # no prefetch: with it, the next step's first layer is read ahead and the kernel's readahead
        # past it (the rest of this tiny file) stays cached until that step
        r = SpanRunner(path, 0, 4, weight_offload=1.0, drop_page_cache=drop, offload_prefetch=False)
        r.open("s", 1, 8)
        r.forward("s", h, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.long))
        cached[drop] = r.streamer.cached_fraction()
        r.release()
    if cached[False] == 0.0:
        pytest.skip("this filesystem keeps no page cache for the checkpoint (tmpfs or similar)")
    assert cached[True] < 0.05 < 0.95 < cached[False], cached


def test_unreadable_checkpoint_is_a_typed_error_and_leaves_the_session_intact(tmp_path, checkpoints):
    """pread reader: the file is held open (a moved checkpoint still reads); a truncated one fails cleanly."""
    path = Path(shutil.copytree(checkpoints["llama"], tmp_path / "ckpt"))
    r = SpanRunner(path, 0, 5, weight_offload=1.0)  # nothing mapped: the file may shrink under us
    r.open("s", 1, 16)
    h, pos, ones = torch.randn(1, 4, 64), torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long)
    first = r.forward("s", h, pos, ones)
    f = path / "model.safetensors"
    f.rename(path / "moved")
    r.rollback("s", 0)
    assert torch.equal(r.forward("s", h, pos, ones), first)
    data = (path / "moved").read_bytes()
    os.truncate(path / "moved", len(data) // 2)
    with pytest.raises(CheckpointNotFoundError, match="truncated"):
        r.forward("s", h[:, :1], pos[:, :1] + 4, ones[:, :1])
    assert r.sessions["s"].length == 4  # the failed step changed nothing
    (path / "moved").write_bytes(data)  # the same inode, whole again
    r.rollback("s", 0)
    assert torch.equal(r.forward("s", h, pos, ones), first)
    r.release()


def test_missing_checkpoint_file_with_the_mmap_reader(tmp_path, checkpoints):
    path = Path(shutil.copytree(checkpoints["llama"], tmp_path / "ckpt"))
    r = SpanRunner(path, 0, 5, weight_offload=0.4, offload_reader="mmap")
    r.open("s", 1, 16)
    h, pos, ones = torch.randn(1, 4, 64), torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long)
    first = r.forward("s", h, pos, ones)
    (path / "model.safetensors").rename(path / "moved")
    with pytest.raises(CheckpointNotFoundError, match="keep them in place"):
        r.forward("s", h[:, :1], pos[:, :1] + 4, ones[:, :1])
    assert r.sessions["s"].length == 4
    (path / "moved").rename(path / "model.safetensors")
    r.rollback("s", 0)
    assert torch.equal(r.forward("s", h, pos, ones), first)
    r.release()


def test_fractions_are_checked_and_reach_the_runner_through_the_stage(checkpoints):
    for kw in (dict(weight_offload=1.5), dict(kv_offload=-0.1)):
        with pytest.raises(SpanError, match=r"must be a fraction in \[0, 1\]"):
            SpanRunner(checkpoints["llama"], 0, 2, **kw)
    assert [n_offloaded(f, 5) for f in (0, 0.1, 0.25, 0.5, 0.75, 1)] == [0, 1, 1, 3, 4, 5]  # round half up
    stage = StageActor(checkpoints["llama"], 1, 5, weight_offload=0.5, kv_offload=0.25)
    info = stage.runner.info()
    assert (info["weight_offload"], info["kv_offload"]) == (0.5, 0.25)
    assert info["offloaded_weight_bytes"] == info["weight_bytes"] // 2
    stage.runner.release()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator")
def test_streamer_fills_device_buffers(checkpoints):
    """The device path: buffers on the accelerator, copies on a side stream (same code as on CPU)."""
    from bloombee_nb.model.checkpoint import load_tensors, weight_map
    from bloombee_nb.model.family import load_config, meta_model
    from bloombee_nb.model.offload import WeightStreamer

    path = Path(checkpoints["llama"])
    model = meta_model(load_config(path))
    wmap = weight_map(path)
    shells = {f"model.layers.{i}.": model.model.layers[i] for i in range(2, 5)}
    streamer = WeightStreamer(path, wmap, shells, torch.float32, device="cuda")
    with streamer.run(list(shells.values())) as layers:
        for prefix, layer in zip(shells, layers):
            want = load_tensors(path, [prefix + k for k in layer.state_dict()], wmap)
            for k, t in layer.state_dict().items():
                assert t.is_cuda and torch.equal(t.cpu(), want[prefix + k])
    streamer.close()


#: The script rolls back and runs a tree, so families whose 8-position window it outgrows (rollback is
#: refused past the window) and BLOOM (ALiBi refuses trees) are left out.
OFFLOAD_FAMILIES = [f for f in FAMILIES if f not in ("llama", "mistral_sliding", "gemma2", "gemma3_text", "bloom")]
#: Mixtral and Qwen3-MoE store their experts in another layout and refuse weight_offload
#: (test_checkpoint.py): their KV alone is offloaded.
CONVERTED = ("mixtral", "qwen3_moe")


@pytest.mark.parametrize("family", OFFLOAD_FAMILIES)
def test_other_families_offload_exactly(checkpoints, reference, family):
    """Weights and KV offloaded in each supported family; sliding-window layers keep their KV in memory."""
    embed = reference[family].get_input_embeddings()
    resident = SpanRunner(checkpoints[family], 1, 5)
    runner = SpanRunner(checkpoints[family], 1, 5, weight_offload=0.0 if family in CONVERTED else 0.5, kv_offload=0.5)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(script(runner, embed), script(resident, embed)))
    sliding = [k == "sliding_attention" for k in runner.layer_kinds]
    cold = [isinstance(layer, ColdKVLayer) for layer in runner.sessions["s"].cache.layers[1:5]]
    assert cold == [not s for s in sliding]
    assert (runner.info()["cold_kv_bytes"] == 0) == all(sliding)
    runner.release()


def test_stored_offsets_come_from_safetensors_checks(tmp_path):
    """The streamer reads at offsets derived from ``safe_open`` (names in file order, dtypes, shapes,
    and its rule that tensors tile the file): the bytes found there are each tensor's bytes."""
    from safetensors.torch import save_file

    from bloombee_nb.model.offload import stored_tensors

    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "ids": torch.arange(7),
               "c": torch.randn(2, 3).to(torch.float16)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    stored = stored_tensors(tmp_path, ["a", "b", "c"], dict.fromkeys(tensors, "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    for name, st in stored.items():
        found = torch.frombuffer(bytearray(raw[st.offset:st.offset + st.nbytes]), dtype=st.dtype).view(st.shape)
        assert torch.equal(found, tensors[name])
    (tmp_path / "m.safetensors").write_bytes(raw + b"\0")  # a file the format does not allow
    with pytest.raises(CheckpointNotFoundError, match="not a readable safetensors file"):
        stored_tensors(tmp_path, ["a"], {"a": "m.safetensors"})
