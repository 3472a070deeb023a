"""The wire format: tensors as frames (header + raw bytes), never pickled."""

from .frame import CODECS, DTYPES, Frame, decode, encode

__all__ = ["CODECS", "DTYPES", "Frame", "decode", "encode"]
