"""Recovery after pruning (LoRA, mask-aware training, retrain-free reconstruction).

Nothing lives here yet: the foundation issue ships pruning without recovery; the recovery issues add modules
to this package.
"""
