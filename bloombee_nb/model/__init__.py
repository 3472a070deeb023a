"""Loading a checkpoint a span at a time and running the family's own decoder layers."""

from .family import SUPPORTED_FAMILIES
from .span import SpanRunner

__all__ = ["SUPPORTED_FAMILIES", "SpanRunner"]
