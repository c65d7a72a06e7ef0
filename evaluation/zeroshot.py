"""Zero-shot accuracy through lm-eval on local task folders (no hub access)."""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)


def evaluate_tasks(model: nn.Module, tokenizer, tasks_dir: Path | None, task_names: list[str],
                   limit: int | None = None, batch_size: int = 8) -> dict[str, dict]:
    """Run lm-eval's simple_evaluate on `task_names` defined in `tasks_dir` (None: lm-eval's built-in tasks,
    whose datasets must already be in the local HF datasets cache); {task: {"acc": .., "items": ..}}. The choices of an
    item share one pass over its context (evaluation/shared_context.py)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .shared_context import SharedContextHFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    manager = (TaskManager(include_path=str(tasks_dir), include_defaults=False) if tasks_dir is not None
               else TaskManager())
    results = simple_evaluate(model=lm, tasks=task_names, task_manager=manager, limit=limit, bootstrap_iters=0,
                              log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    out = {}
    for name in task_names:
        metrics = results["results"][name]
        entry = {"acc": float(metrics["acc,none"]), "items": int(results["n-samples"][name]["effective"])}
        if "acc_norm,none" in metrics:
            entry["acc_norm"] = float(metrics["acc_norm,none"])
        out[name] = entry
    return out
