#!/usr/bin/env python
"""Prune a Hugging Face causal LM: `python prune.py [--model PATH] --ratio 0.25 [--out DIR] ...`."""
import sys

if __name__ == "__main__":
    try:
        from depgraph_llm.cli.commands import prune_main
    except KeyboardInterrupt:  # Ctrl-C while torch/transformers are still importing
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        sys.exit(130)
    sys.exit(prune_main())
