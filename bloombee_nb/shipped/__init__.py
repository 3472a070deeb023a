"""Tiny trained Llama pair shipped with the package, for offline demos and tests.

``tiny-llama`` is the target model (6 layers, grouped-query attention) and
``tiny-llama-draft`` a 2-layer draft for speculative decoding; both share one
byte-level BPE tokenizer and were trained on the CPython standard library by
``train_tiny.py`` (see README.md here). Import-light: no torch at import time.
"""

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
TARGET_PATH = SHIPPED_DIR / "tiny-llama"
DRAFT_PATH = SHIPPED_DIR / "tiny-llama-draft"


def default_model_path() -> str:
    """Path of the shipped target model, usable with ``from_pretrained``."""
    return str(TARGET_PATH)


__all__ = ["SHIPPED_DIR", "TARGET_PATH", "DRAFT_PATH", "default_model_path"]
