"""Evaluation: perplexity under a fixed protocol (more measures join here)."""
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
