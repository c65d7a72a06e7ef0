"""Scale benchmark: prune a shaped checkpoint (scripts/make_shaped_checkpoint.py) through the streaming path
(or the in-memory one) in a child process; record wall time, the child's peak RSS, the per-stage peaks from
prune_report.json and the output checkpoint's size.

    python scripts/bench_scale.py MODEL_DIR OUT_DIR [--in-memory] [--address-space-gb G] [-- prune.py arguments]

Appends one row to docs/results/bench-scale/results.json (or --results)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "bench-scale" / "results.json"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(model: Path, out: Path, in_memory: bool, extra: list[str], timeout: int,
        address_space_gb: float | None = None) -> dict:
    """One prune in a child process, measured from outside (under an address-space limit when asked, so that an
    in-memory run too big for the machine fails alone instead of taking the machine down)."""
    command = [sys.executable, str(ROOT / "prune.py"), "--model", str(model), "--out", str(out), *extra,
               "--in-memory" if in_memory else "--streaming"]
    if address_space_gb is not None:
        command = ["prlimit", f"--as={int(address_space_gb * 2 ** 30)}", *command]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    row = {"model": str(model), "path": "in-memory" if in_memory else "streaming",
           "command": " ".join(command[1:] if address_space_gb is None else [command[0], command[1], *command[3:]]),
           "returncode": result.returncode, "wall_s": round(wall, 1),
           # the child resets its high-water mark at every stage, so this is the peak after the last reset; the
           # run's peak is the largest of peak_rss_by_stage_bytes (peak_rss_bytes below)
           "child_maxrss_after_last_reset_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "source_bytes": folder_bytes(model), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if result.returncode != 0:
        row["error"] = (result.stderr.strip().splitlines() or [""])[-1][:300]
        return row
    report = json.loads((out / "prune_report.json").read_text())
    row.update(checkpoint_bytes=folder_bytes(out), shards=len(list(out.glob("*.safetensors"))),
               ratio_achieved=report["ratio_achieved"], params_before=report["params_before"],
               params_after=report["params_after"], peak_rss_by_stage_bytes=report.get("peak_rss_by_stage_bytes"),
               peak_rss_bytes=max((report.get("peak_rss_by_stage_bytes") or {"": 0}).values()),
               timings_s=report.get("timings_s"), streaming=report.get("streaming"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--in-memory", action="store_true", help="the in-memory path instead of --streaming")
    parser.add_argument("--timeout", type=int, default=6 * 3600)
    parser.add_argument("--address-space-gb", type=float, help="run the child under prlimit --as (GiB)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    append_row(args.results, run(args.model, args.out, args.in_memory, extra, args.timeout, args.address_space_gb))


def append_row(results: Path, row: dict) -> None:
    """Add one row to a results JSON list (created if absent) and print it."""
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(results.read_text()) if results.is_file() else []
    rows.append(row)
    results.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
