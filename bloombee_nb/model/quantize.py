"""Weight-only quantized spans: the span's ``nn.Linear`` weights stored in 8 or 4 bits.

A format is applied as a transform over the built span (gpt-fast's habit: no flag threaded through
the layers): :func:`quantize_layers` swaps the decoder layers' linear weights for the library's own
quantized tensors right after ``load_span`` read them, so a stage holds only the quantized bytes
(plus one layer's float weights while it is converted). Activations, KV cache, norms, embeddings
and the LM head stay in the checkpoint's dtype.

Libraries, chosen by measurement on this CPU (``benchmarks/results/quantize.md``):

- ``int8`` — torchao's ``Int8WeightOnlyConfig`` (one scale per output channel). Weight-only, so a
  token's output never depends on what else is in the batch (merged steps stay exact), and on the
  CPU a decode step is a little *faster* than float32. torchao is PyTorch's own quantization
  library: no dependencies, and the same config runs on CUDA.
- ``nf4`` (alias ``int4``) — bitsandbytes' NF4 (4-bit NormalFloat, one absmax per 64 weights),
  the format Petals and QLoRA serve. torchao's 4-bit weight-only tensors have no packed CPU kernel
  in 0.18 (stored one int4 per byte: no memory saved); bitsandbytes' CPU backend packs two per
  byte and decodes faster than float32. Its limit: every linear layer's input size must be a
  multiple of 64 (the block size); other shapes get a :class:`QuantizationError`.

The exactness contract: a span quantized here holds bit-identical tensors to the ones
transformers' own quantizer makes for the same layers (:func:`reference_config` gives that
config), so distributed greedy output equals single-process transformers loading the checkpoint
with ``quantization_config=reference_config(fmt)``, token for token (``tests/model/test_quantize.py``).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BloombeeError


class QuantizationError(BloombeeError, ValueError):
    """A quantization format that is unknown, not installed, or does not fit the span's layers."""


@dataclass(frozen=True)
class QuantFormat:
    name: str           # what users write: "int8", "nf4"
    library: str        # the pip distribution that implements it
    module: str         # its import name
    bits: int           # bits per stored weight
    block: int          # weights per scale (0: one scale per output channel)
    scale_bytes: int    # bytes per scale

    def weight_bytes(self, rows: int, cols: int) -> int:
        """Stored bytes of a ``[rows, cols]`` linear weight in this format (the planner's estimate;
        :func:`weight_bytes` measures the real tensors)."""
        scales = rows if self.block == 0 else rows * cols // self.block
        return rows * cols * self.bits // 8 + scales * self.scale_bytes


FORMATS = {
    "int8": QuantFormat("int8", "torchao", "torchao", bits=8, block=0, scale_bytes=4),
    "nf4": QuantFormat("nf4", "bitsandbytes", "bitsandbytes", bits=4, block=64, scale_bytes=4),
}
ALIASES = {"int4": "nf4"}
INSTALL_HINT = 'pip install -e ".[quant]" (torchao and bitsandbytes)'


def canonical(fmt: str | None) -> str | None:
    """The canonical name of ``fmt`` (``None``/"none"/"fp32" = no quantization). A client checks only
    this: the library has to be installed where the span is built (:func:`check_format`)."""
    if fmt is None or fmt in ("none", "fp32", "float"):
        return None
    name = ALIASES.get(fmt, fmt) if isinstance(fmt, str) else None
    if name not in FORMATS:
        raise QuantizationError(f"unknown quantization format {fmt!r}; use one of "
                                f"{sorted([*FORMATS, *ALIASES])} or None for the checkpoint's own dtype")
    return name


def check_format(fmt: str | None) -> str | None:
    """:func:`canonical`, with the format's library importable here."""
    name = canonical(fmt)
    if name is None:
        return None
    lib = FORMATS[name]
    if importlib.util.find_spec(lib.module) is None:
        raise QuantizationError(f"quantize={fmt!r} needs the {lib.library!r} package on this worker: {INSTALL_HINT}")
    return name


def per_stage(quantize, n_stages: int) -> list[str | None]:
    """One canonical format per stage from ``quantize``: one format for all, or a list of one per stage."""
    if isinstance(quantize, (list, tuple)):
        if len(quantize) != n_stages:
            raise QuantizationError(f"quantize lists {len(quantize)} formats for {n_stages} stages; give one per "
                                    "stage (None for a float stage) or a single format for all")
        return [canonical(q) for q in quantize]
    return [canonical(quantize)] * n_stages


