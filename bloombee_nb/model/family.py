"""Model families: which architectures we can cut into spans, and how to build their parts.

Over 400 lines because it is the one module that knows how families differ: the adapter table, the
config checks that refuse what this runtime does not implement, and the checkpoint materialisation
(transformers' layout conversions included) that the adapters' module names drive; ``span.py`` and
the client stay family-blind by calling it.

We never re-implement a block. The family's own ``*ForCausalLM`` is instantiated on the meta
device (no memory), and the modules we need — a span of decoder layers, or the embeddings,
final norm and LM head — are taken from it and materialised from the checkpoint's tensors.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..errors import SpanError, UnsupportedArchitectureError
from .checkpoint import ensure_files, load_tensors, weight_map


@dataclass(frozen=True)
class Adapter:
    """What differs between decoder families, as data. Module names are attributes of the base model
    (``model.model`` for Llama, ``model.transformer`` for Falcon); the client math names *config
    attributes* that the family's own ``*ForCausalLM.forward`` reads. Everything else — the blocks,
    Gemma's embedding scale (inside transformers' scaled-embedding module), per-layer attention
    types (``config.layer_types``), rotary per layer type (the rotary module's ``layer_type``
    argument), the cache keyword of a layer — is read from transformers' own modules and configs."""

    layers: str = "layers"                    # the ModuleList of decoder layers
    norm: str = "norm"                        # the final norm (client)
    embed_norm: str | None = None             # a norm on the embeddings, on the client (BLOOM)
    positions: str = "rotary"                 # "rotary" (computed on each stage) or "alibi" (bias from the mask)
    embedding_multiplier: str | None = None   # embeddings * m before the first layer (Granite)
    logit_multiplier: str | None = None       # logits * s (Cohere's logit_scale)
    logit_divisor: str | None = None          # logits / d (Granite's logits_scaling)
    final_softcap: str | None = None          # cap * tanh(logits / cap) (Gemma 2, Gemma 3)
    must_be_off: tuple[str, ...] = ()         # config flags this runtime does not implement (refused if set)


_GEMMA2 = Adapter(final_softcap="final_logit_softcapping", must_be_off=("use_bidirectional_attention",))

#: model_type -> adapter, for the families tested token-exact against transformers
#: (tests/generate/test_exactness.py). Other ``model.layers`` families may work with
#: ``allow_unverified_architecture=True`` and the default :class:`Adapter`.
ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(), "mistral": Adapter(), "qwen2": Adapter(), "qwen3": Adapter(), "phi3": Adapter(),
    "gemma": Adapter(must_be_off=("use_bidirectional_attention",)), "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "mixtral": Adapter(), "qwen3_moe": Adapter(), "olmo2": Adapter(),
    "granite": Adapter(embedding_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
    "cohere": Adapter(logit_multiplier="logit_scale"), "stablelm": Adapter(),
    # layouts other than model.layers
    "gpt_neox": Adapter(norm="final_layer_norm"),
    "falcon": Adapter(layers="h", norm="ln_f", must_be_off=("alibi",)),  # RW-style ALiBi Falcons are refused
    "bloom": Adapter(layers="h", norm="ln_f", embed_norm="word_embeddings_layernorm", positions="alibi"),
}

#: Families tested token-exact (the keys of :data:`ADAPTERS`).
SUPPORTED_FAMILIES = tuple(ADAPTERS)

MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


#: Config attributes by which some families' ``*ForCausalLM`` adds arithmetic around the decoder layers,
#: with the value that makes it a no-op. An unverified family that sets one is refused: without an
#: adapter row the client would skip that arithmetic and the tokens would differ from transformers'.
CLIENT_MATH_CONFIG = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                      "embedding_multiplier": 1.0, "scale_emb": 1.0}


def adapter(config: PreTrainedConfig) -> Adapter:
    return ADAPTERS.get(config.model_type, Adapter())


