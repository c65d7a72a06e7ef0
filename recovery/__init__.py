"""Recovery after pruning without training: the layer-by-layer pipeline (`layerwise.py`), the solvers
(`solvers.py`: least squares, FLAP bias compensation, structured OBS) and their driver (`reconstruct.py`).

Training-based recovery (LoRA, mask-aware fine-tuning) is still to come.
"""
