"""Reading a Hugging Face checkpoint one tensor at a time.

A worker never opens the whole model: it asks the safetensors index (or the single file's
header) which file holds each tensor of its span and reads just those, memory-mapped.
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


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder with ``config.json`` + safetensors, or a Hub id fetched into the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_folder(path)
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; pass the checkpoint *folder* (with config.json)")
    try:  # a Hub id such as "meta-llama/Llama-3.2-1B"; works offline if it is already cached
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not found" to the user
        raise CheckpointNotFoundError(
            f"{name_or_path!r} is neither a local checkpoint folder nor a Hub model id that could be fetched "
            f"({type(exc).__name__}: {exc}). Pass the path of a folder saved with save_pretrained "
            "(config.json + *.safetensors), or check the model id and your network.") from None
    _check_folder(folder)
    return folder


def _check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    if not ((path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()):
        raise CheckpointNotFoundError(
            f"{path} has no {SINGLE_NAME} or {INDEX_NAME}; re-save the model with "
            "save_pretrained(..., safe_serialization=True)")


def weight_map(path: Path) -> dict[str, str]:
    """tensor name -> file name (relative to ``path``), from the index or the single file's header."""
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
    out = {}
    for fname, file_names in by_file.items():
        with safe_open(path / fname, framework="pt") as f:
            for name in file_names:
                t = f.get_tensor(name)
                out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out