@dataclass(frozen=True)
class ClientMath:
    """The family's arithmetic around the chain on the client, in the order its ``*ForCausalLM``
    applies it: ``inputs`` on the embeddings before the first stage, ``logits`` after the LM head."""

    embedding_multiplier: float | None = None
    logit_multiplier: float | None = None
    logit_divisor: float | None = None
    final_softcap: float | None = None

    def inputs(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        return hidden if self.embedding_multiplier is None else hidden * self.embedding_multiplier

    def logits(self, logits: torch.Tensor) -> torch.Tensor:  # [B, T, V]
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.final_softcap is not None:  # as Gemma2ForCausalLM: divide, tanh, multiply
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def client_math(config: PreTrainedConfig) -> ClientMath:
    a = adapter(config)
    return ClientMath(**{f.name: getattr(config, getattr(a, f.name)) if getattr(a, f.name) else None
                         for f in fields(ClientMath)})


def load_config(path: Path, allow_unverified: bool = False) -> PreTrainedConfig:
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{config.model_type!r} is an encoder-decoder model; only decoder-only language models can be split "
            f"into spans of decoder layers. Supported: {', '.join(SUPPORTED_FAMILIES)}")
    if getattr(config, "text_config", None) is not None or not hasattr(config, "num_hidden_layers"):
        raise UnsupportedArchitectureError(
            f"{config.model_type!r} ({', '.join(config.architectures or [])}) is a multimodal model: its language "
            "model sits beside a vision or audio tower (config.text_config); only text-only decoder checkpoints "
            f"can be split into spans. Supported: {', '.join(SUPPORTED_FAMILIES)} (for Gemma 3, a gemma3_text "
            "checkpoint)")
    if config.model_type not in SUPPORTED_FAMILIES and not allow_unverified:
        raise UnsupportedArchitectureError(
            f"architecture {config.model_type!r} ({', '.join(config.architectures or [])}) is not supported; "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}. A *ForCausalLM with the same model.layers layout may "
            "work: pass allow_unverified_architecture=True and compare its output with transformers first.")
    if config.model_type not in ADAPTERS:
        odd = [k for k, identity in CLIENT_MATH_CONFIG.items() if getattr(config, k, identity) != identity]
        if odd:
            raise UnsupportedArchitectureError(
                f"{config.model_type!r} sets {', '.join(odd)}: its *ForCausalLM adds arithmetic around the decoder "
                "layers that this runtime applies only for families in its adapter table (ADAPTERS in "
                "bloombee_nb/model/family.py); without a row there the tokens would differ from transformers'. "
                f"Supported: {', '.join(SUPPORTED_FAMILIES)}")
    on = [flag for flag in adapter(config).must_be_off if getattr(config, flag, False)]
    if on:
        raise UnsupportedArchitectureError(
            f"{config.model_type!r} checkpoint sets {', '.join(on)}, which this runtime does not implement for "
            "this family (its outputs would differ from transformers'); use a checkpoint of the family without it")
    return config


def meta_model(config: PreTrainedConfig) -> nn.Module:
    """The family's full ``*ForCausalLM`` with every tensor on the meta device (allocates nothing)."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=_attention_implementation(config))
    except ValueError as exc:  # transformers has no causal LM for this config (encoder-only, vision, …)
        raise UnsupportedArchitectureError(
            f"transformers has no causal language model for {config.model_type!r} ({exc}); only decoder-only "
            f"language models can be split into spans. Supported: {', '.join(SUPPORTED_FAMILIES)}") from None
    base = getattr(model, model.base_model_prefix, None)
    name = adapter(config).layers
    if base is None or not isinstance(getattr(base, name, None), nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no {model.base_model_prefix}.{name} list of decoder layers (a multimodal "
            "model, or a layout this runtime has no adapter for); only decoder-only language models with "
            f"a known layout can be split into spans. Supported: {', '.join(SUPPORTED_FAMILIES)}")
    return model


def _attention_implementation(config: PreTrainedConfig) -> str:
    """SDPA where the family supports it, else its own eager attention (Gemma 2: soft-capped scores),
    as transformers' ``from_pretrained`` chooses."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "eager" if cls is not None and not getattr(cls, "_supports_sdpa", True) else "sdpa"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (a ``*ForCausalLM``), wherever its family keeps them."""
    return getattr(getattr(model, model.base_model_prefix), adapter(model.config).layers)


