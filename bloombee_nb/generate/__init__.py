"""Sessions, HF-compatible generation and speculative decoding over the chain of stages."""

from .model import DistributedModelForCausalLM
from .session import InferenceSession
from .speculative import RoundTrace, SpeculationSummary, load_draft
from .tree_size import AcceptanceStats, ChainCost, TreePolicy, choose_widths

__all__ = ["AcceptanceStats", "ChainCost", "DistributedModelForCausalLM", "InferenceSession", "RoundTrace",
           "SpeculationSummary", "TreePolicy", "choose_widths", "load_draft"]
