"""Lossless compression of real hidden states: ratio and speed of every frame codec.

Hidden states come from the shipped trained model (``tiny-llama``, 6 layers, hidden 256) fed a
CPython stdlib source file it never saw in training (``calendar.py``, held out by the training
script), taken after layer 3 of 6 (``output_hidden_states[3]``). The model runs in each dtype
(fp32, fp16, bf16), so the states are what a model in that dtype would send.

* prefill: 128 tokens, batch 1 and 16 (16 consecutive 128-token windows of the file);
* decode: 1 token, batch 1 and 16 — the state of the last window position, which is exactly what
  a decode step with a KV cache produces for that token.

For each case every frame codec is timed through ``transport.encode`` / ``transport.decode`` (the
whole frame: plane split, blosc2, CRC32, header, copies), one thread, median of batched repeats.
References, timed on the bare bytes (no framing, no CRC — slightly in their favour):

* ``zstd-N plain``: zstd of the raw bytes (the ``zstandard`` package if installed, else blosc2
  ZSTD with no filter — the JSON says which);
* ``zstd-N hi-split``: the high byte of every element in its own lane and the remaining bytes in a
  second lane, each zstd-compressed separately (BloomBee's lossless wrapper, which defaults to
  zstd level 1).

ratio = tensor bytes / compressed bytes (our codec block and blosc2 chunk headers counted, the
frame's base header not, as a raw frame has it too). MB/s = tensor bytes (1e6) per second.
break-even = link bandwidth below which compress + send + decompress beats sending raw
(see ``bloombee_nb/transport/choice.py``).

    python benchmarks/bench_compression.py            # ~1 min on 2 cores
    python benchmarks/bench_compression.py --quick    # fewer repeats

Writes benchmarks/results/compression.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from bloombee_nb import transport
from bloombee_nb.transport import RAW, Codec, CodecStats, choose_codec
from bloombee_nb.transport.choice import DEFAULT_CANDIDATES, timed_s
from _common import RESULTS, shipped_model, stamp, write_json

LAYER = 3
PROMPT = 128
BATCHES = (1, 16)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: the issue's emulated links (bytes/s) for the "what gets chosen" table
SUMMARY = ["lz4-5+bitshuffle", "lz4-5+bitshuffle+hiplane", "zstd-1+shuffle", "zstd-1+planes", "zstd-1+hiplane",
           "zstd-1+bytedelta", "zstd-3+shuffle", "zstd-1 plain", "zstd-1 hi-split (BloomBee)"]
LINKS = {"1 Gbit/s": 125e6, "100 Mbit/s": 12.5e6, "12.5 Mbit/s": 1.5625e6}


def codec_grid() -> list[Codec]:
    grid = [RAW]
    for name, level in (("lz4", 5), ("zstd", 1)):
        grid += [Codec(name, level, f) for f in ("none", "shuffle", "bitshuffle", "bytedelta")]
        grid += [Codec(name, level, f, p) for p in ("all", "high") for f in ("none", "bitshuffle")]
    grid += [Codec("zstd", 3, "shuffle"), Codec("zstd", 3, "bitshuffle"), Codec("zstd", 3, "none", "all"),
             Codec("zstd", 3, "none", "high"), Codec("lz4", 1, "bitshuffle"), Codec("lz4", 9, "bitshuffle"),
             Codec("lz4hc", 5, "bitshuffle"), Codec("blosclz", 5, "shuffle"), Codec("zlib", 1, "shuffle")]
    return grid


# --------------------------------------------------------------------------- hidden states
def held_out_text() -> tuple[str, str]:
    from bloombee_nb.shipped.train_tiny import stdlib_files

    for rel, path in stdlib_files():
        if rel == "calendar.py":
            assert zlib.crc32(rel.encode()) % 50 == 0  # held out of the model's training set
            return rel, path.read_text(encoding="utf-8")
    raise FileNotFoundError("calendar.py not found in the stdlib")


def hidden_states(dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    """[16, 128, 256] states after layer LAYER, computed by the model in ``dtype``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shipped_model(), dtype=dtype).eval()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    h = out.hidden_states[LAYER]
    assert h.dtype == dtype and torch.isfinite(h.float()).all()
    return h.contiguous()


