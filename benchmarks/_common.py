"""What every benchmark shares: where results go, what machine and command made them, test models.

Every result JSON records the command line that made it (:func:`command`) and the machine it ran
on (:func:`machine`), so a number in the README can be traced to a file and the file to a command.
:func:`write_json` stamps both. Checkpoints are built from transformers configs and saved with
``save_pretrained`` once per folder (no downloads); the shipped tiny model needs no building.

``BLOOMBEE_BENCH_RESULTS=/some/dir`` sends results elsewhere (a trial run that must not overwrite
the committed ones).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BLOOMBEE_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this benchmark, as typed from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *argv[1:]])


def machine() -> dict:
    """The machine and the versions that matter to a number: CPU, cores, load when it started, libraries."""
    import numpy
    import torch

    out = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
               cpus=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()],
               torch_threads=torch.get_num_threads(), python=platform.python_version(),
               torch=torch.__version__, numpy=numpy.__version__)
    for name in ("transformers", "dask", "distributed", "blosc2"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    for dist in ("torchao", "bitsandbytes"):  # their CPU kernels decide what a quantized stage costs
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    out.update(_cpu())
    return out


def _cpu() -> dict:
    """The CPU's model name and vector extensions (Linux), which decide which kernels torch and the
    quantization libraries run; empty elsewhere."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(key)), "")  # noqa: E731
    flags = set(field("flags").split())
    return dict(cpu_model=field("model name"), cpu_vector=sorted(f for f in flags if f.startswith(("avx", "amx"))))


def stamp(result: dict) -> dict:
    """``result`` with ``command`` and ``machine`` first (kept when the benchmark set them itself)."""
    return {"command": command(), "machine": machine(), **result}


def write_json(stem: str, result: dict, out: Path | None = None) -> Path:
    """Write :func:`stamp` ``(result)`` to ``<out>/<stem>.json`` (default :data:`RESULTS`); returns the path."""
    out = RESULTS if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(stamp(result), indent=1))
    return path


def shipped_model() -> str:
    """The trained tiny-llama shipped with the package (6 layers, hidden 256)."""
    from bloombee_nb.shipped import default_model_path

    return str(default_model_path())


def random_checkpoint(folder: Path, family: str = "llama", seed: int = 0, **config) -> str:
    """A random-init checkpoint of ``family`` built from its config and saved once into ``folder``
    (kept when it is already there: a config change needs a new folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    folder = Path(folder)
    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config)).eval().save_pretrained(folder)
    return str(folder)


#: ~58M parameters: the size of the Llama the Petals comparison used.
SYNTHETIC_58M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
#: 16x the shipped model's per-layer compute (hidden 1024; ~10 ms per 2-layer decode step on one core).
WIDE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
            num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.05)


def scratch(name: str) -> Path:
    """A folder under the temp dir for a benchmark's checkpoints and logs (kept between runs)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bloombee-bench-{name}"
    path.mkdir(parents=True, exist_ok=True)
    return path
