"""What a job writes: the report's common part, the pruned tokenizer and the checkpoint itself."""
from __future__ import annotations

import platform
import resource
from pathlib import Path

import torch

from depgraph_llm import __version__
from depgraph_llm.checkpoint.files import atomic_dir, write_json
from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.planning.experts import moe_report
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.vocab import restricted_tokenizer
from depgraph_llm.removal.apply import layer_widths
from depgraph_llm.removal.slim_config import copy_modeling_code, is_heterogeneous


def plan_report(model_path: Path, source_hash: str, coupling: CouplingGraph, plan: PrunePlan, timer: StageTimer) -> dict:
    """The part of prune_report.json that every job writes: source, plan summary, widths, timings, memory."""
    return {
        "tool": {"name": "depgraph-llm", "version": __version__, "torch": torch.__version__,
                 "python": platform.python_version()},
        "source": {"path": str(model_path), "weights_sha256": source_hash, "model_type": plan.model_type},
        "importance": plan.estimator, "chosen_by": plan.chosen_by_kind(coupling), "schedule": plan.schedule,
        "seed": plan.seed, "round_to": plan.round_to,
        "reconstruct": plan.reconstruct if plan.reconstruct == "none" else f"{plan.reconstruct} ({plan.reconstruct_mode})",
        "reconstruct_report": plan.reconstruct_report,
        "reconstruct_anchor": plan.reconstruct_anchor,
        "expert_reconstruct": plan.expert_reconstruct,
        **({"hidden_method": plan.hidden_method, "rotation_report": plan.rotation_report}
           if plan.hidden_method != "select" else {}),
        **({"expert_reconstruct_report": plan.expert_reconstruct_report} if plan.expert_reconstruct_report else {}),
        "params_before": plan.params_before, "params_after": plan.params_after,
        "ratio_requested": plan.ratio_requested, "ratio_achieved": round(plan.ratio_achieved, 6),
        "layer_widths_before": layer_widths(coupling), "layer_widths_after": layer_widths(coupling, plan),
        **moe_report(coupling, plan),
        "timings_s": timer.times,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_by_stage_bytes": dict(timer.peaks),
        **({"peak_gpu_by_stage_bytes": dict(timer.gpu_peaks)} if timer.gpu_peaks else {}),
    }


def pruned_tokenizer(tokenizer, plan: PrunePlan):
    """The tokenizer for the pruned model: itself, or (vocabulary pruning) a copy limited to the kept ids."""
    kept = plan.kept_vocabulary()
    return tokenizer if kept is None else restricted_tokenizer(tokenizer, kept)


def source_dtype(model_path: Path) -> torch.dtype:
    """The dtype a checkpoint stores its floating-point weights in (the output keeps it)."""
    from depgraph_llm.checkpoint.shards import ShardReader

    try:
        return ShardReader(model_path).dtype()
    except UserError:
        return torch.float32


def save_checkpoint(model, tokenizer, out: Path, plan: PrunePlan, report: dict, overwrite: bool,
                    dtype: torch.dtype | None = None) -> None:
    """Write model (safetensors), config, tokenizer, prune_plan.json and prune_report.json atomically; with
    `dtype` (the source checkpoint's), the weights are stored in it rather than in the float32 they were pruned in."""
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if is_heterogeneous(model.config):
            copy_modeling_code(model.config, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prune_plan.json").write_text(plan.to_json() + "\n")
        write_json(tmp / "prune_report.json", report)
