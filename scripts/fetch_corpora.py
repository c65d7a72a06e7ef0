#!/usr/bin/env python
"""Fetch the text registers that install by Debian package name into the corpus cache (no system install).

    python scripts/fetch_corpora.py              # every packaged register -> $DEPGRAPH_LLM_CACHE/corpora/<package>/
    python scripts/fetch_corpora.py wordnet      # only the named registers

Each package is fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a temporary folder that is
renamed into place, so an interrupted fetch leaves nothing half-written. Already fetched packages are skipped.
Run `apt-get update` first on a fresh machine. The licence register needs no fetch (/usr/share/common-licenses).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depgraph_llm.calibration.corpora import REGISTERS, corpora_dir  # noqa: E402


def fetch(package: str, target: Path) -> None:
    """apt-get download + dpkg-deb -x one package into target (atomic rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        deb = next(Path(tmp).glob("*.deb"))
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        unpacked.rename(target)


def main(argv: list[str]) -> int:
    names = argv or [n for n, r in REGISTERS.items() if r.package]
    unknown = [n for n in names if n not in REGISTERS]
    if unknown:
        print(f"unknown register(s) {', '.join(unknown)}; choose from {', '.join(REGISTERS)}", file=sys.stderr)
        return 2
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        print("apt-get and dpkg-deb are needed (Debian/Ubuntu); without them the default calibration falls back "
              "to the registers present, or to self-generated text", file=sys.stderr)
        return 1
    for name in names:
        register = REGISTERS[name]
        if not register.package:
            print(f"{name}: read in place from {register.folder()}")
            continue
        target = corpora_dir() / register.package
        if not target.exists():
            fetch(register.package, target)
        print(f"{name}: {len(register.files())} files under {register.folder()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
