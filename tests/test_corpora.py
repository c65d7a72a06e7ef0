"""Registers split disjointly and deterministically; each extraction format on small synthetic files; the default
calibration falls back to self-generated text with no corpus and no licence folder; reports record the source."""
import gzip
import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from depgraph_llm.calibration import corpora
from depgraph_llm.calibration.sources import CalibrationSource, default_eval_part, file_source, mixed_source
from depgraph_llm.calibration.corpora import PARTS, REGISTERS, CorpusPart, Register, corpus_part

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_corpora(tmp_path, monkeypatch):
    """No fetched corpus and no licence folder."""
    monkeypatch.setattr(corpora, "corpora_dir", lambda: tmp_path / "empty-cache")
    monkeypatch.setitem(REGISTERS, "licences", replace(REGISTERS["licences"], root=str(tmp_path / "no-licences")))
    return tmp_path


@pytest.fixture
def files_register(tmp_path, monkeypatch):
    """A register of 60 one-line files (plus a symlink to one of them) split by file."""
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i in range(60):
        (folder / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(f"document number {i}")
    (folder / "alias.txt").symlink_to(folder / "doc00.txt")
    register = Register("toy", "toy files", str(folder), "**/*.txt")
    monkeypatch.setitem(REGISTERS, "toy", register)
    return folder


def test_file_split_is_disjoint_complete_and_skips_symlinks(files_register):
    parts = {p: corpus_part("toy", p) for p in PARTS}
    files = [set(part.files) for part in parts.values()]
    assert sum(len(f) for f in files) == 60 == len(set().union(*files))  # each file in exactly one part
    assert all(files)
    assert not any("alias" in f for part in files for f in part)
    for name, part in parts.items():  # the text is exactly its files' text
        assert sorted(part.text.split("\n\n")) == sorted(Path(f).read_text() for f in part.files)
        assert part.units == len(part.files)


def test_split_is_the_same_in_a_fresh_process(files_register):
    here = {p: sorted(corpus_part("toy", p).files) for p in PARTS}
    code = ("import json, sys; from depgraph_llm.calibration import corpora; from depgraph_llm.calibration.corpora import *;"
            f"REGISTERS['toy'] = Register('toy', 'toy', {str(files_register)!r}, '**/*.txt');"
            "print(json.dumps({p: sorted(corpus_part('toy', p).files) for p in PARTS}))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(fresh.stdout) == here


def test_fixed_files_keep_their_part_and_the_rest_go_to_training(tmp_path, monkeypatch):
    for name in ("A", "B", "C", "D", "E"):
        (tmp_path / name).write_text(f"text of {name}")
    monkeypatch.setitem(REGISTERS, "lic", Register("lic", "x", str(tmp_path), "*", unlisted="training",
                                                   fixed={"evaluation": ("C", "A"), "calibration": ("B",)}))
    assert corpus_part("lic", "evaluation").text == "text of C\n\ntext of A"  # listed order
    assert corpus_part("lic", "calibration").text == "text of B"
    assert sorted(Path(f).name for f in corpus_part("lic", "training").files) == ["D", "E"]


def test_wordnet_extraction_strips_index_fields(tmp_path):
    data = tmp_path / "data.verb"
    data.write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by  \n"
        "00004032 29 v 02 sigh 0 suspire 4 004 @ 00001740 v 0000 + 07129602 n 0202 01 + 02 00 | heave or utter a "
        "sigh; breathe deeply and heavily; \"She sighed sadly\"  \n"
        "00004492 29 v 01 hold_out 4 001 @ 02422681 v 0000 01 + 08 00 | keep from exhaling  \n")
    assert corpora.wordnet_glosses(data) == [
        'sigh: heave or utter a sigh; breathe deeply and heavily; "She sighed sadly"',
        "hold out: keep from exhaling"]


def test_fortunes_split_on_percent_lines(tmp_path):
    cookie = tmp_path / "cookie"
    cookie.write_text("First one.\n%\nSecond,\n\t\t-- two lines\n%\n%\nThird 100% sure.\n%\n")
    assert corpora.fortunes(cookie) == ["First one.", "Second,\n\t\t-- two lines", "Third 100% sure."]


def test_jargon_entries_from_gzip(tmp_path):
    path = tmp_path / "jargon.txt.gz"
    text = ("                The Jargon File\n\n   Glossary\n\n   crufty\n\n"
            "   :cruft: n.\n\n   1. Excess; superfluous junk.\n\n   :crufty: /kruhf'tee/, adj.\n\n   Poorly built.\n")
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)
    assert corpora.jargon_entries(path) == [":cruft: n.\n\n1. Excess; superfluous junk.",
                                            ":crufty: /kruhf'tee/, adj.\n\nPoorly built."]


