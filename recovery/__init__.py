"""Recovery after pruning without training: the layer-by-layer pipeline (`layerwise.py`), the solvers
(`solvers.py`: least squares, FLAP bias compensation, structured OBS) and their driver (`reconstruct.py`).

Training-based recovery (`trainers/`: LoRA merged into the slim weights, mask-aware fine-tuning, full fine-tuning;
`distill.py`: distillation from the dense model; `data.py`: recovery text) is driven by `depgraph_llm/job/recover.py`.
"""
