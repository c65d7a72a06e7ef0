"""Running out of memory ends in one line that names the peak reached and the fix (--streaming on the in-memory
path), never a traceback; --in-memory forces the whole-model path that the automatic switch would avoid."""
import errno

import pytest

from depgraph_llm.cli import commands as cli
from depgraph_llm.job.stage_memory import is_out_of_memory, out_of_memory_message

ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
             "to allocate 4000000000 bytes. Error code 12 (Cannot allocate memory)")


def test_allocation_failures_are_recognised_and_other_errors_are_not():
    assert is_out_of_memory(RuntimeError(ALLOCATOR))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert not is_out_of_memory(RuntimeError("size mismatch for model.layers.0.mlp.down_proj.weight"))
    assert not is_out_of_memory(OSError(errno.ENOENT, "No such file or directory"))


def test_message_points_the_in_memory_path_to_streaming():
    message = out_of_memory_message(RuntimeError(ALLOCATOR), streaming=False)
    assert "\n" not in message and "--streaming" in message and "4000000000 bytes" in message
    assert "GB resident" in message
    assert "--streaming" not in out_of_memory_message(MemoryError(), streaming=True)


@pytest.mark.parametrize("raised", [RuntimeError(ALLOCATOR), MemoryError()])
def test_cli_turns_an_allocation_failure_into_one_line(raised, tmp_path, monkeypatch, capsys):
    from depgraph_llm.job import prune as pipeline

    seen = {}

    def fail(options):
        seen["in_memory"] = options.in_memory
        raise raised

    monkeypatch.setattr(pipeline, "run_prune", fail)
    code = cli.main(["prune", "--model", str(tmp_path), "--out", str(tmp_path / "out"), "--ratio", "0.2",
                     "--in-memory"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and seen == {"in_memory": True}
    assert len(err.splitlines()) == 1 and err.startswith("error: out of memory after reaching") and "--streaming" in err


def test_other_failures_still_raise(tmp_path, monkeypatch):
    from depgraph_llm.job import prune as pipeline

    monkeypatch.setattr(pipeline, "run_prune", lambda options: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["prune", "--model", str(tmp_path), "--out", str(tmp_path / "out"), "--ratio", "0.2"])


def test_in_memory_refuses_streaming_in_one_line(tmp_path, capsys):
    from tests.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny")
    code = cli.main(["prune", "--model", str(model), "--out", str(tmp_path / "out"), "--ratio", "0.2",
                     "--in-memory", "--streaming"])
    assert code == 2 and "cannot be combined with --streaming" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
