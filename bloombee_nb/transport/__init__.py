"""The wire format: tensors as frames (header + raw or blosc2-compressed bytes), never pickled."""

from .choice import (DEFAULT_CANDIDATES, CodecPolicy, CodecStats, break_even_bandwidth_Bps, calibrate, calibrate_sizes,
                     choose_codec)
from .codec import RAW, Codec
from .frame import CODECS, DTYPES, Frame, decode, encode

__all__ = ["CODECS", "DEFAULT_CANDIDATES", "DTYPES", "RAW", "Codec", "CodecPolicy", "CodecStats", "Frame",
           "break_even_bandwidth_Bps", "calibrate", "calibrate_sizes", "choose_codec", "decode", "encode"]
