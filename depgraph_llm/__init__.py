"""depgraph-llm: dependency-graph structural pruning for Hugging Face causal language models."""
from .coupling import CouplingGraph, build_coupling
from .groups import Group, GroupKind, Slice
from .loading import load_pruned
from .trace import trace_model

__all__ = ["CouplingGraph", "Group", "GroupKind", "Slice", "build_coupling", "load_pruned", "trace_model"]
__version__ = "0.1.0"