def cases(h: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for b in BATCHES:
        out[f"prefill {PROMPT}t b{b}"] = h[:b].contiguous()
        out[f"decode 1t b{b}"] = h[:b, -1:].contiguous()
    return out


# --------------------------------------------------------------------------- timing
def measure_frame(t: torch.Tensor, codec: Codec, repeats: int, raw_header: int) -> dict:
    frame = transport.encode(t, codec)
    back = transport.decode(frame)
    assert torch.equal(back.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), codec
    enc = timed_s(lambda: transport.encode(t, codec), repeats)
    dec = timed_s(lambda: transport.decode(frame), repeats)
    return dict(codec=str(codec), kind="frame", wire_nbytes=len(frame), comp_nbytes=len(frame) - raw_header,
                encode_s=enc, decode_s=dec)


class References:
    """Plain zstd and BloomBee-style hi-split zstd on the bare bytes."""

    def __init__(self):
        try:
            import zstandard

            self.impl = f"zstandard {zstandard.__version__}"
            self._c = lambda lvl: zstandard.ZstdCompressor(level=lvl).compress
            self._d = lambda: zstandard.ZstdDecompressor().decompress
        except ImportError:
            import blosc2

            self.impl = f"blosc2 {blosc2.__version__} ZSTD, no filter (zstandard not installed)"
            self._c = lambda lvl: (lambda b: blosc2.compress2(b, codec=blosc2.Codec.ZSTD, clevel=(lvl + 1) // 2,
                                                              typesize=1, filters=[blosc2.Filter.NOFILTER],
                                                              nthreads=1))
            self._d = lambda: (lambda b, max_output_size=0: blosc2.decompress2(b, nthreads=1))

    def measure(self, t: torch.Tensor, level: int, split: bool, repeats: int) -> dict:
        u8 = t.reshape(-1).view(torch.uint8).numpy()
        k = t.element_size()
        comp, dec = self._c(level), self._d()
        if not split:
            raw = u8.tobytes()
            c = comp(raw)
            assert dec(c, max_output_size=len(raw)) == raw
            enc_s = timed_s(lambda: comp(u8.tobytes()), repeats)
            dec_s = timed_s(lambda: dec(c, max_output_size=len(raw)), repeats)
            nbytes = len(c)
        else:
            def compress():
                m = u8.reshape(-1, k)
                return comp(np.ascontiguousarray(m[:, -1]).tobytes()), comp(np.ascontiguousarray(m[:, :-1]).tobytes())

            def decompress(parts):
                n = u8.size // k
                hi = np.frombuffer(dec(parts[0], max_output_size=n), np.uint8)
                rest = np.frombuffer(dec(parts[1], max_output_size=n * (k - 1)), np.uint8).reshape(n, k - 1)
                out = np.empty((n, k), np.uint8)
                out[:, -1] = hi
                out[:, :-1] = rest
                return out

            parts = compress()
            assert (decompress(parts).reshape(-1) == u8).all()
            enc_s = timed_s(compress, repeats)
            dec_s = timed_s(lambda: decompress(parts), repeats)
            nbytes = len(parts[0]) + len(parts[1])
        name = f"zstd-{level} {'hi-split (BloomBee)' if split else 'plain'}"
        return dict(codec=name, kind="reference", wire_nbytes=None, comp_nbytes=nbytes, encode_s=enc_s,
                    decode_s=dec_s)


# --------------------------------------------------------------------------- main
def run(repeats: int) -> dict:
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    rel, text = held_out_text()
    tok = AutoTokenizer.from_pretrained(shipped_model())
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = max(BATCHES) * PROMPT
    assert ids.numel() >= n, f"{rel} has only {ids.numel()} tokens"
    ids = ids[:n].reshape(max(BATCHES), PROMPT)
    refs = References()
    rows = []
    for dname, dtype in DTYPES.items():
        h = hidden_states(dtype, ids)
        for case, t in cases(h).items():
            raw_nbytes = t.numel() * t.element_size()
            raw_header = len(transport.encode(t)) - raw_nbytes
            base = dict(dtype=dname, case=case, shape=list(t.shape), raw_nbytes=raw_nbytes)
            found = [measure_frame(t, c, repeats, raw_header) for c in codec_grid()]
            found += [refs.measure(t, lvl, split, repeats) for split in (False, True) for lvl in (1, 3)]
            raw = found[0]
            for r in found:
                r.update(base)
                r["ratio"] = raw_nbytes / r["comp_nbytes"] if r["comp_nbytes"] else 1.0
                r["compress_MBps"] = raw_nbytes / r["encode_s"] / 1e6
                r["decompress_MBps"] = raw_nbytes / r["decode_s"] / 1e6
                saved = raw["comp_nbytes"] - r["comp_nbytes"]
                extra = r["encode_s"] + r["decode_s"] - raw["encode_s"] - raw["decode_s"]
                r["break_even_MiBps"] = (0.0 if saved <= 0 else math.inf if extra <= 0 else saved / extra / 2**20)
                rows.append(r)
            print(f"{dname} {case}: {len(found)} codecs", file=sys.stderr)
    meta = dict(
        model=shipped_model().split("bloombee_nb/")[-1], text=f"stdlib {rel} (held out of training)",
        tokens=n, layer=f"hidden_states[{LAYER}] (after layer {LAYER} of 6)", hidden=256,
        timing="median of batched repeats, 1 thread; frame codecs timed end to end (encode/decode)",
        reference_impl=refs.impl, repeats=repeats)
    return dict(meta=meta, rows=rows)


def choices(rows: list[dict]) -> list[dict]:
    """What choose_codec picks per link, from these measurements (default candidates and full grid)."""
    out = []
    for (dname, case) in dict.fromkeys((r["dtype"], r["case"]) for r in rows):
        frames = [r for r in rows if r["dtype"] == dname and r["case"] == case and r["kind"] == "frame"]
        stats = [CodecStats(Codec.parse(r["codec"]), r["raw_nbytes"], r["wire_nbytes"], r["encode_s"],
                            r["decode_s"]) for r in frames]
        default = [s for s in stats if s.codec in DEFAULT_CANDIDATES]
        raw = stats[0]
        for link, bw in LINKS.items():
            for label, pool in (("default", default), ("grid", stats)):
                c = choose_codec(pool, bw)
                s = next(x for x in pool if x.codec == c)
                out.append(dict(dtype=dname, case=case, link=link, pool=label, codec=str(c),
                                speedup=raw.time_s(bw) / s.time_s(bw)))
    return out


def fmt(x: float, nd=0) -> str:
    if x == math.inf:
        return "∞"
    return f"{x:,.{nd}f}"


def markdown(res: dict) -> str:
    rows, meta, host = res["rows"], res["meta"], res["machine"]
    dts, case_names = list(DTYPES), list(dict.fromkeys(r["case"] for r in rows))
    names = list(dict.fromkeys(r["codec"] for r in rows))
    get = {(r["dtype"], r["case"], r["codec"]): r for r in rows}
    big = f"prefill {PROMPT}t b{max(BATCHES)}"
    lines = [
        "# Lossless compression of real hidden states",
        "",
        f"Model `{meta['model']}` (hidden {meta['hidden']}), {meta['layer']}, text: {meta['text']}. "
        f"One CPU thread ({host['processor']}, {host['cpus']} shared cores), blosc2 {host['blosc2']}. "
        f"Frame codecs are timed end to end through `transport.encode`/`decode` (plane split, blosc2, CRC32, "
        f"copies); references on bare bytes with {meta['reference_impl']}. "
        "ratio = tensor bytes / compressed bytes. Labels: `name-level[+filter][+planes|+hiplane]` "
        "(`planes`: whole-tensor byte planes; `hiplane`: only the exponent byte plane compressed).",
        "",
        "## Summary (for the README)",
        "",
        f"ratio for prefill ({PROMPT} tokens × batch {max(BATCHES)}) / decode (1 token × batch 1); speeds on the "
        "prefill frame.",
        "",
        "| codec | " + " | ".join(f"{d} ratio P / D | {d} comp / decomp MB/s" for d in dts) + " |",
        "|---|" + "---:|" * (2 * len(dts)),
    ]
    small = f"decode 1t b{min(BATCHES)}"
    for n in SUMMARY:
        cells = []
        for d in dts:
            p, q = get[(d, big, n)], get[(d, small, n)]
            cells += [f"{p['ratio']:.2f} / {q['ratio']:.2f}", f"{fmt(p['compress_MBps'])} / {fmt(p['decompress_MBps'])}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Ratio (all cases; b = batch, t = tokens; {big} is "
        f"{get[('fp32', big, 'raw')]['raw_nbytes'] // 1024} KiB in fp32)",
        "",
        "| codec | " + " | ".join(f"{d} {c}" for d in dts for c in case_names) + " |",
        "|---|" + "---:|" * (len(dts) * len(case_names)),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{get[(d, c, n)]['ratio']:.3f}" for d in dts for c in case_names) + " |")
    lines += [
        "",
        f"## Speed, {big} (MB/s of tensor bytes; break-even = link speed below which it beats raw)",
        "",
        "| codec | " + " | ".join(f"{d} {x}" for d in dts for x in ("ratio", "comp MB/s", "decomp MB/s",
                                                                          "break-even MiB/s")) + " |",
        "|---|" + "---:|" * (4 * len(dts)),
    ]
    for n in names:
        cells = []
        for d in dts:
            r = get[(d, big, n)]
            cells += [f"{r['ratio']:.3f}", fmt(r["compress_MBps"]), fmt(r["decompress_MBps"]),
                      "—" if n == "raw" else fmt(r["break_even_MiBps"], 1)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Best break-even per case (MiB/s; links slower than this should compress)", "",
              "| dtype | " + " | ".join(case_names) + " |", "|---|" + "---:|" * len(case_names)]
    for d in dts:
        cells = []
        for c in case_names:
            best = max((get[(d, c, n)] for n in names if get[(d, c, n)]["kind"] == "frame" and n != "raw"),
                       key=lambda r: r["break_even_MiBps"])
            cells.append(f"{fmt(best['break_even_MiBps'], 1)} ({best['codec']})")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    ch = res["choices"]
    lines += ["", "## What `choose_codec` picks per link (default candidates; speed-up of one frame vs raw)", "",
              "| dtype | case | " + " | ".join(LINKS) + " |", "|---|---|" + "---|" * len(LINKS)]
    for d in dts:
        for c in case_names:
            cells = [next(f"{x['codec']} ×{x['speedup']:.2f}" for x in ch if x["dtype"] == d and x["case"] == c
                          and x["link"] == link and x["pool"] == "default") for link in LINKS]
            lines.append(f"| {d} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = f"prefill {PROMPT}t b{max(BATCHES)}"
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), sharey=False)
    style = {"none": ("o", "tab:blue"), "all": ("s", "tab:green"), "high": ("^", "tab:orange")}
    for ax, d in zip(axes, DTYPES):
        rows = [r for r in res["rows"] if r["dtype"] == d and r["case"] == big and r["codec"] != "raw"]
        for r in rows:
            if r["kind"] == "reference":
                ax.scatter(r["compress_MBps"], r["ratio"], marker="*", s=160, color="black", zorder=3)
            else:
                m, col = style[Codec.parse(r["codec"]).planes]
                ax.scatter(r["compress_MBps"], r["ratio"], marker=m, color=col, alpha=0.8)
            if r["codec"] in SUMMARY or r["kind"] == "reference":  # label the notable ones only
                ax.annotate(r["codec"], (r["compress_MBps"], r["ratio"]), fontsize=7, alpha=0.85,
                            xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(f"{d}: {big} ({rows[0]['raw_nbytes'] // 1024} KiB)")
        ax.set_xlabel("compress MB/s (frame, 1 thread)")
        ax.set_ylabel("ratio")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, color=c, ls="", label=f"planes={k}") for k, (m, c) in style.items()]
    handles.append(plt.Line2D([], [], marker="*", color="black", ls="", ms=12, label="zstd references"))
    axes[0].legend(handles=handles, loc="lower left", fontsize=8)
    fig.suptitle("Lossless compression of real hidden states (tiny-llama, layer 3, held-out stdlib text)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def finite(x):
    """JSON has no Infinity: write it as the string "inf"."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.time()
    res = stamp(run(3 if args.quick else 7))
    res["choices"] = choices(res["rows"])
    res["meta"]["wall_s"] = round(time.time() - t0, 1)
    write_json("compression", finite(res), args.out)
    md = markdown(res)
    (args.out / "compression.md").write_text(md)
    plot(res, args.out / "compression.png")
    print(md)
    print(f"wrote {args.out}/compression.{{json,md,png}} in {res['meta']['wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
