"""Reading a Hugging Face checkpoint one tensor at a time.

A worker never opens the whole model: it asks the safetensors index (or the single file's
header) which file holds each tensor of its span and reads just those, memory-mapped. A GGUF
checkpoint's folder names its .gguf file instead (``gguf.py``): its tensors are dequantized one by one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointNotFoundError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


META_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja"]


def resolve_checkpoint(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder with ``config.json`` + safetensors, a GGUF file (converted once into such a
    folder: ``gguf.py``), or a Hub id fetched into the HF cache.

    For a Hub id only the metadata (config, index, tokenizer) is fetched here; a process then
    downloads just the safetensors shards holding the tensors it reads (:func:`load_tensors`), so a
    worker hosting 8 layers of a 70B model fetches its shards, not 140 GB.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_folder(path)
        return path
    if path.suffix.lower() == ".gguf" and path.is_file():  # llama.cpp's format: converted once (gguf.py)
        from .gguf import gguf_checkpoint

        return gguf_checkpoint(path)
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; pass the checkpoint *folder* (with config.json), "
                                      "or a .gguf file")
    try:  # a Hub id such as "meta-llama/Llama-3.2-1B"; works offline if it is already cached
        from huggingface_hub import hf_hub_download, snapshot_download

        folder = Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=META_PATTERNS))
        if not (folder / INDEX_NAME).is_file():  # one-file checkpoint: its header is the weight map
            hf_hub_download(str(name_or_path), SINGLE_NAME, revision=revision)
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not found" to the user
        raise CheckpointNotFoundError(
            f"{name_or_path!r} is neither a local checkpoint folder nor a Hub model id that could be fetched "
            f"({type(exc).__name__}: {exc}). Pass the path of a folder saved with save_pretrained "
            "(config.json + *.safetensors), or check the model id and your network.") from None
    _check_folder(folder)
    return folder


def ensure_files(path: Path, fnames, download=None) -> None:
    """Fetch the shards among ``fnames`` missing from a Hub snapshot folder (local folders: no-op).

    ``download(repo_id, filename, revision)`` defaults to ``huggingface_hub.hf_hub_download``,
    which places the file in the same snapshot folder.
    """
    source = hub_source(path)
    missing = [f for f in dict.fromkeys(fnames) if not (path / f).is_file()]
    if source is None or not missing:
        return
    if download is None:
        from huggingface_hub import hf_hub_download as download
    for fname in missing:
        try:
            download(source[0], fname, revision=source[1])
        except Exception as exc:  # noqa: BLE001
            raise CheckpointNotFoundError(f"could not fetch {fname} of {source[0]!r} from the Hub "
                                          f"({type(exc).__name__}: {exc}); check the network or the cache") from None


def hub_source(path: Path) -> tuple[str, str] | None:
    """``(repo id, revision)`` of a Hub snapshot folder, read off the HF cache's own layout
    (``…/models--<org>--<name>/snapshots/<commit>``: Hub ids cannot contain "--"); None for any
    other folder. Its shards are fetched on first use, one file at a time (:func:`ensure_files`)."""
    path = Path(path)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/"), path.name


def _check_folder(path: Path) -> None:
    from .gguf import MAP_NAME

    if not (path / "config.json").is_file():
        raise CheckpointNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    if not ((path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file() or (path / MAP_NAME).is_file()):
        raise CheckpointNotFoundError(
            f"{path} has no {SINGLE_NAME} or {INDEX_NAME}; re-save the model with "
            "save_pretrained(..., safe_serialization=True)")


def weight_map(path: Path) -> dict[str, str]:
    """tensor name -> file name (relative to ``path``), from the index or the single file's header
    (a converted GGUF folder: the absolute path of its .gguf file)."""
    from . import gguf

    if (path / gguf.MAP_NAME).is_file():
        return gguf.weight_map(path)
    index = path / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    with safe_open(path / SINGLE_NAME, framework="pt") as f:
        return {name: SINGLE_NAME for name in f.keys()}


def load_tensors(path: Path, names: list[str], wmap: dict[str, str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read exactly ``names`` (each file opened once, memory-mapped), cast to ``dtype`` if given."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_file[wmap[name]].append(name)
    ensure_files(path, by_file)  # a Hub checkpoint: fetch only these shards
    out = {}
    for fname, file_names in by_file.items():
        if fname.endswith(".gguf"):
            from .gguf import read_tensors

            out.update(read_tensors(path, fname, file_names, dtype))
            continue
        with safe_open(path / fname, framework="pt") as f:
            for name in file_names:
                t = f.get_tensor(name)
                out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out
