"""Predicted peak host memory of a prune run, from the config and the options alone (`--dry-run`).

The terms are the largest live objects of each path (bytes): the streaming path holds one decoder layer (twice
while it is sliced), the calibration stream and a forward's widest activation in every stage; the model outside
its layers only while it is scored (with one float32 element-score buffer of its largest matrix) and written;
the float64 Grams and solve of one layer's widest consumer while reconstructing; and, for gradient estimators,
every layer's stored input plus a float32 gradient of the embeddings. The in-memory path holds the whole
float32 model (twice for gradient estimators). A fixed runtime term covers Python, torch and transformers themselves."""
from __future__ import annotations

from dataclasses import dataclass, field

from depgraph_llm.importance.chunked import CHUNK_ELEMENTS
from depgraph_llm.job.streaming_limits import MAX_SHARD_BYTES

RUNTIME_BYTES = 700 << 20  # interpreter, torch, transformers, tokenizer (measured on the tiny models: ~0.6 GB)


@dataclass
class MemoryPrediction:
    """A predicted peak: terms every stage holds plus the largest stage's own terms."""

    path: str
    terms: dict[str, int] = field(default_factory=dict)  # held throughout
    stages: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> its own terms

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values()) + max((sum(t.values()) for t in self.stages.values()), default=0)

    def to_dict(self) -> dict:
        return {"path": self.path, "predicted_peak_rss_bytes": self.peak_bytes, "terms_bytes": dict(self.terms),
                "stage_terms_bytes": {k: dict(v) for k, v in self.stages.items()}}


def _widths(config) -> tuple[int, int, int, int, int]:
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return hidden, intermediate, layers, heads, kv


def layer_params(config) -> int:
    """Parameters of one decoder layer (attention, gated MLP, two norms), from the config."""
    hidden, intermediate, _, heads, kv = _widths(config)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    return attention + 3 * hidden * intermediate + 2 * hidden


def solve_bytes(config, ratio: float) -> int:
    """Peak float64 bytes of reconstructing one layer (recovery/reconstruct.py's lean solve of the down_proj, the
    widest consumer, while the attention output's Gram is held): the Gram with the weight, the kept targets and
    the gathered kept block; or, once the Gram is dropped, the kept block, its factorisation, the right-hand side,
    the solution and the targets."""
    hidden, intermediate, _, heads, _ = _widths(config)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    i, h, k = intermediate, hidden, int(intermediate * (1 - ratio))
    down = max(i * i + i * h + k * h + k * k, i * h + 3 * k * h + 2 * k * k)
    return (down + (heads * head_dim) ** 2) * 8


def predict_peak(config, options, source_bytes_per_element: int, total_params: int) -> MemoryPrediction:
    """The predicted peak RSS of `options` (PruneOptions) on a model with `config`."""
    from depgraph_llm.importance import get_estimator

    hidden, intermediate, layers, _, _ = _widths(config)
    vocab = config.vocab_size
    estimator = get_estimator(options.importance)
    tokens = options.calibration_samples * options.seq_len
    eval_tokens = options.eval_tokens if options.evaluate else 0
    compute = 4 if options.dtype == "float32" or (options.dtype == "auto" and source_bytes_per_element == 4) else (
        2 if options.dtype != "auto" else source_bytes_per_element)
    per_layer = layer_params(config)
    outside = total_params - layers * per_layer
    if not options.streaming:
        terms = {"runtime": RUNTIME_BYTES, "model_fp32": total_params * 4}
        if estimator.needs_gradients:
            terms["gradients_fp32"] = total_params * 4
        terms["logits_fp32"] = max(tokens, 1) // options.calibration_samples * vocab * 4 * 2
        return MemoryPrediction("in-memory", terms)
    terms = {"runtime": RUNTIME_BYTES}
    stream = {"calibration_stream": 3 * tokens * hidden * compute,
              "widest_activation": 3 * options.seq_len * intermediate * compute}
    layer = {"one_layer_loaded_and_sliced": 2 * per_layer * compute, **stream}
    pending = {"pending_output_shard": min(MAX_SHARD_BYTES, total_params * source_bytes_per_element)}
    # the layer loop: the parameters outside the layers are parked on disk (layers/pipeline.py), except on the
    # gradient path, which keeps them for the backward
    scoring = {**layer, "logits_one_window_fp32": 2 * options.seq_len * vocab * 4}
    if estimator.name == "obs":
        scoring["hessians_fp64"] = (intermediate ** 2 + 2 * hidden ** 2) * 8
    if estimator.needs_gradients or estimator.name == "fisher":
        scoring["stored_layer_inputs"] = layers * tokens * hidden * compute
        scoring["embedding_gradient_fp32"] = vocab * hidden * 4 + per_layer * 4
        scoring["outside_layers"] = outside * compute
    # after the loop: the embedding / head matrix scored into one float32 element-score buffer, a block of rows at
    # a time (importance/chunked.py)
    outside_scoring = {"outside_layers": outside * compute,
                       "largest_outside_scores_fp32": vocab * hidden * 4 + 3 * CHUNK_ELEMENTS * 4}
    # reconstruction solves before the sink slices the layer (the Grams are gone by then): the larger phase counts
    writing = {**layer, **pending}
    if options.reconstruct != "none":
        solving = {"one_layer_loaded": per_layer * compute, **stream, **pending,
                   "grams_and_solve_fp64": solve_bytes(config, options.ratio)}
        writing = max(writing, solving, key=lambda t: sum(t.values()))
    final = {"outside_layers": outside * compute,
             "pending_output_shard": max(pending["pending_output_shard"], vocab * hidden * source_bytes_per_element)}
    stages = {"importance": scoring, "importance_outside_scores": outside_scoring, "reconstruct_and_write": writing,
              "final_write": final}
    if eval_tokens:
        stages["perplexity"] = {**layer, "outside_layers": outside * compute,
                                "evaluation_stream": 3 * eval_tokens * hidden * compute}
    return MemoryPrediction("streaming", terms, stages)
