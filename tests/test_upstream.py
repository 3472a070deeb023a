"""What our dependencies must keep doing, checked so that an upstream release that changes it fails
here, by name, instead of three layers down as wrong logits or a hung actor call.

We state floors, never pins (README, "Keeping up with dependencies"), so every CI run installs the
newest releases our floors allow. These tests are the early warning: the installed versions must
meet our floors, and our own code paths must not trip deprecations in the libraries they call
(a deprecation today is tomorrow's break, as `kernels` was for transformers 5.25).
"""

from __future__ import annotations

import importlib.metadata
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from bloombee_nb.model.span import SpanRunner
from bloombee_nb.transport.frame import decode, encode
from tests.conftest import padded_batch
from tests.helpers import distributed

ROOT = Path(__file__).parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
UPSTREAM = ("torch", "transformers", "dask", "distributed", "blosc2", "safetensors", "huggingface_hub", "numpy")


def requirements(*extras: str) -> list[Requirement]:
    lines = PROJECT["dependencies"] + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("req", requirements("notebook", "dev"), ids=str)
def test_installed_versions_meet_our_floors(req):
    try:
        have = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed: `pip install -e '.[dev,notebook]'`")
    assert req.specifier.contains(have, prereleases=True), (
        f"{req.name} {have} is installed but pyproject.toml asks for {req}: reinstall, or lower the floor "
        "only after the suite passes on that version")


def deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    kinds = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    return sorted({f"{w.category.__name__} at {Path(w.filename).name}:{w.lineno}: {w.message}"
                   for w in caught if issubclass(w.category, kinds)})


def test_our_stage_path_trips_no_upstream_deprecation(checkpoints, reference):
    """Prefill, decode, rollback and a compressed frame round trip, the way a stage runs them."""
    ref = reference["llama"]
    ids, mask = padded_batch([5, 3])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spans = [SpanRunner(checkpoints["llama"], 0, 2), SpanRunner(checkpoints["llama"], 2, 5)]
        h = ref.model.embed_tokens(ids)
        for s in spans:
            s.open("u", 2, 16)
            h = s.forward("u", h, pos, mask)
            s.rollback("u", ids.shape[1] - 1)
            s.close("u")
        back = decode(encode(h.detach(), "zstd-1+shuffle", min_compress_bytes=0))
    torch.testing.assert_close(back, h.detach(), rtol=0, atol=0)
    assert not deprecations(caught), (
        "an upstream library deprecates something our stage path uses; fix it before the release that "
        "removes it:\n" + "\n".join(deprecations(caught)))


def test_our_client_path_trips_no_upstream_deprecation(cluster, checkpoints, reference):
    """transformers' generate() driving a DistributedModelForCausalLM (the client's side of a token)."""
    import bloombee_nb as bb

    ids, mask = padded_batch([6])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with distributed(checkpoints["llama"], cluster) as model:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    want = reference["llama"].generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, want)
    assert not deprecations(caught), (
        "an upstream library deprecates something our client path uses; fix it before the release that "
        "removes it:\n" + "\n".join(deprecations(caught)))
