"""Sessions, HF-compatible generation and speculative decoding over the chain of stages."""

from .deployment import Deployment
from .model import DistributedModelForCausalLM
from .options import DeployConfig
from .session import InferenceSession
from .speculative import RoundTrace, SpeculationSummary, load_draft
from .tree_size import AcceptanceStats, ChainCost, TreePolicy, choose_widths

__all__ = ["AcceptanceStats", "ChainCost", "DeployConfig", "Deployment", "DistributedModelForCausalLM", "InferenceSession", "RoundTrace",
           "SpeculationSummary", "TreePolicy", "choose_widths", "load_draft"]
