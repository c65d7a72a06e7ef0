"""Local lm-eval tasks generated at run time: a LAMBADA-style last-word cloze from held-out prose, and
multiple-choice item sets (e.g. BIG-bench task.json files). Written as YAML + JSONL so lm-eval runs offline."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from depgraph_llm.errors import UserError

WORD = re.compile(r"^[A-Za-z][A-Za-z'-]{2,}$")


@dataclass(frozen=True)
class LocalTask:
    name: str
    yaml_path: Path
    items: int
    chance: float | None  # accuracy of random guessing (None for the cloze: open vocabulary)


def cloze_items(text: str, count: int, context_words: int = 60, seed: int = 0) -> list[dict]:
    """Passages ending at a sentence's last word: context = the words before it, target = that word."""
    words = text.split()
    candidates = []
    for i in range(context_words, len(words)):
        token = words[i]
        stripped = token.rstrip(".!?")
        if token.endswith((".", "!", "?")) and stripped != token and WORD.match(stripped):
            candidates.append(i)
    if not candidates:
        raise UserError("the cloze text has no sentence-final words; pass longer prose with --eval-text")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, min(count, len(candidates))))
    return [{"context": " ".join(words[i - context_words:i]), "target": " " + words[i].rstrip(".!?")} for i in chosen]


def bigbench_items(task_json: Path, count: int | None = None, seed: int = 0) -> list[dict]:
    """BIG-bench multiple-choice examples as {"question", "choices", "label"} (label = best-scoring choice)."""
    data = json.loads(task_json.read_text())
    items = []
    for example in data.get("examples", []):
        scores = example.get("target_scores")
        if not scores or len(scores) < 2:
            continue
        choices = list(scores)
        items.append({"question": f"Q: {example['input'].strip()}\nA:", "choices": choices,
                      "label": max(range(len(choices)), key=lambda i: scores[choices[i]])})
    if count is not None and count < len(items):
        items = random.Random(seed).sample(items, count)
    return items


def _write(folder: Path, name: str, items: list[dict], body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                         f"    test: {json.dumps(str(data.resolve()))}\ntest_split: test\n" + body)
    return yaml_path


def write_cloze_task(folder: Path, items: list[dict], name: str = "depgraph_cloze") -> LocalTask:
    body = ("output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return LocalTask(name, _write(folder, name, items, body), len(items), None)


def write_choice_task(folder: Path, name: str, items: list[dict]) -> LocalTask:
    body = ("output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    chance = sum(1 / len(item["choices"]) for item in items) / len(items)
    return LocalTask(name, _write(folder, name, items, body), len(items), chance)
