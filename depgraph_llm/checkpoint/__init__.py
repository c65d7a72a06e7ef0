"""Checkpoint I/O: load models (HF folders, GGUF), write slim checkpoints atomically, describe and export them."""
