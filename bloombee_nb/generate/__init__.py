"""Sessions and HF-compatible generation over the chain of stages."""

from .model import DistributedModelForCausalLM
from .session import InferenceSession

__all__ = ["DistributedModelForCausalLM", "InferenceSession"]
