"""The package installs its parts under its own namespace, so a user's own `models/` or `evaluation/` never clash."""
import subprocess
import sys


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_api_imports_from_a_folder_with_its_own_models_package(tmp_path):
    for name in ("models", "recovery", "evaluation"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("USER_PACKAGE = True\n")
    code = ("from depgraph_llm.job.prune import run_prune\n"
            "import depgraph_llm.models, depgraph_llm.recovery.reconstruct, depgraph_llm.evaluation.job\n"
            "import models, recovery, evaluation\n"
            "assert models.USER_PACKAGE and recovery.USER_PACKAGE and evaluation.USER_PACKAGE\n"
            "assert depgraph_llm.models.spec_for('llama') is not None\n")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr


def test_no_generic_top_level_modules_are_installed(tmp_path):
    code = ("import importlib.util\n"
            "print([n for n in ('models', 'recovery', 'evaluation') if importlib.util.find_spec(n)])\n")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
