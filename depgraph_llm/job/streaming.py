"""The prune job on the streaming path: the model never exists whole. Every stage is a layer-pipeline pass over
a `StreamingSource` (decoder layers read from the shards one at a time): perplexity before, importance, depth
metrics, then one pass that reconstructs, slices and writes each layer into the output shards, the final config
step on the skeleton, and perplexity after, read back layer by layer from the written checkpoint."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from depgraph_llm.calibration.sources import token_windows
from depgraph_llm.calibration.record import calibration_record
from depgraph_llm.checkpoint.files import atomic_dir, check_free_space, weights_hash, write_json
from depgraph_llm.checkpoint.shards import ShardReader, ShardWriter
from depgraph_llm.errors import UserError
from depgraph_llm.evaluation.perplexity import PerplexityResult, result_of
from depgraph_llm.importance import get_estimator
from depgraph_llm.layers import LayerCallback, LayerPipeline
from depgraph_llm.job.in_memory import layer_progress, plan_in_memory, reconstruction_stages, record_reconstruction
from depgraph_llm.planning.vocab_cost import AUTO_VOCAB
from depgraph_llm.job.inputs import calibration_batches, calibration_texts, fit_windows_to_context, vocab_ids_for
from depgraph_llm.job.options import PruneResult, allocation_for
from depgraph_llm.job.output import plan_report, pruned_tokenizer
from depgraph_llm.job.memory_plan import predict_peak
from depgraph_llm.job.streaming_limits import MAX_SHARD_BYTES
from depgraph_llm.layers.streaming import DTYPES, ShardSink, StreamingSource, streamed_adopt
from depgraph_llm.models import spec_for
from depgraph_llm.removal.apply import finish_plan
from depgraph_llm.removal.slim_config import copy_modeling_code, is_heterogeneous

log = logging.getLogger(__name__)


def compute_dtype(option: str, source_dtype: torch.dtype) -> torch.dtype:
    """--dtype: the dtype layers compute in ("auto": the checkpoint's own); statistics stay float64."""
    return source_dtype if option == "auto" else DTYPES[option]


def estimated_load_bytes(model_path: Path) -> int:
    """What loading the whole model in float32 takes: 4 bytes per stored element (read from the headers)."""
    return ShardReader(model_path).numel() * 4


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (or a large number where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def would_not_fit(model_path: Path) -> bool:
    """Would the in-memory path (float32 model, plus as much again for gradients or copies) exceed memory?"""
    try:
        return 2 * estimated_load_bytes(model_path) > available_bytes()
    except (UserError, OSError, ValueError):
        return False


class _NegativeLogLikelihood(LayerCallback):
    """The tail stage of a streamed perplexity: the evaluation protocol's NLL on each window's logits."""

    needs_tail = True

    def __init__(self) -> None:
        self.total_nll, self.predicted = 0.0, 0

    def tail(self, model, output, input_ids) -> None:
        logits = output.logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(log_probs.device)
        self.total_nll -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        self.predicted += targets.numel()


def streamed_perplexity(source, tokenizer, text: str, seq_len: int = 512, max_tokens: int = 4096,
                        progress=None) -> PerplexityResult:
    """evaluation/perplexity.py's protocol, computed one decoder layer at a time."""
    windows = token_windows(tokenizer, text, seq_len, max(1, max_tokens // seq_len), purpose="evaluation")
    nll = _NegativeLogLikelihood()
    LayerPipeline(source, [nll], progress=progress).run(windows)
    return result_of(nll.total_nll, nll.predicted, windows, tokenizer, seq_len)


def _refuse_unsupported(options) -> None:
    if options.calibration == "self":
        raise UserError("--calibration self generates text with the whole model; pass --calibration FILE with "
                        "--streaming")
    if options.vocab_keep == AUTO_VOCAB:
        raise UserError("--vocab-keep auto scores the vocabulary with the whole model in memory; with --streaming "
                        "pass a number of tokens (--vocab-keep N), or drop --streaming")


def run_prune_streaming(options, model_path: Path, out: Path, timer):
    """The prune job with one decoder layer in memory at a time; returns a PruneResult like run_prune."""
    from transformers import AutoTokenizer


    estimator = get_estimator(options.importance)
    _refuse_unsupported(options)
    with timer("load"):
        reader_dtype = ShardReader(model_path).dtype()
        device = torch.device(options.device) if options.device else None
        budget = None if options.activation_budget_mb is None else options.activation_budget_mb << 20
        source = StreamingSource(model_path, compute_dtype(options.dtype, reader_dtype), device,
                                 trust_remote_code=options.trust_remote_code, activation_budget=budget)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=options.trust_remote_code)
        source_hash = weights_hash(model_path)
    model = source.model
    options = fit_windows_to_context(options, model.config)
    cal_source, eval_text, cal_files, eval_files = calibration_texts(options)
    if eval_text is None and options.evaluate:
        raise UserError("no evaluation text is installed and the streaming path cannot generate one; pass "
                        "--eval-text FILE or --no-eval")
    needs_calibration = (estimator.needs_calibration or estimator.needs_gradients or options.schedule == "depth"
                         or options.reconstruct != "none" or options.expert_reconstruct != "drop"
                         or options.layers_removed is not None)
    with timer("calibration"):
        calibration = calibration_batches(model, tokenizer, cal_source, options) if needs_calibration else []
    spec = spec_for(model.config.model_type)
    allocation = allocation_for(options, getattr(model.config, spec.layers_field))
    if options.vocab_keep:
        kept_ids = vocab_ids_for(model, tokenizer, cal_source, calibration, options)
        allocation = replace(allocation, vocab_ids=tuple(kept_ids))
    progress = layer_progress
    ppl_before = None
    if options.evaluate and not options.dry_run:
        with timer("perplexity_before"):
            ppl_before = streamed_perplexity(source, tokenizer, eval_text, options.eval_seq_len, options.eval_tokens,
                                             progress("perplexity (layer by layer)", options.show_progress))
    plan, coupling = plan_in_memory(model, calibration, options, source_hash, timer, allocation, source=source)
    plan.calibration = calibration_record(cal_source, calibration, options.seq_len, options.seed) if calibration else {}
    if options.dry_run:
        report = plan_report(model_path, source_hash, coupling, plan, timer)
        report.update(dry_run=True, streaming=True,
                      estimated_checkpoint_bytes=plan.params_after * torch.empty(0, dtype=reader_dtype).element_size(),
                      memory=predict_peak(model.config, options, torch.empty(0, dtype=reader_dtype).element_size(),
                                          plan.params_before).to_dict())
        return PruneResult(out=out, report=report, plan=plan, timings=timer.times)
    out_dtype = reader_dtype
    check_free_space(out, plan.params_after * torch.empty(0, dtype=out_dtype).element_size())
    with atomic_dir(out, options.overwrite) as tmp:
        write_slim_checkpoint(source, coupling, plan, calibration, options, tmp, out_dtype, timer)
        tokenizer = pruned_tokenizer(tokenizer, plan)
        tokenizer.save_pretrained(tmp)
        ppl_after = None
        if options.evaluate:
            with timer("perplexity_after"):
                ppl_after = streamed_perplexity(StreamingSource(tmp, source.dtype, source.device), tokenizer, eval_text,
                                                options.eval_seq_len, options.eval_tokens,
                                                progress("perplexity (layer by layer)", options.show_progress))
        report = plan_report(model_path, source_hash, coupling, plan, timer)
        report["streaming"] = {"compute_dtype": str(source.dtype).removeprefix("torch."),
                               "output_dtype": str(out_dtype).removeprefix("torch."),
                               "shards": len(list(tmp.glob("*.safetensors"))),
                               "spilled_streams": source.activations.spilled}
        report["calibration"] = {"files": cal_files, "samples": len(calibration), "seq_len": options.seq_len,
                                 "source": cal_source.record(options.seq_len, len(calibration), options.seed)}
        report["perplexity"] = {"protocol": "evaluation/perplexity.py (computed layer by layer)", "files": eval_files,
                                "before": ppl_before.to_dict() if ppl_before else None,
                                "after": ppl_after.to_dict() if ppl_after else None}
        report["timings_s"] = timer.times
        (tmp / "prune_plan.json").write_text(plan.to_json() + "\n")
        write_json(tmp / "prune_report.json", report)
    return PruneResult(out=out, report=report, plan=plan, timings=timer.times)


def write_slim_checkpoint(source: StreamingSource, coupling, plan, calibration: list[torch.Tensor], options,
                          folder: Path, out_dtype: torch.dtype, timer, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """One layer-pipeline pass that reconstructs (when asked), slices and writes each layer, then the final step
    on the skeleton and the tensors outside the layers; weights and config.json land in `folder`."""

    model = source.model
    spec = spec_for(model.config.model_type)
    writer = ShardWriter(folder, max_shard_bytes)
    stages = reconstruction_stages(coupling, plan, calibration, options)
    layer_pass = LayerPipeline(source, stages, ShardSink(writer, coupling, plan, spec, out_dtype),
                               progress=layer_progress("slice and write", options.show_progress))
    with timer("reconstruct" if stages else "apply"):
        layer_pass.run(calibration if stages else [])
    record_reconstruction(plan, stages)
    writer.flush()
    with timer("apply_config"):
        finish_plan(model, coupling, plan, spec, runnable=False,
                    adopt=streamed_adopt(ShardReader.of_writer(writer), coupling.layers_path, source.dtype))
    actual = sum(p.numel() for p in model.parameters())
    if actual != plan.params_after:
        raise RuntimeError(f"internal error: planned {plan.params_after} parameters, skeleton has {actual}")
    prefix, seen = f"{coupling.layers_path}.", set()
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix) or tensor.device.type == "meta":
            continue
        if tensor.data_ptr() in seen:  # tied weights are stored once, as save_pretrained does
            continue
        seen.add(tensor.data_ptr())
        writer.add(name, tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
    writer.finish()
    model.config.dtype = out_dtype
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    if is_heterogeneous(model.config):
        copy_modeling_code(model.config, folder)
