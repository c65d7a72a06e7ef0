"""The prune job: load -> calibrate -> plan -> apply -> evaluate -> save (streams when it would not fit)."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from depgraph_llm.calibration.sources import generated_eval_text, token_windows
from depgraph_llm.checkpoint.files import check_free_space, check_output_dir, weights_hash
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path
from depgraph_llm.errors import UserError
from depgraph_llm.evaluation.perplexity import perplexity
from depgraph_llm.importance import get_estimator
from depgraph_llm.job.in_memory import prune_in_memory
from depgraph_llm.job.inputs import (
    calibration_batches,
    calibration_texts,
    fit_windows_to_context,
    heldout_windows,
    vocab_ids_for,
    vocab_texts,
)
from depgraph_llm.job.options import PruneOptions, PruneResult, allocation_for, default_out_dir
from depgraph_llm.job.output import plan_report, pruned_tokenizer, save_checkpoint, source_dtype
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.job.vocab_choice import VocabSizeChooser
from depgraph_llm.models import spec_for
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.search import SearchSettings
from depgraph_llm.planning.search_schedule import held_aside_windows
from depgraph_llm.planning.vocab_cost import AUTO_VOCAB
from depgraph_llm.calibration.record import calibration_record
from depgraph_llm.job.streaming import run_prune_streaming, would_not_fit

log = logging.getLogger(__name__)


def run_prune(options: PruneOptions) -> PruneResult:
    """Prune a model end to end and save the slim checkpoint with its plan and report."""
    options.validate()
    timer = StageTimer()
    model_path = resolve_model_path(options.model)
    out = Path(options.out) if options.out else default_out_dir(model_path, options.ratio)
    check_output_dir(out, options.overwrite, sources=(options.model, model_path))
    if options.in_memory and (options.streaming or options.device is not None):
        raise UserError("--in-memory loads the whole model; it cannot be combined with --streaming or --device")
    fits = options.in_memory or options.device_map is not None or not would_not_fit(model_path)  # host memory
    if options.streaming or options.device is not None or not fits:
        if options.hidden_method == "rotate":
            raise UserError(f"--hidden-method rotate runs on the in-memory path, but {model_path} would not fit; "
                            "use --hidden-method select, or --in-memory")
        if options.cross_block:
            raise UserError("--cross-block tunes layers the streaming pass has already written; it needs the "
                            "model in memory (drop --streaming/--device, or add --in-memory)")
        if not options.streaming:
            log.warning("%s would not fit in memory in float32: pruning it one decoder layer at a time (streaming)",
                        model_path)
        return run_prune_streaming(options, model_path, out, timer)
    with timer("load"):
        model, tokenizer = load_model(model_path, options.trust_remote_code, options.device_map)
        source_hash = weights_hash(model_path)
    options = fit_windows_to_context(options, model.config)
    estimator = get_estimator(options.importance)
    cal_source, eval_text, cal_files, eval_files = calibration_texts(options)
    if eval_text is None and (options.evaluate or options.dry_run):
        eval_text = generated_eval_text(model, tokenizer, options.eval_seq_len, options.eval_tokens, options.seed)
    needs_calibration = (options.vocab_keep is not None and cal_source.is_self
                         or estimator.needs_gradients or estimator.needs_calibration or options.schedule == "depth"
                         or options.reconstruct != "none" or options.layers_removed is not None
                         or options.expert_reconstruct != "drop" or options.hidden_method == "rotate")
    with timer("calibration"):
        calibration = calibration_batches(model, tokenizer, cal_source, options) if needs_calibration else []
    params_before = sum(p.numel() for p in model.parameters())
    allocation = allocation_for(options, getattr(model.config, spec_for(model.config.model_type).layers_field))
    vocab_chooser = None
    if options.vocab_keep == AUTO_VOCAB:  # chosen with the widths, once the model is scored
        vocab_chooser = VocabSizeChooser(model, tokenizer, vocab_texts(tokenizer, cal_source, calibration), options,
                                         calibration)
    elif options.vocab_keep:
        with timer("vocabulary"):
            kept_ids = vocab_ids_for(model, tokenizer, cal_source, calibration, options)
        allocation = replace(allocation, vocab_ids=tuple(kept_ids))
    ppl_before = None
    if options.evaluate and not options.dry_run:
        with timer("perplexity_before"):
            ppl_before = perplexity(model, tokenizer, eval_text, options.eval_seq_len, options.eval_tokens,
                                    options.show_progress)
    search_windows = (held_aside_windows(cal_source, model, tokenizer, calibration, options.seq_len, options.seed,
                                         SearchSettings()) if options.schedule == "search" else None)
    if options.dry_run:
        plan, coupling = prune_in_memory(model, calibration, options, source_hash=source_hash, timer=timer,
                                         apply=False, allocation=allocation,
                                         search_windows=search_windows, choose_allocation=vocab_chooser)
        report = plan_report(model_path, source_hash, coupling, plan, timer)
        report["dry_run"] = True
        report["estimated_checkpoint_bytes"] = plan.params_after * 4
        report["estimated_remaining_s"] = round(remaining_time(model, tokenizer, eval_text, options, plan), 1)
        return PruneResult(out=out, report=report, plan=plan, timings=timer.times)
    check_free_space(out, params_before * 4)
    heldout = heldout_windows(tokenizer, eval_text, calibration, options)
    plan, coupling = prune_in_memory(model, calibration, options, source_hash=source_hash, timer=timer,
                                     allocation=allocation, heldout=heldout, search_windows=search_windows,
                                     choose_allocation=vocab_chooser)
    plan.calibration = calibration_record(cal_source, calibration, options.seq_len, options.seed) if calibration else {}
    tokenizer = pruned_tokenizer(tokenizer, plan)
    ppl_after = None
    if options.evaluate:
        with timer("perplexity_after"):
            ppl_after = perplexity(model, tokenizer, eval_text, options.eval_seq_len, options.eval_tokens,
                                   options.show_progress)
    report = plan_report(model_path, source_hash, coupling, plan, timer)
    report["calibration"] = {"files": cal_files, "samples": len(calibration), "seq_len": options.seq_len,
                             "source": cal_source.record(options.seq_len, len(calibration), options.seed)}
    if vocab_chooser is not None:
        report["vocabulary"] = vocab_chooser.record
    report["perplexity"] = {"protocol": "evaluation/perplexity.py", "files": eval_files,
                            "before": ppl_before.to_dict() if ppl_before else None,
                            "after": ppl_after.to_dict() if ppl_after else None}
    if plan.kept_vocabulary() is not None:
        report["perplexity"]["note"] = ("after: per token of the pruned tokenizer, which may split the evaluation "
                                        "text into more tokens than the source tokenizer; not strictly comparable")
    with timer("save"):
        save_checkpoint(model, tokenizer, out, plan, report, options.overwrite, source_dtype(model_path))
    report["timings_s"] = timer.times
    return PruneResult(out=out, report=report, plan=plan, timings=timer.times)


def remaining_time(model, tokenizer, eval_text: str, options: PruneOptions, plan: PrunePlan) -> float:
    """Rough time a real run adds after planning: two perplexity passes (timed on one window) and the save."""
    seconds = plan.params_after * 4 / 200e6  # writing safetensors at ~200 MB/s
    if options.evaluate:
        window = token_windows(tokenizer, eval_text, options.eval_seq_len, 1, purpose="evaluation")[0]
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=window, use_cache=False)
        windows = max(1, options.eval_tokens // options.eval_seq_len)
        seconds += (time.perf_counter() - start) * windows * (1 + plan.params_after / plan.params_before)
    return seconds
