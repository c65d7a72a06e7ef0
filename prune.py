#!/usr/bin/env python
"""Prune a Hugging Face causal LM: `python prune.py [--model PATH] --ratio 0.25 [--out DIR] ...`."""
import sys

from depgraph_llm.cli import prune_main

if __name__ == "__main__":
    sys.exit(prune_main())
