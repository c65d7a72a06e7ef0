"""The end-of-run tables fit an ordinary terminal: values wrap, nothing is lost."""
from pathlib import Path

import pytest

from depgraph_llm.cli.summary import key_value_table, prune_summary

LONG_PATH = "/data/checkpoints/" + "very-long-folder-name-" * 6 + "model"
TIMINGS = {f"stage{i}": 10.0 + i for i in range(14)}


def _report() -> dict:
    widths = [{"mlp": 1536, "q_heads": 9, "kv_heads": 3}] * 30
    return {"source": {"path": LONG_PATH}, "importance": "taylor", "schedule": "uniform", "reconstruct": "obs",
            "params_before": 134_515_008, "params_after": 100_917_888, "ratio_requested": 0.25,
            "ratio_achieved": 0.2498, "layer_widths_before": widths,
            "layer_widths_after": [{"mlp": 1000 + i, "q_heads": 9, "kv_heads": 3} for i in range(30)],
            "perplexity": {"before": {"perplexity": 24.9}, "after": {"perplexity": 72.8}},
            "timings_s": TIMINGS, "peak_rss_bytes": 2 * 2 ** 30}


@pytest.mark.parametrize("width", [60, 80, 100])
def test_prune_summary_fits_the_terminal_and_keeps_every_word(width, monkeypatch):
    monkeypatch.setattr("depgraph_llm.cli.summary.terminal_width", lambda: width)
    text = prune_summary(_report(), Path("out"))
    lines = text.strip("\n").splitlines()
    assert max(len(line) for line in lines) <= width
    value_column = len(lines[1].split("  ")[0]) + 2  # the rule line under the header: key width, two spaces
    values = [line[value_column:] for line in lines[2:]]
    for name, seconds in TIMINGS.items():  # the long "time" row wrapped, not cut
        assert f"{name} {seconds:.1f}s" in " ".join(values)
    assert LONG_PATH in "".join(values)  # the path, cut across lines

def test_key_value_table_continues_a_value_on_lines_with_an_empty_key():
    lines = key_value_table([["k", "one two three four five six"]], ["key", "value"], width=20).splitlines()
    assert lines[0].split() == ["key", "value"] and lines[2].startswith("k  ")
    assert all(line.startswith("   ") for line in lines[3:]) and len(lines) > 3
    assert " ".join(" ".join(line.split()[1:] if i == 0 else line.split()) for i, line in enumerate(lines[2:])) \
        == "one two three four five six"