def test_entry_split_is_disjoint_and_complete(tmp_path, monkeypatch):
    (tmp_path / "cookie").write_text("".join(f"saying number {i}\n%\n" for i in range(300)))
    monkeypatch.setitem(REGISTERS, "cookies", Register("cookies", "x", str(tmp_path), "*", extract="fortunes",
                                                       split_by="entry"))
    entries = [set(corpus_part("cookies", p).text.split("\n\n")) for p in PARTS]
    assert sum(len(e) for e in entries) == 300 == len(set().union(*entries))
    assert 30 < len(entries[0]) < 90 and 30 < len(entries[1]) < 90  # 20 % each, give or take


def test_default_falls_back_to_self_generated_text_with_a_log_line(no_corpora, caplog):
    with caplog.at_level(logging.WARNING):
        source = mixed_source()
        part = default_eval_part()
    assert source.is_self and source.text() is None and part is None
    assert "calibrating on text the model generates itself" in caplog.text
    assert "evaluating on text the model generates itself" in caplog.text


def test_missing_registers_are_left_out_of_the_mix(no_corpora, tmp_path, monkeypatch):
    (tmp_path / "lic").mkdir()
    for name in ("Artistic", "BSD", "GPL-3"):
        (tmp_path / "lic" / name).write_text(f"licence {name} " * 50)
    monkeypatch.setitem(REGISTERS, "licences", replace(REGISTERS["licences"], root=str(tmp_path / "lic")))
    source = mixed_source(("licences", "python-docs", "wordnet"))
    assert [p.register for p in source.parts] == ["licences"]
    assert sorted(Path(f).name for f in source.parts[0].files) == ["Artistic", "BSD"]  # GPL-3 is evaluation
    assert "GPL-3" in default_eval_part().text.split()[1]


def test_windows_are_shared_equally_and_recorded(tmp_path):
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = {"a": "alpha " * 400, "b": "bravo " * 400, "c": "charlie " * 400}
    parts = tuple(CorpusPart(name, "calibration", (f"/x/{name}",), 1, text) for name, text in texts.items())
    source = CalibrationSource(parts, label="mixed")
    windows = source.windows(None, tokenizer, 16, 8, seed=3)
    record = source.record(16, 8, 3)
    counts = [p["windows"] for p in record["parts"]]
    assert sorted(counts) == [2, 3, 3] and len(windows) == 8 and all(w.shape == (1, 16) for w in windows)
    assert [p["sha256"] for p in record["parts"]] == [hashlib.sha256(t.encode()).hexdigest() for t in texts.values()]
    assert record["parts"][0]["files"] == ["/x/a"] and record["seed"] == 3 and record["windows"] == 8
    decoded = [tokenizer.decode(w[0]) for w in windows]
    for text, count in zip(texts.values(), counts):  # each register gives exactly its share of the windows
        assert sum(text.split()[0] in d for d in decoded) == count
    assert all((x == y).all() for x, y in zip(source.windows(None, tokenizer, 16, 8, seed=3), windows))


def test_file_source_records_its_files(tmp_path):
    (tmp_path / "one.txt").write_text("alpha beta")
    (tmp_path / "two.txt").write_text("gamma delta")
    source = file_source(tmp_path)
    assert source.label == "files" and [Path(f).name for f in source.parts[0].files] == ["one.txt", "two.txt"]
    assert "alpha beta" in source.text() and "gamma delta" in source.text()


