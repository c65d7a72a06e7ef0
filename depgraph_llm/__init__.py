"""depgraph-llm: dependency-graph structural pruning for Hugging Face causal language models."""
from depgraph_llm.graph.coupling import CouplingGraph, build_coupling
from depgraph_llm.graph.groups import Group, GroupKind, Slice
from depgraph_llm.checkpoint.loading import load_pruned
from depgraph_llm.graph.trace import trace_model

__all__ = ["CouplingGraph", "Group", "GroupKind", "Slice", "build_coupling", "load_pruned", "trace_model"]
__version__ = "0.1.0"
