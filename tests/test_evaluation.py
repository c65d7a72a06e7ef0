"""Evaluation: local lm-eval tasks end to end, speed comparison, reports."""
import json

import pytest
import torch

from depgraph_llm.removal.apply import apply_plan
from depgraph_llm.calibration import DEFAULT_EVAL_FILES, default_files, load_text
from depgraph_llm.evaluation.report import write_report
from depgraph_llm.evaluation.speed import compare_speed, linear_flops_per_token
from depgraph_llm.evaluation.tasks import bigbench_items, cloze_items, write_choice_task, write_cloze_task
from depgraph_llm.evaluation.zeroshot import evaluate_tasks
from depgraph_llm.models import spec_for
from tests.cli_helpers import run_cli
from tests.test_apply import make_plan
from tests.tiny import tiny_model, tiny_tokenizer


def test_cloze_items_take_sentence_final_words():
    text = " ".join(f"word{i}" for i in range(70)) + " the cat sat on the mat. Then it slept quietly!"
    items = cloze_items(text, 5, context_words=10)
    targets = sorted(item["target"] for item in items)
    assert targets == [" mat", " quietly"]
    mat = next(item for item in items if item["target"] == " mat")
    assert mat["context"].endswith("cat sat on the") and len(mat["context"].split()) == 10


def test_bigbench_items(tmp_path):
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"examples": [
        {"input": "Is ice cold?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Pick blue", "target_scores": {"red": 0, "green": 0, "blue": 1}},
        {"input": "generative only", "target": "x"}]}))
    items = bigbench_items(task)
    assert [i["label"] for i in items] == [0, 2] and items[1]["choices"] == ["red", "green", "blue"]
    assert write_choice_task(tmp_path / "t", "toy", items).chance == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_lm_eval_local_tasks_end_to_end(tmp_path):
    model, tokenizer = tiny_model("llama", tie=True), tiny_tokenizer()
    text = load_text(default_files(DEFAULT_EVAL_FILES))
    cloze = write_cloze_task(tmp_path, cloze_items(text, 12))
    choice = write_choice_task(tmp_path, "toy_mc", [
        {"question": f"Q: is {i} even?\nA:", "choices": ["yes", "no", "maybe"], "label": i % 2} for i in range(9)])
    results = evaluate_tasks(model, tokenizer, tmp_path, [cloze.name, choice.name])
    assert results[cloze.name]["items"] == 12 and results[choice.name]["items"] == 9
    for value in results.values():
        assert 0.0 <= value["acc"] <= 1.0
    # the MC accuracy is exactly what scoring each choice by log-likelihood gives
    correct = 0
    for i in range(9):
        context = tokenizer(f"Q: is {i} even?\nA:").input_ids
        scores = []
        for answer in ["yes", "no", "maybe"]:
            whole = tokenizer(f"Q: is {i} even?\nA: {answer}").input_ids
            continuation = whole[len(context):]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logits[len(context) - 1 + j, t].item() for j, t in enumerate(continuation)))
        correct += int(max(range(3), key=scores.__getitem__) == i % 2)
    assert results[choice.name]["acc"] == pytest.approx(correct / 9)


def test_speed_comparison_reports_ratios():
    dense = tiny_model("llama")
    pruned = tiny_model("llama")
    keep = {f"layers.{i}.mlp.channels": list(range(8)) for i in range(3)}
    coupling, plan = make_plan(pruned, keep)
    apply_plan(pruned, coupling, plan, spec_for("llama"))
    result = compare_speed(dense, pruned, prompt_tokens=16, decode_tokens=4, repeats=2, rounds=1)
    assert result["speedup_prefill"] > 0 and result["speedup_decode"] > 0
    assert result["ideal_speedup_flops"] == pytest.approx(linear_flops_per_token(dense) / linear_flops_per_token(pruned))
    assert linear_flops_per_token(dense) - linear_flops_per_token(pruned) == 2 * 3 * 3 * 48 * (37 - 8)
    for side in ("dense", "pruned"):
        assert result[side]["peak_memory_bytes"] >= sum(p.numel() * 4 for p in (dense if side == "dense" else pruned).parameters())


def test_report_files(tmp_path):
    report = {"protocol": "test", "speed": {}, "models": {
        "dense": {"params": 100, "perplexity": 10.0, "accuracy": {"t": {"acc": 0.5, "items": 4, "chance": 0.25}},
                  "tokens_per_s": {"prefill": 5.0, "decode": 2.0}, "peak_memory_bytes": 2**20,
                  "layer_widths": [{"layer": 0, "mlp": 4}]},
        "slim": {"params": 75, "perplexity": 12.0, "accuracy": {"t": {"acc": 0.25, "items": 4, "chance": 0.25}},
                 "layer_widths": [{"layer": 0, "mlp": 3}]}}}
    write_report(report, tmp_path / "r")
    for name in ("report.json", "report.md", "perplexity.png", "layer_widths.png", "speedup.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "r" / "report.json").read_text())["models"]["slim"]["perplexity"] == 12.0
    assert "| slim | 0.00M | 12.00 | 0.250 |" in (tmp_path / "r" / "report.md").read_text()


def test_eval_command(tiny_checkpoint, tmp_path):
    bigbench = tmp_path / "bb" / "navigate"
    bigbench.mkdir(parents=True)
    (bigbench / "task.json").write_text(json.dumps({"examples": [
        {"input": f"Take {i} steps. Are you back?", "target_scores": {"True": i % 2, "False": 1 - i % 2}}
        for i in range(6)]}))
    result = run_cli("eval", str(tiny_checkpoint), "--baseline", str(tiny_checkpoint), "--report-dir",
                     str(tmp_path / "report"), "--bigbench-dir", str(tmp_path / "bb"), "--limit", "5",
                     "--cloze-items", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    model = report["models"][tiny_checkpoint.name]
    assert set(model["accuracy"]) == {"depgraph_cloze", "bb_navigate"} and model["accuracy"]["bb_navigate"]["items"] == 5
    assert model["perplexity"] == pytest.approx(report["models"]["baseline"]["perplexity"])
    assert report["speed"][tiny_checkpoint.name]["ideal_speedup_flops"] == pytest.approx(1.0)
    assert model["tokens_per_s"]["decode"] > 0 and model["peak_memory_bytes"] > 0
