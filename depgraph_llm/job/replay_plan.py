"""`depgraph-llm apply`: replay a saved prune plan on the model it was made from."""
from __future__ import annotations

import json
from pathlib import Path

from depgraph_llm.checkpoint.files import check_free_space, check_not_source, check_output_dir, weights_hash
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path
from depgraph_llm.errors import UserError
from depgraph_llm.job.in_memory import apply_in_memory, couple_or_explain
from depgraph_llm.job.options import PruneOptions, PruneResult
from depgraph_llm.job.output import plan_report, pruned_tokenizer, save_checkpoint, source_dtype
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.models import spec_for
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.recovery.bias_params import enable_zero_biases
from depgraph_llm.removal.apply import apply_plan
from depgraph_llm.calibration.record import replay_windows


def run_apply(plan_path: Path, model: str | None, out: Path, overwrite: bool = False,
              trust_remote_code: bool = False) -> PruneResult:
    """Replay a saved prune plan on the model it was made from (checked by weights hash); a reconstructed plan
    draws its calibration windows again from its record (checked by digest) and refits the same way."""
    plan = PrunePlan.load(plan_path)
    if plan.hidden_method == "rotate":
        raise UserError(f"{plan_path} used --hidden-method rotate, whose rotation comes from calibration data; "
                        "rerun `prune` with the same options instead of `apply`")
    if plan.expert_reconstruct != "drop":
        raise UserError(f"{plan_path} used --expert-reconstruct {plan.expert_reconstruct}, whose refitted routers "
                        "depend on calibration data; rerun `prune` with the same options instead of `apply`")
    check_output_dir(out, overwrite)
    timer = StageTimer()
    model_path = resolve_model_path(model)
    check_not_source(out, (model, model_path, plan_path))
    source_hash = weights_hash(model_path)
    if plan.model_hash != source_hash:
        raise UserError(f"{plan_path} was made for weights sha256 {plan.model_hash[:12]}..., but {model_path} has "
                        f"{source_hash[:12]}...; pass the model the plan was made from")
    with timer("load"):
        loaded, tokenizer = load_model(model_path, trust_remote_code)
    if sum(p.numel() for p in loaded.parameters()) != plan.params_before:
        raise UserError(f"{plan_path} expects {plan.params_before} parameters before pruning; the model differs")
    check_free_space(out, plan.params_after * 4)
    spec = spec_for(loaded.config.model_type)
    calibration = []
    if plan.reconstruct != "none":
        with timer("calibration"):
            calibration = replay_windows(plan.calibration, loaded, tokenizer)
        if plan.reconstruct == "bias":
            enable_zero_biases(loaded, spec.bias_switches)
    coupling = couple_or_explain(loaded)
    plan.check_against(coupling, loaded.config.model_type)
    if calibration:
        recorded = json.dumps([plan.keep, plan.keep_nested], sort_keys=True)
        options = PruneOptions(model=str(model_path), ratio=plan.ratio_requested, reconstruct=plan.reconstruct,
                               reconstruct_mode=plan.reconstruct_mode, reconstruct_anchor=plan.reconstruct_anchor,
                               show_progress=False,
                               **replayed_cross_block(plan))
        try:
            apply_in_memory(loaded, coupling, plan, calibration, options, timer)
        except RuntimeError as exc:  # the parameter count check inside: an edited plan
            raise UserError(f"{plan_path} says params_after {plan.params_after}, replaying it gives another count; "
                            "the plan was edited or made by another version, recreate it with `prune`") from exc
        if json.dumps([plan.keep, plan.keep_nested], sort_keys=True) != recorded:
            raise UserError(f"replaying {plan_path} chose other units than it records (another torch version or "
                            "thread count changes the refit's arithmetic); rerun `prune` instead of `apply`")
    else:
        with timer("apply"):
            apply_plan(loaded, coupling, plan, spec)
    tokenizer = pruned_tokenizer(tokenizer, plan)
    replayed = sum(p.numel() for p in loaded.parameters())
    if replayed != plan.params_after:
        raise UserError(f"{plan_path} says params_after {plan.params_after}, replaying it gives {replayed}; "
                        "the plan was edited or made by another version, recreate it with `prune`")
    report = plan_report(model_path, source_hash, coupling, plan, timer)
    report["replayed_from"] = str(plan_path)
    with timer("save"):
        save_checkpoint(loaded, tokenizer, out, plan, report, overwrite, source_dtype(model_path))
    return PruneResult(out=out, report=report, plan=plan, timings=timer.times)


def replayed_cross_block(plan: PrunePlan) -> dict:
    """The PruneOptions fields of the cross-block refit a plan records (none when it had none)."""
    record = plan.reconstruct_report.get("cross_block") or {}
    names = {"window": "cross_block", "epochs": "cross_block_epochs", "lr": "cross_block_lr", "reg": "cross_block_reg"}
    return {field_name: record[key] for key, field_name in names.items() if key in record}
