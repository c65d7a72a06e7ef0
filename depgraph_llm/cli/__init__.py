"""The command line: `depgraph-llm prune|apply|recover|info|export|graph|eval` and `prune.py`."""
from depgraph_llm.cli.commands import main, prune_main

__all__ = ["main", "prune_main"]
