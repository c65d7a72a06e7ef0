"""The R lazy-load reader against files serialized by hand from R's documented XDR layout, and the novels
register against the real janeaustenr package when it is fetched."""
import struct
import zlib

import pytest

from depgraph_llm.calibration import corpora
from depgraph_llm.calibration.r_lazyload import RFormatError, character_vectors


def xdr_character_vector(strings: list[str | None], version: int = 3) -> bytes:
    """One STRSXP as R's serialize(xdr=TRUE) writes it (None: NA_character_)."""
    header = b"X\n" + struct.pack(">iii", version, 0x040300, 0x030500)
    if version == 3:
        header += struct.pack(">i", 5) + b"UTF-8"
    body = struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            body += struct.pack(">ii", 9, -1)
        else:
            encoded = s.encode("utf-8")
            body += struct.pack(">ii", 0x00040009, len(encoded)) + encoded
    return header + body


def xdr_integer_vector(values: list[int]) -> bytes:
    return (b"X\n" + struct.pack(">iii", 2, 0x040300, 0x020300) + struct.pack(">ii", 13, len(values))
            + b"".join(struct.pack(">i", v) for v in values))


def rdb(objects: list[bytes]) -> bytes:
    return b"".join(struct.pack(">i", len(o)) + zlib.compress(o) for o in objects)


def test_reads_character_vectors_and_skips_other_objects(tmp_path):
    path = tmp_path / "Rdata.rdb"
    path.write_bytes(rdb([xdr_character_vector(["EMMA", "", None, "caf\u00e9 \u2014 r\u00e9sum\u00e9"]),
                          xdr_integer_vector([1, 2, 3]),
                          xdr_character_vector(["second"], version=2)]))
    assert character_vectors(path) == [["EMMA", "", "", "caf\u00e9 \u2014 r\u00e9sum\u00e9"], ["second"]]


def test_truncated_or_foreign_files_are_refused(tmp_path):
    whole = rdb([xdr_character_vector(["a", "b"])])
    (tmp_path / "cut.rdb").write_bytes(whole[:-3])
    (tmp_path / "text.rdb").write_bytes(b"not an R data base at all")
    (tmp_path / "short.rdb").write_bytes(rdb([xdr_character_vector(["abc", "def"])[:-5]]))  # zlib fine, body cut
    (tmp_path / "string.rdb").write_bytes(rdb([xdr_character_vector(["abc", "defgh"])[:-2]]))  # inside a string
    for name in ("cut.rdb", "text.rdb", "short.rdb", "string.rdb"):
        with pytest.raises(RFormatError):
            character_vectors(tmp_path / name)


def test_chapters_are_units_and_title_pages_are_dropped(tmp_path):
    book_a = ["A NOVEL", "", "By Someone", "", "CHAPTER I", "", "First line.", "CHAPTER II", "Second."]
    book_b = ["Another", "Chapter 1", "One.", "", "Chapter 2.", "Two."]
    path = tmp_path / "Rdata.rdb"
    path.write_bytes(rdb([xdr_character_vector(book_a), xdr_character_vector(book_b)]))
    assert corpora.r_novel_chapters(path) == ["CHAPTER I\n\nFirst line.", "CHAPTER II\nSecond.",
                                              "Chapter 1\nOne.", "Chapter 2.\nTwo."]


@pytest.mark.skipif(not corpora.is_available("novels"), reason="run scripts/fetch_corpora.py novels")
def test_the_real_package_gives_six_novels_and_disjoint_parts():
    path = corpora.REGISTERS["novels"].files()[0]
    titles = sorted(v[0].upper() for v in character_vectors(path))
    assert titles == ["EMMA", "MANSFIELD PARK", "NORTHANGER ABBEY", "PERSUASION", "PRIDE AND PREJUDICE",
                      "SENSE AND SENSIBILITY"]
    chapters = corpora.r_novel_chapters(path)
    assert any(c.startswith("CHAPTER I\n") and "Emma Woodhouse, handsome, clever, and rich" in c for c in chapters)
    assert sum(corpora.corpus_part("novels", p).units for p in corpora.PARTS) == len(set(chapters))
    evaluation = corpora.corpus_part("novels", "evaluation").text
    calibration_chapters = [c for c in chapters if corpora.unit_part("novels", c) == "calibration"]
    assert calibration_chapters and not any(c in evaluation for c in calibration_chapters)
