"""Evaluation: local lm-eval tasks end to end, speed comparison, reports."""
import json
from collections import defaultdict

import pytest
import torch

from depgraph_llm.removal.apply import apply_plan
from depgraph_llm.calibration.sources import DEFAULT_EVAL_FILES, default_files, load_text
from depgraph_llm.evaluation import speed
from depgraph_llm.evaluation.memory import measure_peak_memory
from depgraph_llm.evaluation.report import _markdown, write_report
from depgraph_llm.evaluation.speed import SPREAD_WARNING, compare_speed
from depgraph_llm.evaluation.tasks import bigbench_items, cloze_items, write_choice_task, write_cloze_task
from depgraph_llm.evaluation.zeroshot import evaluate_tasks
from depgraph_llm.models import spec_for
from tests.cli_helpers import run_cli
from tests.test_apply import make_plan
from tests.test_cli import EVAL_TEXT, hf_perplexity
from tests.tiny import tiny_model, tiny_tokenizer


def hand_linear_flops(mlp: int, layers: int = 3, hidden: int = 48, q: int = 48, kv: int = 24, vocab: int = 160) -> int:
    """2 x the weights of every linear layer of the tiny Llama (q, k, v, o, gate, up, down, LM head) per token."""
    return 2 * (layers * (hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * mlp) + vocab * hidden)


def half_mlp_pair():
    """The tiny Llama, and a copy keeping 18 of its 37 MLP channels in every layer."""
    dense, pruned = tiny_model("llama", tie=True), tiny_model("llama", tie=True)
    coupling, plan = make_plan(pruned, {f"layers.{i}.mlp.channels": list(range(0, 36, 2)) for i in range(3)})
    apply_plan(pruned, coupling, plan, spec_for("llama"))
    return dense, pruned


def script_timings(monkeypatch, seconds):
    """Replace the timed run by `seconds(model, call)` -> (prefill s, decode s); `call` counts from 0 per model."""
    calls = defaultdict(int)

    def scripted(model, input_ids, decode_tokens):
        calls[id(model)] += 1
        return seconds(model, calls[id(model)] - 1)

    monkeypatch.setattr(speed, "_one_run", scripted)


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


def test_speed_comparison_reports_ratios(monkeypatch):
    """On a machine whose time is proportional to linear FLOPs, a model with half the MLP is faster by exactly the
    hand-counted FLOP ratio; medians, directions and tokens/s follow from the scripted seconds."""
    dense, pruned = half_mlp_pair()
    flops = {id(dense): hand_linear_flops(37), id(pruned): hand_linear_flops(18)}
    script_timings(monkeypatch, lambda model, call: (flops[id(model)] * 1e-9, 2 * flops[id(model)] * 1e-9))
    result = compare_speed(dense, pruned, prompt_tokens=16, decode_tokens=4, repeats=3, rounds=2)
    ratio = hand_linear_flops(37) / hand_linear_flops(18)
    assert (hand_linear_flops(37), hand_linear_flops(18)) == (88_800, 72_384)
    assert result["ideal_speedup_flops"] == pytest.approx(ratio)
    assert result["speedup_prefill"] == pytest.approx(ratio) and result["speedup_decode"] == pytest.approx(ratio)
    assert result["dense"]["prefill_tokens_per_s"] == pytest.approx(16 / (hand_linear_flops(37) * 1e-9))
    assert result["dense"]["repeats"] == 6 and len(result["pruned"]["decode_runs"]) == 6
    assert result["dense"]["decode_spread"] == 0 and result["warning"] is None


def test_speed_reports_the_spread_and_warns_when_it_is_wide(monkeypatch):
    dense, pruned = half_mlp_pair()
    # the pruned model's third decode repeat (call 3, after the warm-up) is twice as slow: a busy machine
    script_timings(monkeypatch, lambda model, call: (0.1, 2.0 if model is pruned and call == 3 else 1.0))
    result = compare_speed(dense, pruned, prompt_tokens=16, decode_tokens=4, repeats=3, rounds=1)
    assert result["pruned"]["decode_runs"] == [4.0, 4.0, 2.0]
    assert result["pruned"]["decode_tokens_per_s"] == 4.0 and result["pruned"]["decode_spread"] == 0.5
    assert result["dense"]["decode_spread"] == 0 and 0.5 > SPREAD_WARNING
    assert "pruned decode 50%" in result["warning"] and "dense" not in result["warning"].split("(")[1]
    report = {"protocol": "", "models": {}, "speed": {"slim": result}}
    text = _markdown(report)
    assert "pruned decode 50%" in text and "**Warning:**" in text


def test_report_table_says_dash_for_what_was_not_measured():
    """--no-speed measures no speed or memory: the table must not show them as 0 tok/s and 0 MiB."""
    models = {"timed": {"params": 2e6, "perplexity": 9.5, "tokens_per_s": {"prefill": 120.0, "decode": 7.0},
                        "peak_memory_bytes": 3 * 2**20},
              "untimed": {"params": 1e6, "perplexity": 12.0}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in _markdown({"protocol": "", "models": models}).splitlines()
            if line.startswith("| timed") or line.startswith("| untimed")}
    assert rows["timed"].endswith("| 120.0 | 7.0 | 3 |")
    assert rows["untimed"].endswith("| - | - | - |")


