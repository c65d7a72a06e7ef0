"""Run the CLI in a subprocess and fingerprint folders, for tests that must prove nothing was touched."""
import json
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--seq-len", "32", "--calibration-samples", "2", "--eval-tokens", "128", "--round-to", "1"]


def run_prune(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "prune.py"), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "depgraph_llm.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def tree_digest(folder: Path) -> str:
    """sha256 over every path and file content under `folder` (plus permissions)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(str(path.stat().st_mode).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def error_line(stderr: str) -> str:
    """The single `error: ...` line of a failed run (progress bars may precede it; a traceback may not)."""
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-2000:]
    return lines[0]


def one_line_error(result, code: int = 2) -> str:
    """Assert a failed run exited with `code` and ended with exactly one error line; return that line."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    return error_line(result.stderr)


def plan_without_measurements(plan_file: Path) -> dict:
    """prune_plan.json without the measured block-output errors (what the reconstruction cost, measured by the
    in-memory path only), so two runs can be compared on what they removed and how they refitted it."""
    plan = json.loads(Path(plan_file).read_text())
    report = plan.get("reconstruct_report") or {}
    for key in [k for k in report if k.startswith("error_")]:
        del report[key]
    return plan