def test_prune_without_any_text_calibrates_and_evaluates_on_generated_text(no_corpora, tiny_checkpoint, caplog):
    from depgraph_llm.job.options import PruneOptions
    from depgraph_llm.job.prune import run_prune

    out = no_corpora / "pruned"
    with caplog.at_level(logging.WARNING):
        result = run_prune(PruneOptions(model=str(tiny_checkpoint), out=out, ratio=0.3, seq_len=32,
                                        calibration_samples=2, eval_seq_len=32, eval_tokens=64, round_to=1,
                                        show_progress=False))
    report = json.loads((out / "prune_report.json").read_text())
    assert report["calibration"]["source"]["source"] == "self"
    assert report["calibration"]["source"]["recipe"]["start"] == "random-token"
    assert report["perplexity"]["files"] == ["self"] and report["perplexity"]["after"]["perplexity"] > 0
    assert "generates itself" in caplog.text and result.plan.keep


def test_default_prune_report_records_registers_files_and_sha256(tiny_checkpoint, tmp_path):
    from depgraph_llm.calibration.sources import DEFAULT_CALIBRATION_REGISTERS
    from depgraph_llm.calibration.corpora import available_registers
    from depgraph_llm.job.options import PruneOptions
    from depgraph_llm.job.prune import run_prune

    present = available_registers(DEFAULT_CALIBRATION_REGISTERS)
    if not present:
        pytest.skip("no calibration register on this machine")
    run_prune(PruneOptions(model=str(tiny_checkpoint), out=tmp_path / "p", ratio=0.3, seq_len=32,
                           calibration_samples=3, eval_tokens=64, round_to=1, show_progress=False, evaluate=False))
    source = json.loads((tmp_path / "p" / "prune_report.json").read_text())["calibration"]["source"]
    assert [p["register"] for p in source["parts"]] == present and source["seed"] == 0
    for part in source["parts"]:
        assert part["sha256"] == corpus_part(part["register"], "calibration").sha256
        assert part["files"] == list(corpus_part(part["register"], "calibration").files)
    assert sum(p["windows"] for p in source["parts"]) == 3


def test_licence_calibration_at_default_sizes_is_the_old_default():
    from depgraph_llm.calibration.sources import (DEFAULT_CALIBRATION_FILES, default_files, load_text, mixed_source,
                                          token_windows)
    from depgraph_llm.calibration.corpora import is_available
    from tests.tiny import tiny_tokenizer

    if not is_available("licences"):
        pytest.skip("no /usr/share/common-licenses here")
    tokenizer = tiny_tokenizer()
    old = token_windows(tokenizer, load_text(default_files(DEFAULT_CALIBRATION_FILES)), 512, 8, 0)
    new = mixed_source(("licences",)).windows(None, tokenizer, 512, 8, 0)
    assert len(new) == 8 and all((a == b).all() for a, b in zip(old, new))


def test_eval_without_any_text_evaluates_on_text_the_reference_model_generates(no_corpora, tiny_checkpoint):
    """`depgraph-llm eval` with no --eval-text, no corpus and no licence folder: generated text, named as such,
    the same in a second call (a fixed seed); with the licence folder, the default evaluation part as `prune`."""
    from depgraph_llm.evaluation.job import EvalOptions, evaluation_text

    options = EvalOptions(models=[str(tiny_checkpoint)], seq_len=32, eval_tokens=64)
    text, files = evaluation_text(options, tiny_checkpoint)
    assert files == [f"self:{tiny_checkpoint}"] and len(text.split()) > 10
    assert evaluation_text(options, tiny_checkpoint) == (text, files)


def test_eval_default_text_is_prunes_default_evaluation_part(tiny_checkpoint):
    from depgraph_llm.evaluation.job import EvalOptions, evaluation_text

    part = default_eval_part()
    if part is None:
        pytest.skip("no evaluation register on this machine")
    assert evaluation_text(EvalOptions(models=[str(tiny_checkpoint)]), tiny_checkpoint) == (part.text, list(part.files))
