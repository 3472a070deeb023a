"""Model families: which architectures we can cut into spans, and how to build their parts.

We never re-implement a block. The family's own ``*ForCausalLM`` is instantiated on the meta
device (no memory), and the modules we need — a span of decoder layers, or the embeddings,
final norm and LM head — are taken from it and materialised from the checkpoint's tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..errors import SpanError, UnsupportedArchitectureError
from .checkpoint import ensure_files, load_tensors, weight_map

#: Families whose ``*Model.forward`` is exactly embed -> layers(mask, rotary) -> norm, tested token-exact.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def load_config(path: Path, allow_unverified: bool = False) -> PreTrainedConfig:
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_FAMILIES and not allow_unverified:
        raise UnsupportedArchitectureError(
            f"architecture {config.model_type!r} ({', '.join(config.architectures or [])}) is not supported; "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}. A *ForCausalLM with the same model.layers layout may "
            "work: pass allow_unverified_architecture=True and compare its output with transformers first.")
    return config


def meta_model(config: PreTrainedConfig) -> nn.Module:
    """The family's full ``*ForCausalLM`` with every tensor on the meta device (allocates nothing)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    base = getattr(model, model.base_model_prefix, None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no {model.base_model_prefix}.layers list of decoder layers; "
            "only decoder-only models with that layout can be split into spans")
    return model


def checkpoint_dtype(config: PreTrainedConfig, wmap_dtype: torch.dtype) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else wmap_dtype


def layer_attention_types(config: PreTrainedConfig) -> list[str]:
    """The attention kind of each layer, as the family's own forward decides it."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def kv_bytes_per_token(config: PreTrainedConfig, n_layers: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one sequence position costs across ``n_layers`` layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * n_layers * kv_heads * head_dim * dtype.itemsize


def _materialise(module: nn.Module, prefix: str, path: Path, wmap: dict[str, str], dtype: torch.dtype,
                 device: torch.device | None = None) -> nn.Module:
    """Assign ``module`` (on meta) the checkpoint's tensors, cast to ``dtype`` and moved to ``device``
    (one module at a time: host memory holds at most one layer's tensors on their way to a device)."""
    names = [prefix + k for k in module.state_dict()]
    missing = [n for n in names if n not in wmap]
    if missing:
        raise UnsupportedArchitectureError(
            f"checkpoint at {path} lacks {missing[:3]}{'…' if len(missing) > 3 else ''}; "
            "its tensor names do not follow the family's layout")
    tensors = load_tensors(path, names, wmap, dtype)
    if device is not None and torch.device(device).type != "cpu":
        tensors = {n: t.to(device) for n, t in tensors.items()}
    module.load_state_dict({n[len(prefix):]: t for n, t in tensors.items()}, strict=True, assign=True)
    return module


def _prefix(model: nn.Module, wmap: dict[str, str]) -> str:
    """Checkpoints saved from the base model have no ``model.`` prefix on their tensor names."""
    p = model.base_model_prefix + "."
    return p if any(k.startswith(p) for k in wmap) else ""


def load_span(path: Path, config: PreTrainedConfig, start: int, end: int, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None):
    """Decoder layers ``[start, end)`` with real weights, plus the family's rotary embedding.

    Peak memory is about the span's own bytes: layers are built on meta and their parameters
    are *assigned* the tensors read from the memory-mapped safetensors files. ``device`` (default:
    the CPU) is where the layers and the rotary embedding end up, moved there one layer at a time.
    """
    n = config.num_hidden_layers
    if not (0 <= start < end <= n):
        raise SpanError(f"span [{start}, {end}) is not inside the model's {n} layers; choose 0 <= start < end <= {n}")
    model = meta_model(config)
    wmap = weight_map(path)
    dtype = dtype or _stored_dtype(path, wmap, config)
    base = getattr(model, model.base_model_prefix)
    prefix = _prefix(model, wmap)
    layers = nn.ModuleList(
        _materialise(base.layers[i], f"{prefix}layers.{i}.", path, wmap, dtype, device) for i in range(start, end))
    rotary = new_rotary(model, device)
    _check_no_meta(layers)
    return model.config, layers.eval(), rotary, dtype


def new_rotary(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """The family's rotary embedding for ``model`` (on meta): ``inv_freq`` is computed on the CPU, as
    transformers does at init, then moved to ``device``."""
    base = getattr(model, model.base_model_prefix)
    rotary = type(base.rotary_emb)(config=model.config)  # inv_freq is computed, not stored
    return rotary if device is None or torch.device(device).type == "cpu" else rotary.to(device)


def load_client_parts(path: Path, config: PreTrainedConfig, dtype: torch.dtype | None = None):
    """What the client holds: token embeddings, the final norm and the LM head (tied if the config says so)."""
    model = meta_model(config)
    wmap = weight_map(path)
    dtype = dtype or _stored_dtype(path, wmap, config)
    base = getattr(model, model.base_model_prefix)
    prefix = _prefix(model, wmap)
    embed = _materialise(base.embed_tokens, f"{prefix}embed_tokens.", path, wmap, dtype)
    norm = _materialise(base.norm, f"{prefix}norm.", path, wmap, dtype)
    head = model.get_output_embeddings()
    if "lm_head.weight" in wmap:
        _materialise(head, "lm_head.", path, wmap, dtype)
    elif getattr(config, "tie_word_embeddings", False):
        head.weight = embed.weight
    else:
        raise UnsupportedArchitectureError(f"checkpoint at {path} has no lm_head.weight and does not tie embeddings")
    for m in (embed, norm, head):
        _check_no_meta(m)
    return model.config, embed.eval(), norm.eval(), head.eval(), dtype


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stored_dtype(path: Path, wmap: dict[str, str], config: PreTrainedConfig) -> torch.dtype:
    """The config's dtype, else the dtype the first weight is stored in (read from the header only)."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(getattr(torch, dt, None) if isinstance(dt, str) else dt, torch.dtype):
        return checkpoint_dtype(config, torch.float32)  # the config says: no shard needs opening
    name = next(k for k in wmap if k.endswith("weight"))
    ensure_files(path, [wmap[name]])
    with safe_open(path / wmap[name], framework="pt") as f:
        stored = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype(), torch.float32)
    return checkpoint_dtype(config, stored)


def _check_no_meta(module: nn.Module) -> None:
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise UnsupportedArchitectureError(f"tensors {left[:3]} were not found in the checkpoint or computed")
