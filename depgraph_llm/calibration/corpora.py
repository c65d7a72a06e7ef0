"""Named text registers read where they live, each split by file (or by entry) into disjoint parts.

A register is data: where its files are (a system folder, or a Debian package extracted into the cache by
`scripts/fetch_corpora.py`), how to turn a file into plain-text units, and whether units are whole files or
entries inside one file. Every unit goes to exactly one part (calibration / evaluation / training) by a hash
of its key, so the split is deterministic, stable when files are added, and never depends on the machine.
Nothing here is copied into the repository.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from depgraph_llm.calibration.r_lazyload import character_vectors

log = logging.getLogger(__name__)

PARTS = {"calibration": 0.2, "evaluation": 0.2, "training": 0.6}  # fraction of units in each part, in order


def corpora_dir() -> Path:
    """Where fetched corpora live: $DEPGRAPH_LLM_CACHE/corpora, else $XDG_CACHE_HOME/depgraph-llm/corpora."""
    if os.environ.get("DEPGRAPH_LLM_CACHE"):
        return Path(os.environ["DEPGRAPH_LLM_CACHE"]) / "corpora"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "depgraph-llm" / "corpora"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def whole_file(path: Path) -> list[str]:
    """The file as one unit."""
    return [_read(path)]


def wordnet_glosses(path: Path) -> list[str]:
    """WordNet data.* lines -> "lemma: gloss" (synset offsets, pointers and frame fields stripped)."""
    entries = []
    for line in _read(path).splitlines():
        if line.startswith(" ") or " | " not in line:
            continue  # licence header lines start with two spaces
        fields, gloss = line.split(" | ", 1)
        parts = fields.split()
        lemma = parts[4].replace("_", " ") if len(parts) > 4 else ""
        entries.append(f"{lemma}: {gloss.strip()}" if lemma else gloss.strip())
    return entries


def fortunes(path: Path) -> list[str]:
    """A fortune file: texts separated by lines holding only "%"."""
    return [e.strip("\n") for e in re.split(r"(?m)^%\s*$", _read(path)) if e.strip()]


JARGON_HEADING = re.compile(r"(?m)^   :[^:\n]+:")


def jargon_entries(path: Path) -> list[str]:
    """The Jargon File (gzip): one unit per `:term:` entry, front matter before the first entry dropped."""
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read() if path.suffix == ".gz" else _read(path)
    starts = [m.start() for m in JARGON_HEADING.finditer(text)]
    entries = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    return ["\n".join(line[3:] if line.startswith("   ") else line for line in e.splitlines()).strip()
            for e in entries if e.strip()]


CHAPTER_HEADING = re.compile(r"(?i)^chapter\s+[0-9ivxlc]+\.?\s*$")


def r_novel_chapters(path: Path) -> list[str]:
    """Novels stored as R character vectors of lines (janeaustenr): one unit per chapter, title pages dropped."""
    chapters = []
    for lines in character_vectors(path):
        starts = [i for i, line in enumerate(lines) if CHAPTER_HEADING.match(line.strip())]
        for a, b in zip(starts, starts[1:] + [len(lines)]):
            body = "\n".join(lines[a:b]).strip()
            if body:
                chapters.append(body)
    return chapters


EXTRACTORS: dict[str, Callable[[Path], list[str]]] = {
    "plain": whole_file, "wordnet": wordnet_glosses, "fortunes": fortunes, "jargon": jargon_entries,
    "r-chapters": r_novel_chapters}


@dataclass(frozen=True)
class Register:
    """One kind of English text and where it lives."""

    name: str
    description: str
    root: str  # absolute folder, or a folder inside the extracted `package`
    pattern: str  # glob under root
    package: str | None = None  # Debian package `scripts/fetch_corpora.py` extracts into corpora_dir()
    extract: str = "plain"  # key in EXTRACTORS
    split_by: str = "file"  # "file": whole files go to one part; "entry": units inside the files are split
    exclude: tuple[str, ...] = ()  # glob patterns of file names to skip
    fixed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # part -> file names assigned by hand
    unlisted: str | None = None  # with `fixed`: the part every other file goes to (None: by hash)
    joiner: str = "\n\n"

    def folder(self) -> Path:
        """The folder its files are read from."""
        return corpora_dir() / self.package / self.root if self.package else Path(self.root)

    def files(self) -> list[Path]:
        """Its files (symlinks skipped, so one text never sits in two parts), sorted."""
        folder = self.folder()
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob(self.pattern) if p.is_file() and not p.is_symlink()
                      and not any(p.match(x) for x in self.exclude))


# The licence parts keep the files the project quoted before (evaluation = the set in shared/assets.md).
REGISTERS: dict[str, Register] = {r.name: r for r in (
    Register("licences", "software licence prose (legal register)", "/usr/share/common-licenses", "*",
             fixed={"evaluation": ("GPL-3", "Apache-2.0", "GFDL-1.3", "MPL-2.0", "LGPL-3"),
                    "calibration": ("Artistic", "BSD", "CC0-1.0", "MPL-1.1", "GPL-1")}, unlisted="training"),
    Register("python-docs", "the Python 3.11 documentation (technical reStructuredText)",
             "usr/share/doc/python3.11/html/_sources", "**/*.rst.txt", package="python3.11-doc"),
    Register("wordnet", "WordNet 3.0 glosses (definitions and example sentences)", "usr/share/wordnet", "data.*",
             package="wordnet-base", extract="wordnet", split_by="entry", joiner="\n"),
    Register("fortunes", "fortune cookies (quotes, jokes, short prose and verse)", "usr/share/games/fortunes", "*",
             package="fortunes", extract="fortunes", split_by="entry", exclude=("*.dat", "*.u8")),
    Register("jargon", "the Jargon File (hacker slang dictionary)", "usr/share/doc/jargon-text", "jargon.txt.gz",
             package="jargon-text", extract="jargon", split_by="entry"),
    Register("novels", "Jane Austen's six novels (19th-century literary prose), one unit per chapter",
             "usr/lib/R/site-library/janeaustenr/data", "Rdata.rdb", package="r-cran-janeaustenr",
             extract="r-chapters", split_by="entry"),
)}


@dataclass(frozen=True)
class CorpusPart:
    """The text of one part of one register, with what it was built from."""

    register: str
    part: str
    files: tuple[str, ...]
    units: int
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self) -> dict:
        """Provenance for a plan or report: register, part, files, unit count, sha256 of the text."""
        return {"register": self.register, "part": self.part, "files": list(self.files), "units": self.units,
                "sha256": self.sha256}


def unit_part(register: str, key: str) -> str:
    """The part a unit belongs to: a pure function of (register, key), uniform over PARTS' fractions."""
    bucket = int(hashlib.sha256(f"{register}\0{key}".encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12
    edge = 0.0
    for part, share in PARTS.items():
        edge += share
        if bucket < edge:
            return part
    return part


def _order(register: str, key: str) -> str:
    """Units inside a part are ordered by a second hash, so the first tokens of a part span many units."""
    return hashlib.sha256(f"order\0{register}\0{key}".encode("utf-8")).hexdigest()


def is_available(name: str) -> bool:
    """Whether the register's files are present on this machine."""
    return bool(REGISTERS[name].files())


def available_registers(names: tuple[str, ...] | None = None) -> list[str]:
    """The registers (all, or those named) whose files are present."""
    return [n for n in (names or tuple(REGISTERS)) if is_available(n)]


def corpus_part(name: str, part: str) -> CorpusPart:
    """The text of `part` of register `name` (KeyError for unknown names, FileNotFoundError if absent)."""
    if part not in PARTS:
        raise KeyError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    register = REGISTERS[name]
    files = register.files()
    if not files:
        raise FileNotFoundError(f"register {name} is not present under {register.folder()}")
    extract = EXTRACTORS[register.extract]
    folder = register.folder()
    fixed = {f: p for p, names in register.fixed.items() for f in names}
    chosen: list[tuple[str, str]] = []  # (sort key, text)
    used: list[str] = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if register.split_by == "file":
            owner = fixed.get(rel) or register.unlisted or unit_part(name, rel)
            if owner != part:
                continue
            order = f"0{register.fixed[part].index(rel):06d}" if rel in fixed else "1" + _order(name, rel)
            chosen.extend((order, t) for t in extract(path))
            used.append(str(path))
        else:
            entries = [e for e in extract(path) if unit_part(name, e) == part]
            chosen.extend((_order(name, e), e) for e in entries)
            if entries:
                used.append(str(path))
    chosen.sort(key=lambda item: item[0])
    texts = [t for _, t in chosen if t.strip()]
    return CorpusPart(name, part, tuple(used), len(texts), register.joiner.join(texts))
