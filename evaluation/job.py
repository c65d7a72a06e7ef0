"""The `depgraph-llm eval` job: perplexity, zero-shot accuracy and speed for pruned models vs a baseline."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from depgraph_llm.calibration.sources import evaluation_text as default_evaluation_text, generated_eval_text
from depgraph_llm.errors import UserError
from depgraph_llm.checkpoint.files import check_not_source
from depgraph_llm.checkpoint.loading import cache_dir, load_model, resolve_model_path

from .loss_plot import recovery_loss_curve
from .perplexity import perplexity
from .report import write_report
from .memory import MEMORY_PROTOCOL, measure_peak_memory
from .speed import compare_speed, measure_speed
from .tasks import LocalTask, bigbench_items, cloze_items, write_choice_task, write_cloze_task
from .zeroshot import evaluate_tasks

log = logging.getLogger(__name__)
BIGBENCH_TASKS = ("winowhy", "epistemic_reasoning", "timedial", "navigate", "sports_understanding",
                  "logic_grid_puzzle", "abstract_narrative_understanding/4_distractors", "causal_judgment",
                  "disambiguation_qa", "implicatures", "date_understanding")
PROTOCOL = ("perplexity: evaluation/perplexity.py (non-overlapping windows, fp32); cloze: last word of sentences "
            "in the evaluation text, accuracy = greedy match; multiple choice: BIG-bench items, log-likelihood "
            "of each choice, acc and acc_norm; speed: batch 1, random prompt, median of repeats after warm-up "
            "with their spread ((max - min) / median), dense and pruned interleaved in one process; "
            + MEMORY_PROTOCOL)


def on_speed_device(*models):
    """Copies of the models on the GPU in bf16 when one is present; the models themselves on CPU otherwise."""
    import copy

    import torch

    if not torch.cuda.is_available():
        return models
    return tuple(copy.deepcopy(m).to("cuda", torch.bfloat16) for m in models)


def default_bigbench_dir() -> Path:
    return cache_dir() / "bigbench"


@dataclass
class EvalOptions:
    models: list[str]
    baseline: str | None = None
    report_dir: Path | None = None
    eval_text: str | None = None
    tasks_dir: Path | None = None
    bigbench_dir: Path | None = None
    limit: int | None = 200
    cloze_items: int = 300
    seq_len: int = 512
    eval_tokens: int = 4096
    speed: bool = True
    trust_remote_code: bool = False
    builtin_tasks: list[str] = field(default_factory=list)  # lm-eval task names with locally cached datasets


def build_tasks(folder: Path, text: str, options: EvalOptions) -> list[LocalTask]:
    """Write the cloze task and every available BIG-bench task into `folder` as lm-eval YAML."""
    tasks = [write_cloze_task(folder, cloze_items(text, options.cloze_items))]
    bigbench = options.bigbench_dir or default_bigbench_dir()
    for task in BIGBENCH_TASKS:
        path = bigbench / task.replace("/", "__") / "task.json"
        if path.is_file():
            items = bigbench_items(path)
            if items:
                tasks.append(write_choice_task(folder, "bb_" + task.replace("/", "_"), items))
    if len(tasks) == 1:
        log.warning("no BIG-bench task files in %s; run scripts/fetch_bigbench.py for multiple-choice tasks", bigbench)
    return tasks


def _user_task_names(tasks_dir: Path) -> list[str]:
    names = []
    for yaml_file in sorted(tasks_dir.rglob("*.yaml")):
        for line in yaml_file.read_text().splitlines():
            if line.startswith("task:"):
                names.append(line.split(":", 1)[1].strip().strip("'\""))
    if not names:
        raise UserError(f"--tasks-dir {tasks_dir} holds no lm-eval task YAML (no 'task:' lines)")
    return names


def _widths(path: Path) -> list[dict] | None:
    report = path / "prune_report.json"
    if report.is_file():
        return json.loads(report.read_text()).get("layer_widths_after")
    return None


def _speed_fields(speed: dict) -> dict:
    return {"tokens_per_s": {"prefill": speed["prefill_tokens_per_s"], "decode": speed["decode_tokens_per_s"]},
            "tokens_per_s_spread": {"prefill": speed["prefill_spread"], "decode": speed["decode_spread"]}}


def _memory_fields(path: Path, options: "EvalOptions") -> dict:
    """Peak memory of one model, measured in its own process (memory.py says what it includes)."""
    import torch

    memory = measure_peak_memory(path, device="cuda" if torch.cuda.is_available() else "cpu",
                                 trust_remote_code=options.trust_remote_code)
    return {"peak_memory_bytes": memory.peak_bytes, "peak_memory": memory.to_dict()}


def check_report_dir(out: Path, sources: list[Path]) -> None:
    """The report never replaces, contains or enters a model folder (except that folder's own eval_report/, the
    default), and replaces an existing folder only if it holds an earlier report."""
    for source in sources:
        if Path(out).resolve() != (Path(source) / "eval_report").resolve():
            check_not_source(out, [source], flag="--report-dir")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file()):
        raise UserError(f"--report-dir {out} exists and is not an earlier evaluation report; choose a new or empty "
                        "folder")


def evaluation_text(options: EvalOptions, reference: Path) -> tuple[str, list[str]]:
    """--eval-text, else the default evaluation part (as `prune` uses), else text the reference model generates
    (the baseline, or the first model), so evaluation works on a machine with no text at all."""
    text, files = default_evaluation_text(options.eval_text)
    if text is not None:
        return text, files
    model, tokenizer = load_model(reference, options.trust_remote_code)
    return generated_eval_text(model, tokenizer, options.seq_len, options.eval_tokens, seed=0), [f"self:{reference}"]


def run_eval(options: EvalOptions) -> tuple[Path, dict]:
    """Evaluate every model (and the baseline) and write the report next to the first model."""
    paths = [resolve_model_path(m) for m in options.models]
    baseline_path = resolve_model_path(options.baseline) if options.baseline else None
    out = options.report_dir or (paths[0] / "eval_report")
    check_report_dir(out, [*paths, *([baseline_path] if baseline_path else []),
                           *(Path(m) for m in [*options.models, options.baseline] if m)])
    text, text_files = evaluation_text(options, baseline_path or paths[0])
    user_tasks = _user_task_names(options.tasks_dir) if options.tasks_dir else []
    report: dict = {"models": {}, "speed": {}, "protocol": PROTOCOL, "eval_text": text_files}
    baseline_model = None
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_tasks(Path(tmp), text, options)
        chance = {t.name: t.chance for t in tasks}
        labelled = ([("baseline", baseline_path)] if baseline_path else []) + [(p.name, p) for p in paths]
        for label, path in labelled:
            model, tokenizer = load_model(path, options.trust_remote_code)
            entry = {"path": str(path), "params": sum(p.numel() for p in model.parameters()),
                     "perplexity": perplexity(model, tokenizer, text, options.seq_len, options.eval_tokens).perplexity,
                     "layer_widths": _widths(path)}
            if recovery_loss_curve(path):
                entry["recovery_loss_curve"] = recovery_loss_curve(path)
            accuracy = evaluate_tasks(model, tokenizer, Path(tmp), list(chance), limit=options.limit)
            if user_tasks:
                accuracy.update(evaluate_tasks(model, tokenizer, options.tasks_dir, user_tasks, limit=options.limit))
            if options.builtin_tasks:
                accuracy.update(evaluate_tasks(model, tokenizer, None, options.builtin_tasks, limit=options.limit))
            for name, value in accuracy.items():
                value["chance"] = chance.get(name)
            entry["accuracy"] = accuracy
            report["models"][label] = entry
            if not options.speed:
                continue
            entry.update(_memory_fields(path, options))
            if label == "baseline":
                baseline_model = model
            elif baseline_model is not None:
                comparison = compare_speed(*on_speed_device(baseline_model, model))
                report["speed"][label] = comparison
                report["models"]["baseline"].update(_speed_fields(comparison["dense"]))
                entry.update(_speed_fields(comparison["pruned"]))
            else:
                entry.update(_speed_fields(measure_speed(on_speed_device(model)[0]).to_dict()))
    write_report(report, out)
    return out, report