def layer_prefix(model: nn.Module, prefix: str, i: int) -> str:
    """Checkpoint name prefix of decoder layer ``i`` (``model.layers.7.``)."""
    return f"{prefix}{adapter(model.config).layers}.{i}."


def cache_keyword(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache under (``cache``; ``layer_past`` in GPT-NeoX style)."""
    params = inspect.signature(layer.forward).parameters
    return next((k for k in ("cache", "past_key_values", "layer_past") if k in params), "cache")


def rotary_per_layer_type(rotary: nn.Module) -> bool:
    """True when the family computes separate rotary tables per layer type (Gemma 3: local and global)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


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
                 device: torch.device | None = None, model: nn.Module | None = None) -> nn.Module:
    """Assign ``module`` (on meta) the checkpoint's tensors, cast to ``dtype`` and moved to ``device``
    (one module at a time: host memory holds at most one layer's tensors on their way to a device).
    Buffers the checkpoint does not store (Gemma's ``embed_scale``) are computed by ``model``'s own
    ``_init_weights``, as transformers does when it loads the model."""
    names = [prefix + k for k in module.state_dict()]
    missing = [n for n in names if n not in wmap]
    if missing and model is not None and _checkpoint_keys(model, wmap, prefix):
        return _materialise_converted(module, prefix, path, wmap, dtype, device, model)
    if missing:
        raise UnsupportedArchitectureError(
            f"checkpoint at {path} lacks {missing[:3]}{'…' if len(missing) > 3 else ''}; "
            "its tensor names do not follow the family's layout")
    tensors = load_tensors(path, names, wmap, dtype)
    if device is not None and torch.device(device).type != "cpu":
        tensors = {n: t.to(device) for n, t in tensors.items()}
    module.load_state_dict({n[len(prefix):]: t for n, t in tensors.items()}, strict=True, assign=True)
    if model is not None:
        _compute_buffers(model, module, device)
    return module


def _checkpoint_keys(model: nn.Module, wmap: dict[str, str], prefix: str) -> list[str]:
    """Checkpoint tensor names that become tensors under ``prefix`` of ``model`` once transformers'
    own conversion mapping (renamings such as GPT-NeoX's ``embed_out`` -> ``lm_head``, fused experts)
    has been applied to them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    return [k for k in wmap if k.startswith(prefix) or rename_source_key(k, renamings, converters)[0].startswith(prefix)]


def _materialise_converted(module: nn.Module, prefix: str, path: Path, wmap: dict[str, str], dtype: torch.dtype,
                          device, model: nn.Module) -> nn.Module:
    """The checkpoint stores ``module`` in another layout than the model class (Mixtral's and
    Qwen3-MoE's experts: one tensor per expert, fused in transformers 5; GPT-NeoX's ``embed_out``):
    transformers' own conversion mapping builds the module's tensors from the checkpoint tensors
    that map under ``prefix`` (only those are read), as ``from_pretrained`` does."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    state = load_tensors(path, _checkpoint_keys(model, wmap, prefix), wmap, dtype)
    load = LoadStateDictConfig(pretrained_model_name_or_path=str(path), dtype=dtype,
                               weight_mapping=get_model_conversion_mapping(model))
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        convert_and_load_state_dict_in_model(model, state, load)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    left = [prefix + n for n, t in module.state_dict().items() if t.is_meta]
    if left:
        raise UnsupportedArchitectureError(
            f"checkpoint at {path} lacks {left[:3]}{'…' if len(left) > 3 else ''} (and transformers' weight "
            f"conversion for {model.config.model_type!r} does not produce them); its tensor names do not follow "
            "the family's layout")
    for t in module.parameters():  # the conversion keeps the (meta) model's dtype: cast to the span's, as
        if t.is_floating_point():  # _materialise does (a bf16 MoE span or GPT-NeoX head was left in fp32)
            t.data = t.data.to(dtype)
    if device is not None and torch.device(device).type != "cpu":
        module.to(device)
    _compute_buffers(model, module, device)
    return module


