#!/usr/bin/env python
"""Fetch the BIG-bench multiple-choice task files once (from the PyPI source archive) into the cache.

    python scripts/fetch_bigbench.py            # -> $DEPGRAPH_LLM_CACHE/bigbench/<task>/task.json

Only the task.json files of the tasks below are extracted (the archive is 358 MB; nothing is installed).
`depgraph-llm eval` picks them up from the cache; pass --bigbench-dir to use another folder.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depgraph_llm.evaluation.job import BIGBENCH_TASKS, default_bigbench_dir  # noqa: E402


def main() -> None:
    target = default_bigbench_dir()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "bigbench==1.0.0", "-d", tmp], check=True)
        archive = next(Path(tmp).glob("bigbench-*.tar.gz"))
        with tarfile.open(archive) as tar:
            for member in tar:
                for task in BIGBENCH_TASKS:
                    if member.name.endswith(f"/benchmark_tasks/{task}/task.json"):
                        out = target / task.replace("/", "__") / "task.json"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        print(f"{task}: {out}")


if __name__ == "__main__":
    main()
