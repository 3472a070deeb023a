"""Shared fixtures: tiny real checkpoints (saved with save_pretrained) and one real Dask cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import bloombee_nb as bb

N_LAYERS = 5
VOCAB = 128

# family -> (config class, model class, extra config): every one uses grouped-query attention.
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=4096)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=16)),
}


def make_checkpoint(path, family: str = "llama", n_layers: int = N_LAYERS, hidden: int = 64, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **save_kwargs):
    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> path of a tiny 5-layer checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    return {f: str(make_checkpoint(root / f, f, seed=i)) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def reference(checkpoints):
    """family -> the same checkpoint loaded by plain transformers in this process."""
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(p).eval() for f, p in checkpoints.items()}


@pytest.fixture(scope="session")
def cluster():
    """One embedded LocalCluster (3 worker processes) for the whole run."""
    with bb.connect(n_workers=3) as c:
        yield c


def padded_batch(lengths: list[int], seed: int = 0, vocab: int = VOCAB):
    """Left-padded random prompts of the given lengths: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


BIN = str(Path(sys.executable).with_name("bloombee-nb"))


def start_process(cmd: list[str], pattern: str, timeout_s: float = 90) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` (one torch thread) and wait for a line matching ``pattern``; its first group is
    returned with the process, whose remaining output is drained in the background."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := re.search(pattern, line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"{cmd} did not print {pattern!r}")