def reference_config(fmt: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' quantization config that makes the same tensors as :func:`quantize_layers`:
    ``from_pretrained(path, quantization_config=reference_config(fmt))`` is the single-process
    reference of a span quantized with ``fmt`` (the LM head stays unquantized in both)."""
    import transformers

    name = check_format(fmt)
    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["lm_head"])
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=False,
                                           bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=["lm_head"])


def quantize_layers(layers: nn.Module, fmt: str | None, dtype: torch.dtype) -> None:
    """Replace the linear weights of ``layers`` (already holding real weights) by ``fmt``'s, in place,
    exactly as transformers' quantizer for :func:`reference_config` does at load time."""
    name = check_format(fmt)
    if name is None:
        return
    _check_shapes(layers, FORMATS[name])
    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(layers, Int8WeightOnlyConfig())
    else:
        _to_nf4(layers, reference_config(name, dtype))
    _release_checkpoint(layers)


def _release_checkpoint(layers: nn.Module) -> None:
    """Let go of the memory-mapped checkpoint and the freed float weights. The parameters left in float
    (norms, biases) are views of the mapped file and keep every page of it that quantizing read
    resident; copies of them free the mapping. Then glibc is asked to return its freed heap. (Measured on
    a 4-layer stage of a 58M Llama: 114 MB resident after int8 without this, for 13 MB of weights.)"""
    for p in layers.parameters():
        if type(p) is nn.Parameter and not p.is_meta and p.device.type == "cpu":
            p.data = p.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _check_shapes(layers: nn.Module, fmt: QuantFormat) -> None:
    for path, m in layers.named_modules():
        if fmt.library == "torchao" and isinstance(m, nn.Linear) and type(m) is not nn.Linear:
            raise QuantizationError(  # e.g. FalconLinear: `x @ weight.T`, which torchao's Int8Tensor cannot run
                f"{fmt.name} ({fmt.library}) cannot run linear layer {path!r} of type {type(m).__name__} (it uses its "
                "weight outside F.linear; transformers' own TorchAoConfig fails on it too); use quantize='nf4' or None")
        if type(m) is nn.Linear and fmt.block and m.in_features % fmt.block:
            raise QuantizationError(
                f"{fmt.name} ({fmt.library}) quantizes blocks of {fmt.block} inputs, but linear layer {path!r} takes "
                f"{m.in_features}; use quantize='int8' (or None) for this model")


def _to_nf4(layers: nn.Module, config) -> None:
    """bitsandbytes' Linear4bit in place of each nn.Linear: transformers' ``replace_with_bnb_linear``
    makes the modules, and each weight is quantized as its ``Bnb4bitQuantize`` does."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    floats = {p: (m.weight.data, m.bias) for p, m in layers.named_modules() if type(m) is nn.Linear}
    training = layers.training
    replace_with_bnb_linear(layers, quantization_config=config)
    # The new Linear4bit modules start in training mode; on the CPU bitsandbytes takes its packed
    # inference kernel only in eval mode, as transformers' model (always eval) does: same mode, same sums.
    layers.train(training)
    for path, (weight, bias) in floats.items():
        module = layers.get_submodule(path)
        old = module.weight
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **old.__dict__).to(weight.device)
        if bias is not None:
            module.bias = nn.Parameter(bias.data, requires_grad=False)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized) parameter really stores: a tensor subclass's inner tensors
    (torchao), bitsandbytes' packed data plus its block scales, or a plain tensor's."""
    if t.is_meta:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    state = getattr(t, "quant_state", None)
    extra = 0 if state is None else state.absmax.numel() * state.absmax.element_size()  # (code: one shared table)
    return t.numel() * t.element_size() + extra


def weight_bytes(module: nn.Module) -> int:
    """Stored bytes of ``module``'s parameters, quantized ones counted as stored."""
    return sum(tensor_bytes(p) for p in module.parameters())


def measure_formats(path, formats=("int8", "nf4"), num_threads: int = 1, repeats: int = 30, context: int = 16) -> dict:
    """What the planner needs per format, measured where this runs (a worker: ``client.submit``): one
    layer's stored bytes, and its decode step's time ÷ the float layer's (median of ``repeats``).

    Returns ``{"layer_weight_bytes": {fmt: bytes}, "format_decode_factor": {fmt: factor}}`` — the
    values of ``ModelProfile.format_weight_bytes`` and ``WorkerProfile.format_decode_factor``.
    """
    import statistics
    import time

    from .span import SpanRunner

    torch.set_num_threads(num_threads)
    seconds, nbytes = {}, {}
    for fmt in (None, *formats):
        span = SpanRunner(path, 0, 1, quantize=fmt)
        d, one = span.hidden_size, torch.ones(1, 1, dtype=torch.long)
        span.open("m", 1, context + 1)
        span.forward("m", torch.randn(1, context, d, dtype=span.dtype), torch.arange(context)[None],
                     torch.ones(1, context, dtype=torch.long))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            span.forward("m", torch.randn(1, 1, d, dtype=span.dtype), torch.full((1, 1), context), one)
            times.append(time.perf_counter() - t0)
            span.rollback("m", context)
        seconds[fmt], nbytes[fmt] = statistics.median(times), span.weight_bytes
    return {"layer_weight_bytes": {f: nbytes[f] for f in formats},
            "format_decode_factor": {f: seconds[f] / seconds[None] for f in formats}}
