"""The default recovery text: an equal share of windows from the training parts of the default registers, never
from the evaluation text; licence files only when no corpus is present; the choice is recorded."""
import hashlib
from pathlib import Path

import pytest

from depgraph_llm.calibration import corpora
from depgraph_llm.calibration.corpora import REGISTERS, Register
from depgraph_llm.errors import UserError
from depgraph_llm.recovery import data
from depgraph_llm.recovery.data import FALLBACK_RECOVERY_FILES, load_recovery_data
from tests.tiny import tiny_tokenizer

WORDS = {"python-docs": "module", "wordnet": "noun"}  # each register's files say only its own word


def _training_by_hand(register: str, key: str) -> bool:
    """The documented split rule, computed here: sha256 of 'register NUL key' as a fraction; training is >= 0.4."""
    return int(hashlib.sha256(f"{register}\0{key}".encode()).hexdigest()[:12], 16) / 16 ** 12 >= 0.4


@pytest.fixture
def toy_registers(tmp_path, monkeypatch):
    """Both default registers as folders of one-file units, each unit text naming its file."""
    for name, word in WORDS.items():
        folder = tmp_path / name
        folder.mkdir()
        for i in range(40):
            (folder / f"u{i:02d}.txt").write_text(" ".join([f"{word} unit{i:02d}"] * 300))
        monkeypatch.setitem(REGISTERS, name, Register(name, name, str(folder), "*.txt"))
    return tmp_path


def test_default_windows_come_equally_from_the_training_parts_only(toy_registers):
    tokenizer = tiny_tokenizer()
    result = load_recovery_data(None, tokenizer, 32, [Path("/usr/share/common-licenses/GPL-3")],
                                windows_wanted=10, seed=3)
    assert len(result.windows) == 10 and result.files == ["python-docs:training", "wordnet:training"]
    assert [p["register"] for p in result.parts] == ["python-docs", "wordnet"]
    seen = {name: 0 for name in WORDS}
    for window in result.windows:
        text = tokenizer.decode(window.flatten().tolist())
        owners = [name for name, word in WORDS.items() if word in text]
        assert len(owners) == 1, text
        numbers = {int(t[4:]) for t in text.split() if t.startswith("unit") and len(t) == 6 and t[4:].isdigit()}
        assert numbers and all(_training_by_hand(owners[0], f"u{n:02d}.txt") for n in numbers), text
        seen[owners[0]] += 1
    assert seen == {"python-docs": 5, "wordnet": 5}  # an equal share of each register


def test_default_parts_never_come_from_an_evaluated_file(toy_registers):
    evaluated = sorted((toy_registers / "wordnet").glob("*.txt"))  # evaluating on the whole register's files
    with pytest.raises(UserError, match="also the evaluation text"):
        load_recovery_data(None, tiny_tokenizer(), 32, evaluated, windows_wanted=4)


def test_without_corpora_the_licence_fallback_is_used_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "corpora_dir", lambda: tmp_path / "empty-cache")
    result = load_recovery_data(None, tiny_tokenizer(), 64, [Path("/usr/share/common-licenses/GPL-3")])
    assert [Path(f).name for f in result.files] == list(FALLBACK_RECOVERY_FILES) and not result.parts
    assert result.tokens == 64 * len(result.windows) > 0


def test_the_default_registers_leave_the_default_evaluation_register_out():
    from depgraph_llm.calibration.sources import DEFAULT_EVAL_REGISTERS

    assert DEFAULT_EVAL_REGISTERS[0] not in data.DEFAULT_RECOVERY_REGISTERS