@torch.no_grad()
def _compute_buffers(model: nn.Module, module: nn.Module, device: torch.device | None) -> None:
    """Fill ``module``'s non-persistent buffers still on meta with transformers' own init: loaded
    tensors are marked initialised, which transformers' ``initialization`` functions skip."""
    owners = [m for m in module.modules() if any(b.is_meta for b in m.buffers(recurse=False))]
    if not owners:
        return
    for t in module.parameters():
        t._is_hf_initialized = True
    for m in owners:
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device or "cpu")
        model._init_weights(m)


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
    prefix = _prefix(model, wmap)
    layers = nn.ModuleList(
        _materialise(decoder_layers(model)[i], layer_prefix(model, prefix, i), path, wmap, dtype, device, model)
        for i in range(start, end))
    rotary = new_rotary(model, device)
    _check_no_meta(layers)
    return model.config, layers.eval(), rotary, dtype


def new_rotary(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """The family's rotary embedding for ``model`` (on meta): ``inv_freq`` is computed on the CPU, as
    transformers does at init, then moved to ``device``."""
    base = getattr(model, model.base_model_prefix)
    if adapter(model.config).positions != "rotary":
        return None
    rotary = type(base.rotary_emb)(config=model.config)  # inv_freq is computed, not stored
    return rotary if device is None or torch.device(device).type == "cpu" else rotary.to(device)


def alibi_function(config: PreTrainedConfig, layer: nn.Module):
    """The family's own ``build_alibi_tensor(mask [B, L], num_heads, dtype)`` from the module that
    defines its decoder layer (BLOOM), or None for rotary families."""
    if adapter(config).positions != "alibi":
        return None
    return getattr(sys.modules[type(layer).__module__], "build_alibi_tensor")


class EmbeddingWithNorm(nn.Module):
    """BLOOM's client input: transformers' token embeddings, then its ``word_embeddings_layernorm``.
    (``inputs_embeds`` given by a caller are taken as already normed.)"""

    def __init__(self, embed: nn.Embedding, norm: nn.Module):
        super().__init__()
        self.embed, self.norm = embed, norm

    @property
    def weight(self) -> torch.Tensor:
        return self.embed.weight

    @property
    def num_embeddings(self) -> int:
        return self.embed.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.norm(self.embed(input_ids))


def load_client_parts(path: Path, config: PreTrainedConfig, dtype: torch.dtype | None = None):
    """What the client holds: token embeddings, the final norm and the LM head (tied if the config says so)."""
    model = meta_model(config)
    wmap = weight_map(path)
    dtype = dtype or _stored_dtype(path, wmap, config)
    base = getattr(model, model.base_model_prefix)
    prefix = _prefix(model, wmap)
    embed_module = base.get_input_embeddings()
    embed_name = next(n for n, m in base.named_children() if m is embed_module)
    embed = _materialise(embed_module, f"{prefix}{embed_name}.", path, wmap, dtype, model=model)
    norm_name = adapter(config).norm
    norm = _materialise(getattr(base, norm_name), f"{prefix}{norm_name}.", path, wmap, dtype, model=model)
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)  # lm_head; embed_out in GPT-NeoX
    if _checkpoint_keys(model, wmap, f"{head_name}."):
        _materialise(head, f"{head_name}.", path, wmap, dtype, model=model)
    elif getattr(config, "tie_word_embeddings", False):
        head.weight = embed.weight
    else:
        raise UnsupportedArchitectureError(
            f"checkpoint at {path} has no {head_name}.weight and does not tie embeddings")
    if adapter(config).embed_norm:
        name = adapter(config).embed_norm
        embed = EmbeddingWithNorm(embed, _materialise(getattr(base, name), f"{prefix}{name}.", path, wmap, dtype,
                                                      model=model))
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
