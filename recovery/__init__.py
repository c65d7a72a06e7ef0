"""Recovery after pruning without training: least-squares reconstruction (`least_squares.py`).

Training-based recovery (LoRA, mask-aware fine-tuning) and the bias/OBS reconstructions are still to come.
"""
