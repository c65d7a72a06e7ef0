"""Read the character vectors stored in an R package's lazy-load data base (`data/Rdata.rdb`).

R packages such as janeaustenr ship their data as a `.rdb` file: a sequence of records, each a 4-byte big-endian
uncompressed length followed by a zlib stream holding one object in R's XDR serialization. Only what text
corpora need is read here: top-level character vectors (STRSXP of CHARSXP). Other objects are skipped.
No R installation is needed, and nothing is executed.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

STRSXP, CHARSXP = 16, 9
NA_LENGTH = -1


class RFormatError(ValueError):
    """The file is not an R lazy-load data base of the kind read here."""


def records(data: bytes) -> list[bytes]:
    """The decompressed records of a zlib-compressed (type 1) `.rdb` file, in file order."""
    out, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise RFormatError("truncated record header")
        expected = struct.unpack(">i", data[pos:pos + 4])[0]
        stream = zlib.decompressobj()
        try:
            raw = stream.decompress(data[pos + 4:])
        except zlib.error as exc:
            raise RFormatError(f"record at byte {pos} is not zlib data: {exc}") from exc
        if not stream.eof:
            raise RFormatError(f"record at byte {pos} is truncated")
        if len(raw) != expected:
            raise RFormatError(f"record at byte {pos}: {len(raw)} bytes, header says {expected}")
        out.append(raw)
        pos = len(data) - len(stream.unused_data)
    return out


def character_vector(raw: bytes) -> list[str] | None:
    """The strings of one serialized object if it is a character vector (NA as ""), else None."""
    if raw[:2] != b"X\n":
        raise RFormatError("not XDR serialization (expected 'X\\n')")
    version = struct.unpack(">i", raw[2:6])[0]
    pos = 14  # format version, writer's R version, minimal reader version
    if version == 3:
        encoding_length = struct.unpack(">i", raw[pos:pos + 4])[0]
        pos += 4 + encoding_length
    flags, count = struct.unpack(">ii", raw[pos:pos + 8])
    if flags & 0xFF != STRSXP:
        return None
    pos += 8
    strings = []
    for _ in range(count):
        flags, length = struct.unpack(">ii", raw[pos:pos + 8])
        if flags & 0xFF != CHARSXP:
            raise RFormatError(f"element of a character vector has type {flags & 0xFF}, not CHARSXP")
        pos += 8
        if length == NA_LENGTH:
            strings.append("")
            continue
        if pos + length > len(raw):
            raise RFormatError(f"a string of {length} bytes runs past the end of its record")
        strings.append(raw[pos:pos + length].decode("utf-8", errors="replace"))
        pos += length
    return strings


def character_vectors(path: Path) -> list[list[str]]:
    """Every top-level character vector in the `.rdb` file at `path`, in file order."""
    try:
        vectors = [character_vector(raw) for raw in records(path.read_bytes())]
    except struct.error as exc:  # a record that ends inside a field
        raise RFormatError(f"{path}: a serialized object ends early ({exc})") from exc
    return [v for v in vectors if v is not None]