@pytest.mark.slow
def test_peak_memory_is_each_models_own(tmp_path):
    """Measured in a fresh process: two models that differ only in vocabulary differ in peak memory by their
    weights plus the float32 prefill logits (1 x 256 x vocab), whatever the calling process did before (the
    old in-process 'weights + RSS growth' read only the weights once the allocator held memory)."""
    with torch.no_grad():  # earlier work in this process (the eval job runs perplexity and lm-eval first)
        tiny_model("llama", vocab_size=20000)(torch.zeros(1, 256, dtype=torch.long))
    results = {}
    for vocab in (160, 20000):
        folder = tmp_path / f"v{vocab}"
        tiny_model("llama", vocab_size=vocab).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        results[vocab] = measure_peak_memory(folder, prompt_tokens=256, decode_tokens=4)
    weights = {v: 4 * (2 * v * 48 + 3 * (2 * 48 * 48 + 2 * 48 * 24 + 3 * 48 * 37 + 2 * 48) + 48) for v in results}
    assert {v: r.weights_bytes for v, r in results.items()} == weights
    expected = weights[20000] - weights[160] + 256 * (20000 - 160) * 4
    measured = results[20000].peak_bytes - results[160].peak_bytes
    assert 0.8 * expected <= measured <= 1.5 * expected, (measured, expected)
    assert results[160].peak_bytes < 64 * 2**20 < results[160].baseline_bytes  # the interpreter is not counted
    assert all(r.method == "rss-high-water" for r in results.values())


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


@pytest.mark.slow  # ~30 s: two models evaluated end to end in subprocesses
def test_eval_command(tiny_checkpoint, tmp_path):
    """A half-MLP model against its dense baseline: parameters, perplexities (transformers' own loss), the ideal
    speedup (hand count) and the memory and spread fields, end to end through the CLI."""
    _, pruned = half_mlp_pair()
    slim = tmp_path / "slim"
    pruned.save_pretrained(slim)
    tiny_tokenizer().save_pretrained(slim)
    bigbench = tmp_path / "bb" / "navigate"
    bigbench.mkdir(parents=True)
    (bigbench / "task.json").write_text(json.dumps({"examples": [
        {"input": f"Take {i} steps. Are you back?", "target_scores": {"True": i % 2, "False": 1 - i % 2}}
        for i in range(6)]}))
    result = run_cli("eval", str(slim), "--baseline", str(tiny_checkpoint), "--report-dir",
                     str(tmp_path / "report"), "--bigbench-dir", str(tmp_path / "bb"), "--limit", "5",
                     "--cloze-items", "6", "--eval-text", str(EVAL_TEXT))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    model, baseline = report["models"]["slim"], report["models"]["baseline"]
    assert set(model["accuracy"]) == {"depgraph_cloze", "bb_navigate"} and model["accuracy"]["bb_navigate"]["items"] == 5
    hidden_and_norms = 160 * 48 + 3 * (2 * 48 * 48 + 2 * 48 * 24 + 2 * 48) + 48
    assert baseline["params"] == hidden_and_norms + 3 * 3 * 48 * 37 and model["params"] == hidden_and_norms + 3 * 3 * 48 * 18
    for entry, folder in ((model, slim), (baseline, tiny_checkpoint)):
        assert entry["perplexity"] == pytest.approx(hf_perplexity(folder, 512, 8), rel=1e-4)
        assert entry["peak_memory"]["method"] == "rss-high-water" and "decode" in entry["tokens_per_s_spread"]
    assert report["speed"]["slim"]["ideal_speedup_flops"] == pytest.approx(hand_linear_flops(37) / hand_linear_flops(18))
    assert "spread of the repeats" in (tmp_path / "report" / "report.md").read_text()


def test_cloze_accuracy_counts_exactly_the_answers_the_model_knows(tmp_path):
    """Cloze items whose target is the model's own greedy next token (it knows them) and items whose target is its
    second choice (it does not): lm-eval's accuracy must be exactly the known fraction."""
    model, tokenizer = tiny_model("llama", tie=True), tiny_tokenizer()
    words = EVAL_TEXT.read_text().split()
    items, known = [], []
    for start in range(0, 20000, 53):
        context = " ".join(words[start:start + 24])
        ids = tokenizer(context, add_special_tokens=False).input_ids
        with torch.no_grad():
            ranked = model(torch.tensor([ids])).logits[0, -1].argsort(descending=True).tolist()
        for token, is_known in ((ranked[0], True), (ranked[1], False)):
            target = tokenizer.convert_ids_to_tokens(token).replace("\u2581", " ")
            if (target.startswith(" ") and target.strip() and known.count(is_known) < 5
                    and tokenizer(context + target, add_special_tokens=False).input_ids == ids + [token]):
                items.append({"context": context, "target": target})
                known.append(is_known)
        if len(known) == 10:
            break
    assert len(known) == 10 and sum(known) == 5, known
    task = write_cloze_task(tmp_path, items)
    accuracy = evaluate_tasks(model, tokenizer, tmp_path, [task.name])[task.name]
    assert accuracy["items"] == len(items) and accuracy["acc"] == pytest.approx(sum(known) / len(known))
