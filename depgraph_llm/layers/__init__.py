"""The layer pipeline: one loop over decoder layers that every calibration stage shares (source -> callbacks -> sink)."""
from .pipeline import LayerCallback, LayerPipeline, LayerStep
from .source import InMemorySource, LayerInputs, LayerSource

__all__ = ["InMemorySource", "LayerCallback", "LayerInputs", "LayerPipeline", "LayerSource", "LayerStep"]
