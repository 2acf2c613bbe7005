"""DocumentReader: every kind of bad input is counted under its reason and named by
file[:line | :row N] (or, with on_error=fail, stops reading with InputError naming it);
gzip, zstd and xz inputs, parquet, Arrow IPC and `datasets` save_to_disk directories are
read, big ones in bounded memory; the numeric filter; inputs resolve from files,
directories, globs and embedded corpora, each file once; documents come in a stable order."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import sysconfig
import zlib
from pathlib import Path

import pytest

from data.sources import (
    FILTERED_EXAMPLES,
    MAX_EXAMPLES,
    ON_ERROR,
    Document,
    DocumentReader,
    InputError,
    TextPieces,
    manpage_files,
    resolve_arguments,
    resolve_inputs,
    stdlib_files,
)


def _write(root: Path, name: str, content: str | bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


RECORDS = [f"record {i}: " + "words " * (i % 7) for i in range(200)]
RECORDS_GZ = gzip.compress(_jsonl(*({"text": t} for t in RECORDS)).encode("utf-8"))


def _truncated_records() -> tuple[bytes, int]:
    """A .jsonl.gz cut in the middle of its stream, and how many whole records it still holds."""
    cut = RECORDS_GZ[: len(RECORDS_GZ) // 2]
    return cut, zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Good documents and one or more of every kind of bad input."""
    root = tmp_path / "mixed"
    _write(root, "a_good.txt", "a good document\n")
    _write(root, "b_good.txt.gz", gzip.compress(b"a gzip'd document\n"))
    _write(
        root,
        "c_lines.jsonl",
        _jsonl(
            {"text": "line one"},  # 1
            "",  # 2 blank line
            "   ",  # 3 blank line
            '{"text": "unterminated',  # 4 malformed
            {"body": "no text"},  # 5 missing field
            ["not", "an", "object"],  # 6 missing field
            {"text": 7},  # 7 invalid type
            {"text": None},  # 8 invalid type
            {"text": " \n\t "},  # 9 empty text
            {"text": "line ten ünïcödé"},  # 10
        ).encode()
        + b'{"text": "caf\xe9"}\n'  # 11 invalid utf-8
        + b'{"text": "crlf line"}\r\n',  # 12
    )
    _write(root, "d_latin1.txt", b"abc caf\xe9")
    _write(root, "e_blob.bin", b"\x7fELF\x02\x01\x00\x00binary")
    _write(root, "f_empty.txt", b"")
    _write(root, "g_blank.txt", " \n\t\r\n ")
    _write(root, "h_corrupt.txt.gz", b"this is not gzip data")
    _write(root, "i_corrupt.jsonl.gz", b"neither is this\n")
    cut, _ = _truncated_records()
    _write(root, "j_truncated.jsonl.gz", cut)
    whole = gzip.compress(" ".join(RECORDS).encode())
    _write(root, "k_truncated.txt.gz", whole[: len(whole) // 2])
    (root / "l_dangling.txt").symlink_to(root / "does-not-exist")
    _write(root, "sub/m_nested.jsonl.gz", gzip.compress(_jsonl({"text": "nested"}).encode()))
    return root


def test_every_bad_input_is_counted_and_named(mixed):
    reader = DocumentReader([str(mixed)])
    docs = list(reader)
    _, held = _truncated_records()
    r = str(mixed)

    expected_docs = [
        (f"{r}/a_good.txt", "a good document\n"),
        (f"{r}/b_good.txt.gz", "a gzip'd document\n"),
        (f"{r}/c_lines.jsonl:1", "line one"),
        (f"{r}/c_lines.jsonl:10", "line ten ünïcödé"),
        (f"{r}/c_lines.jsonl:12", "crlf line"),
        *((f"{r}/j_truncated.jsonl.gz:{i + 1}", RECORDS[i]) for i in range(held)),
        (f"{r}/sub/m_nested.jsonl.gz:1", "nested"),
    ]
    assert [(d.where, d.text) for d in docs] == expected_docs
    assert 0 < held < len(RECORDS)

    stats = reader.stats
    assert stats.documents_skipped == {
        "empty_document": 5,  # 2 blank lines, a blank "text", an empty and a blank file
        "malformed_json": 1,
        "missing_field": 2,
        "invalid_field_type": 2,
        "invalid_utf8": 2,
        "binary_file": 1,
        "unreadable_file": 5,  # corrupt .txt.gz and .jsonl.gz, truncated ones, dangling link
    }
    assert stats.documents_yielded == len(expected_docs)
    assert stats.documents_read == len(expected_docs) + 18
    assert stats.reconciles
    assert stats.files == 13
    reasons = [e.split(" (")[0] for e in stats.skipped_examples]
    assert reasons == [
        f"{r}/c_lines.jsonl:2: empty_document",
        f"{r}/c_lines.jsonl:3: empty_document",
        f"{r}/c_lines.jsonl:4: malformed_json",
        f"{r}/c_lines.jsonl:5: missing_field",
        f"{r}/c_lines.jsonl:6: missing_field",
        f"{r}/c_lines.jsonl:7: invalid_field_type",
        f"{r}/c_lines.jsonl:8: invalid_field_type",
        f"{r}/c_lines.jsonl:9: empty_document",
        f"{r}/c_lines.jsonl:11: invalid_utf8",
        f"{r}/d_latin1.txt: invalid_utf8",
        f"{r}/e_blob.bin: binary_file",
        f"{r}/f_empty.txt: empty_document",
        f"{r}/g_blank.txt: empty_document",
        f"{r}/h_corrupt.txt.gz: unreadable_file",
        f"{r}/i_corrupt.jsonl.gz:1: unreadable_file",
        f"{r}/j_truncated.jsonl.gz:{held + 1}: unreadable_file",
        f"{r}/k_truncated.txt.gz: unreadable_file",
        f"{r}/l_dangling.txt: unreadable_file",
    ]
    details = dict(e.split(": ", 1) for e in stats.skipped_examples)
    assert details[f"{r}/d_latin1.txt"] == "invalid_utf8 (byte 7)"
    assert details[f"{r}/c_lines.jsonl:11"] == "invalid_utf8 (byte 13)"
    assert details[f"{r}/c_lines.jsonl:5"] == "missing_field (no 'text')"
    assert details[f"{r}/c_lines.jsonl:8"] == "invalid_field_type ('text' is NoneType)"
    assert details[f"{r}/c_lines.jsonl:2"] == "empty_document (blank line)"
    assert "EOFError" in details[f"{r}/j_truncated.jsonl.gz:{held + 1}"]
    assert "BadGzipFile" in details[f"{r}/h_corrupt.txt.gz"]
    assert "FileNotFoundError" in details[f"{r}/l_dangling.txt"]


BAD_INPUTS = [
    # name, content, where (relative), reason
    ("bad.jsonl", _jsonl({"text": "ok"}, {"text": "ok"}, "{oops"), "bad.jsonl:3", "malformed_json"),
    ("bad.jsonl", _jsonl({"text": "ok"}, {"other": "x"}), "bad.jsonl:2", "missing_field"),
    ("bad.jsonl", _jsonl({"text": ["a", "list"]}), "bad.jsonl:1", "invalid_field_type"),
    ("bad.jsonl", _jsonl({"text": "ok"}, ""), "bad.jsonl:2", "empty_document"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "bad.jsonl:2", "invalid_utf8"),
    ("bad.txt", b"\xc3\x28 invalid", "bad.txt", "invalid_utf8"),
    ("bad.txt", "", "bad.txt", "empty_document"),
    ("bad.dat", b"text then \x00 NUL", "bad.dat", "binary_file"),
    ("bad.txt.gz", b"\x1f\x8b but not really gzip", "bad.txt.gz", "unreadable_file"),
    ("bad.jsonl.gz", RECORDS_GZ[:-8], "bad.jsonl.gz:201", "unreadable_file"),  # no gzip trailer
]


@pytest.mark.parametrize(("name", "content", "where", "reason"), BAD_INPUTS, ids=[b[3] for b in BAD_INPUTS])
def test_on_error_fail_stops_at_the_bad_input(tmp_path, name, content, where, reason):
    _write(tmp_path, "a_before.txt", "read before the bad input")
    _write(tmp_path, name, content)
    _write(tmp_path, "z_after.txt", "never read")
    reader = DocumentReader([str(tmp_path)], on_error="fail")
    seen = []
    with pytest.raises(InputError) as err:
        for doc in reader:
            seen.append(doc.where)
    assert str(err.value).startswith(f"{tmp_path}/{where}: {reason}")
    assert isinstance(err.value, ValueError)  # the CLI reports ValueErrors as errors, not crashes
    assert seen[0] == f"{tmp_path}/a_before.txt" and f"{tmp_path}/z_after.txt" not in seen
    # The same input under on_error=skip: counted, named, and reading goes on.
    skip = DocumentReader([str(tmp_path)])
    wheres = [d.where for d in skip]
    assert wheres[0] == f"{tmp_path}/a_before.txt" and wheres[-1] == f"{tmp_path}/z_after.txt"
    assert skip.stats.documents_skipped == {reason: 1}
    assert skip.stats.skipped_examples[0].startswith(f"{tmp_path}/{where}: {reason}")
    assert skip.stats.reconciles


def test_gzip_inputs_are_read(tmp_path):
    text = "Grüße aus der gzip-Datei\n" * 50
    _write(tmp_path, "doc.txt.gz", gzip.compress(text.encode()))
    _write(tmp_path, "UPPER.TXT.GZ", gzip.compress(b"upper-case suffix"))
    _write(tmp_path, "recs.jsonl.gz", RECORDS_GZ)
    _write(tmp_path, "SHOUT.JSONL.GZ", gzip.compress(_jsonl({"text": "loud"}).encode()))
    reader = DocumentReader([str(tmp_path)])
    docs = {d.where: d.text for d in reader}
    assert docs[f"{tmp_path}/doc.txt.gz"] == text
    assert docs[f"{tmp_path}/UPPER.TXT.GZ"] == "upper-case suffix"
    assert docs[f"{tmp_path}/SHOUT.JSONL.GZ:1"] == "loud"
    assert [docs[f"{tmp_path}/recs.jsonl.gz:{i + 1}"] for i in range(len(RECORDS))] == RECORDS
    assert reader.stats.documents_skipped == {} and reader.stats.reconciles
    assert reader.stats.documents_yielded == len(RECORDS) + 3
    raw_jsonl = gzip.decompress(RECORDS_GZ)
    assert reader.stats.bytes_read == len(text.encode()) + len(b"upper-case suffix") + len(raw_jsonl) + len(
        _jsonl({"text": "loud"}).encode()
    )


def test_jsonl_field(tmp_path):
    _write(tmp_path, "a.jsonl", _jsonl({"content": "wanted", "text": "not this"}, {"text": "no content"}))
    reader = DocumentReader([str(tmp_path / "a.jsonl")], jsonl_field="content")
    assert [(d.text, d.line) for d in reader] == [("wanted", 1)]
    assert reader.stats.documents_skipped == {"missing_field": 1}
    assert reader.stats.skipped_examples == [f"{tmp_path}/a.jsonl:2: missing_field (no 'content')"]


def test_resolution_of_files_dirs_globs(tmp_path):
    for name in ["d/b.txt", "d/a.txt", "d/sub/c.txt", "d/sub/deeper/e.md", "g/x2.md", "g/x1.md", "g/y.txt"]:
        _write(tmp_path, name, name)
    inputs = [
        str(tmp_path / "g" / "*.md"),
        str(tmp_path / "d"),
        str(tmp_path / "g" / "y.txt"),
        f"{tmp_path}/**/e.md",
    ]
    duplicates: list[Path] = []
    files = resolve_inputs(inputs, duplicates)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "g/x1.md",  # glob, sorted
        "g/x2.md",
        "d/a.txt",  # directory: recursive, sorted
        "d/b.txt",
        "d/sub/c.txt",
        "d/sub/deeper/e.md",
        "g/y.txt",  # a file; inputs keep their order
    ]
    assert duplicates == [tmp_path / "d/sub/deeper/e.md"]  # the recursive glob reaches it again
    assert resolve_inputs(inputs) == files  # the duplicates list is optional
    assert [d.text for d in DocumentReader(inputs)] == [p.relative_to(tmp_path).as_posix() for p in files]


@pytest.mark.parametrize("missing", ["no/such/file.txt", "nothing-*.jsonl", "empty_dir"])
def test_input_matching_nothing_is_an_error_naming_it(tmp_path, missing):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "real.txt").write_text("real")
    item = str(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match="matches no file") as err:
        DocumentReader([str(tmp_path / "real.txt"), item])
    assert repr(item) in str(err.value)


def test_embedded_corpora(tmp_path):
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and files == sorted(files)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    assert root / "json" / "__init__.py" in files and root / "textwrap.py" in files
    assert resolve_inputs(["stdlib"]) == files
    for name in ["man1/ls.1.gz", "man1/cat.1.gz", "man8/mount.8.gz", "man9/kernel.9.gz", "man1/notes.txt"]:
        _write(tmp_path, name, gzip.compress(b".TH X 1\n"))
    (tmp_path / "man1" / "dir.1.gz").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in manpage_files(str(tmp_path))] == [
        "man1/cat.1.gz",
        "man1/ls.1.gz",
        "man8/mount.8.gz",
    ]


def test_documents_come_in_a_stable_order(mixed):
    first = [(d.where, d.text) for d in DocumentReader([str(mixed)])]
    second = [(d.where, d.text) for d in DocumentReader([str(mixed)])]
    assert first == second
    paths = [w.split(":")[0] for w, _ in first]
    assert paths == sorted(paths)  # files in path order, each file's lines in order
    reversed_inputs = [
        (d.where, d.text) for d in DocumentReader([str(mixed / "sub"), str(mixed / "a_good.txt")])
    ]
    assert [w for w, _ in reversed_inputs] == [f"{mixed}/sub/m_nested.jsonl.gz:1", f"{mixed}/a_good.txt"]


def test_examples_are_capped_but_counts_are_not(tmp_path):
    _write(tmp_path, "many.jsonl", "{bad\n" * (MAX_EXAMPLES + 25) + '{"text": "fine"}\n')
    reader = DocumentReader([str(tmp_path)])
    assert [d.text for d in reader] == ["fine"]
    assert reader.stats.documents_skipped == {"malformed_json": MAX_EXAMPLES + 25}
    assert len(reader.stats.skipped_examples) == MAX_EXAMPLES
    assert reader.stats.skipped_examples[-1].startswith(
        f"{tmp_path}/many.jsonl:{MAX_EXAMPLES}: malformed_json"
    )
    assert reader.stats.reconciles and reader.stats.documents_read == MAX_EXAMPLES + 26


def test_bad_on_error_value_and_document_place(tmp_path):
    with pytest.raises(ValueError, match="on_error='ignore'"):
        DocumentReader(["stdlib"], on_error="ignore")
    assert Document("t", "f.jsonl", 3).where == "f.jsonl:3"
    assert Document("t", "f.txt").where == "f.txt"


# -- duplicates --------------------------------------------------------------------------------------------
def test_a_file_reached_twice_is_read_once_and_reported(tmp_path):
    for name in ["c/a.txt", "c/b.txt", "c/sub/d.txt"]:
        _write(tmp_path, name, name)
    (tmp_path / "link.txt").symlink_to(tmp_path / "c" / "b.txt")
    inputs = [
        f"{tmp_path}/c/*.txt",  # a.txt, b.txt
        str(tmp_path / "c"),  # a.txt, b.txt again, sub/d.txt
        f"{tmp_path}/c/./sub/d.txt",  # d.txt again, spelled otherwise
        str(tmp_path / "link.txt"),  # b.txt again, through a link
    ]
    reader = DocumentReader(inputs)
    assert [d.text for d in reader] == ["c/a.txt", "c/b.txt", "c/sub/d.txt"]
    assert reader.duplicates == [
        tmp_path / "c/a.txt",
        tmp_path / "c/b.txt",
        tmp_path / "c/sub/d.txt",
        tmp_path / "link.txt",
    ]
    assert reader.stats.files == 3 and reader.stats.documents_read == 3
    assert [(i, p.name) for i, p in resolve_arguments(inputs)] == [(0, "a.txt"), (0, "b.txt"), (1, "d.txt")]


# -- parquet -----------------------------------------------------------------------------------------------
def _parquet(path: Path, columns: dict, **options) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **options)
    return path


PARQUET_TEXTS = [f"parquet row {i} " + "text " * (i % 5) for i in range(3000)]


def _rows_where(path: Path, rows) -> list[str]:
    return [f"{path}:row {r}" for r in rows]


def test_parquet_rows_are_read_and_bad_values_named_by_row(tmp_path):
    texts = ["first", None, "", " \n ", "last ünïcödé"]
    good = _parquet(tmp_path / "a.parquet", {"text": texts, "other": [1, 2, 3, 4, 5]}, row_group_size=2)
    ints = _parquet(tmp_path / "b.parquet", {"text": [7, 8]})
    reader = DocumentReader([str(good), str(ints)], batch_rows=1)
    assert [(d.where, d.text, d.row) for d in reader] == [
        (f"{good}:row 0", "first", 0),
        (f"{good}:row 4", "last ünïcödé", 4),
    ]
    stats = reader.stats
    assert stats.documents_skipped == {"missing_field": 1, "empty_document": 2, "invalid_field_type": 2}
    assert stats.skipped_examples == [
        f"{good}:row 1: missing_field (no 'text')",  # a null
        f"{good}:row 2: empty_document",
        f"{good}:row 3: empty_document",
        f"{ints}:row 0: invalid_field_type ('text' is int)",
        f"{ints}:row 1: invalid_field_type ('text' is int)",
    ]
    assert stats.documents_read == 7 and stats.reconciles and stats.files == 2
    assert stats.bytes_read == len("first") + len(" \n ") + len("last ünïcödé".encode())


def test_parquet_over_row_groups_and_batches(tmp_path):
    path = _parquet(tmp_path / "many.parquet", {"text": PARQUET_TEXTS}, row_group_size=1000)
    reader = DocumentReader([str(path)], batch_rows=300)
    docs = list(reader)
    assert [d.text for d in docs] == PARQUET_TEXTS
    assert [d.row for d in docs] == list(range(3000))
    assert reader.stats.bytes_read == sum(len(t) for t in PARQUET_TEXTS) and reader.stats.reconciles


def _corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite 16 bytes in the middle of row group `group`'s text column chunk."""
    import pyarrow.parquet as pq

    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + chunk.total_compressed_size // 2
    data[middle : middle + 16] = b"\xab" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("checksums", [True, False], ids=["page_checksums", "no_checksums"])
def test_corrupt_parquet_row_group_is_one_unit(tmp_path, checksums):
    path = _parquet(
        tmp_path / "c.parquet", {"text": PARQUET_TEXTS}, row_group_size=1000, write_page_checksum=checksums
    )
    _corrupt_row_group(path, 1)
    reader = DocumentReader([str(path)], batch_rows=256)
    rows = [d.row for d in reader]
    assert rows == [*range(1000), *range(2000, 3000)]  # the groups before and after are read
    assert reader.stats.documents_skipped == {"corrupt_row_group": 1}
    (example,) = reader.stats.skipped_examples
    assert example.startswith(f"{path}:row group 1: corrupt_row_group (rows 1000-1999 unread: ")
    assert reader.stats.documents_read == 2001 and reader.stats.reconciles
    with pytest.raises(InputError, match=r"c\.parquet:row group 1: corrupt_row_group \(rows 1000-1999"):
        list(DocumentReader([str(path)], batch_rows=256, on_error="fail"))


def test_truncated_parquet_is_unreadable(tmp_path):
    path = _parquet(tmp_path / "t.parquet", {"text": PARQUET_TEXTS}, row_group_size=1000)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _write(tmp_path, "u.txt", "after")
    reader = DocumentReader([str(path), str(tmp_path / "u.txt")])
    assert [d.text for d in reader] == ["after"]
    assert reader.stats.documents_skipped == {"unreadable_file": 1}
    assert reader.stats.skipped_examples[0].startswith(f"{path}: unreadable_file (")
    assert reader.stats.reconciles
    with pytest.raises(InputError, match=r"t\.parquet: unreadable_file"):
        list(DocumentReader([str(path)], on_error="fail"))


def test_a_wrong_field_name_is_missing_in_every_record(tmp_path):
    jsonl = _write(tmp_path, "a.jsonl", _jsonl({"text": "x"}, {"text": "y"}))
    parquet = _parquet(tmp_path / "b.parquet", {"text": ["x", "y", "z"]})
    reader = DocumentReader([str(jsonl), str(parquet)], jsonl_field="body")
    assert list(reader) == []
    assert reader.stats.documents_skipped == {"missing_field": 5}
    assert reader.stats.skipped_examples == [
        f"{jsonl}:1: missing_field (no 'body')",
        f"{jsonl}:2: missing_field (no 'body')",
        *(f"{w}: missing_field (no 'body')" for w in _rows_where(parquet, range(3))),
    ]
    with pytest.raises(InputError, match=r"b\.parquet:row 0: missing_field \(no 'body'\)"):
        list(DocumentReader([str(parquet)], jsonl_field="body", on_error="fail"))


# -- the numeric filter ------------------------------------------------------------------------------------
SCORES = [0.9, 0.1, None, 0.5, 2.0, float("nan"), 1]  # kept: 0.9, 0.5, 1 within [0.5, 1]


def test_filter_keeps_records_within_bounds(tmp_path):
    parquet = _parquet(tmp_path / "a.parquet", {"text": [f"p{i}" for i in range(7)], "score": SCORES})
    records = [{"text": f"j{i}", "score": s} for i, s in enumerate(SCORES) if s is not None]
    records.insert(2, {"text": "j2"})  # no score at all
    records += [{"text": "j7", "score": "0.9"}, {"text": "j8", "score": True}, {"text": 5, "score": 0.1}]
    jsonl = _write(tmp_path, "b.jsonl", "".join(json.dumps(r) + "\n" for r in records))  # NaN as NaN
    for on_error in ON_ERROR:  # filtering is not an error: on_error=fail counts it too
        reader = DocumentReader(
            [str(parquet), str(jsonl)], filter_field="score", filter_min=0.5, filter_max=1, on_error=on_error
        )
        assert [d.text for d in reader] == ["p0", "p3", "p6", "j0", "j3", "j6"]
        assert reader.stats.documents_skipped == {"filtered": 4 + 7} and reader.stats.reconciles
    examples = {}
    for path in (parquet, jsonl):
        reader = DocumentReader([str(path)], filter_field="score", filter_min=0.5, filter_max=1)
        assert len(list(reader)) == 3
        examples[path] = reader.stats.skipped_examples
    assert examples[parquet] == [
        f"{parquet}:row 1: filtered (score=0.1 < filter_min=0.5)",
        f"{parquet}:row 2: filtered (no 'score')",
        f"{parquet}:row 4: filtered (score=2.0 > filter_max=1)",
        f"{parquet}:row 5: filtered ('score' is nan)",
    ]
    assert examples[jsonl] == [
        f"{jsonl}:2: filtered (score=0.1 < filter_min=0.5)",
        f"{jsonl}:3: filtered (no 'score')",
        f"{jsonl}:5: filtered (score=2.0 > filter_max=1)",
        f"{jsonl}:6: filtered ('score' is nan)",
        f"{jsonl}:8: filtered ('score' is '0.9')",
        f"{jsonl}:9: filtered ('score' is True)",
        f"{jsonl}:10: filtered (score=0.1 < filter_min=0.5)",  # filtered before its bad text
    ]


def test_filtered_examples_leave_room_for_bad_input(tmp_path):
    records = [{"text": f"r{i}", "score": 0} for i in range(MAX_EXAMPLES + 5)] + [{"score": 1}]
    path = _write(tmp_path, "a.jsonl", _jsonl(*records))
    reader = DocumentReader([str(path)], filter_field="score", filter_min=1)
    assert list(reader) == []
    assert reader.stats.documents_skipped == {"filtered": MAX_EXAMPLES + 5, "missing_field": 1}
    assert len(reader.stats.skipped_examples) == FILTERED_EXAMPLES + 1
    assert reader.stats.skipped_examples[-1] == f"{path}:{MAX_EXAMPLES + 6}: missing_field (no 'text')"


def test_filter_with_one_bound_or_none_and_bad_options(tmp_path):
    parquet = _parquet(tmp_path / "a.parquet", {"text": [f"p{i}" for i in range(7)], "score": SCORES})
    only_min = DocumentReader([str(parquet)], filter_field="score", filter_min=0.9)
    assert [d.text for d in only_min] == ["p0", "p4", "p6"]
    present = DocumentReader([str(parquet)], filter_field="score")  # any number
    assert [d.text for d in present] == ["p0", "p1", "p3", "p4", "p6"]
    absent = DocumentReader([str(parquet)], filter_field="quality", filter_max=1.0)
    assert list(absent) == [] and absent.stats.documents_skipped == {"filtered": 7}
    with pytest.raises(ValueError, match="need a filter_field"):
        DocumentReader([str(parquet)], filter_min=0.5)
    with pytest.raises(ValueError, match="filter_min=2 > filter_max=1"):
        DocumentReader([str(parquet)], filter_field="score", filter_min=2, filter_max=1)


# -- zstd and xz -------------------------------------------------------------------------------------------
JSONL_RECORDS = _jsonl(*({"text": t} for t in RECORDS)).encode()


def _zstd(data: bytes, **options) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(**options).compress(data)


def test_zstd_and_xz_inputs_are_read(tmp_path):
    import lzma

    half = len(JSONL_RECORDS) // 2
    cut = JSONL_RECORDS.index(b"\n", half) + 1
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    frames = _zstd(JSONL_RECORDS[:cut]) + skippable + _zstd(JSONL_RECORDS[cut:], write_checksum=True)
    text = "zstd'd text ünïcödé\n" * 40
    _write(tmp_path, "a.jsonl.zst", frames)
    _write(tmp_path, "b.txt.zst", _zstd(text.encode(), write_content_size=False))
    _write(tmp_path, "c.jsonl.xz", lzma.compress(JSONL_RECORDS))
    _write(tmp_path, "d.TXT.XZ", lzma.compress(b"xz text") + lzma.compress(b", two streams"))
    _write(tmp_path, "e.log.zst", _zstd(b"any other name is text"))
    reader = DocumentReader([str(tmp_path)])
    docs = {d.where: d.text for d in reader}
    assert [docs[f"{tmp_path}/a.jsonl.zst:{i + 1}"] for i in range(len(RECORDS))] == RECORDS
    assert [docs[f"{tmp_path}/c.jsonl.xz:{i + 1}"] for i in range(len(RECORDS))] == RECORDS
    assert docs[f"{tmp_path}/b.txt.zst"] == text
    assert docs[f"{tmp_path}/d.TXT.XZ"] == "xz text, two streams"
    assert docs[f"{tmp_path}/e.log.zst"] == "any other name is text"
    assert reader.stats.documents_skipped == {} and reader.stats.documents_yielded == 2 * len(RECORDS) + 3
    decompressed = 2 * len(JSONL_RECORDS) + len(text.encode()) + len("xz text, two streams") + 22
    assert reader.stats.bytes_read == decompressed


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.xz"])
def test_truncated_jsonl_stream_keeps_what_was_decoded(tmp_path, suffix):
    import lzma

    compress = _zstd if suffix.endswith("zst") else lzma.compress
    noise = random.Random(0)
    lines = _jsonl(*({"text": f"record {i}: {noise.randbytes(32).hex()}"} for i in range(8000)))
    whole = compress(lines.encode())  # many blocks
    path = _write(tmp_path, "r" + suffix, whole[: len(whole) // 2])
    reader = DocumentReader([str(path)])
    docs = [d.line for d in reader]
    held = len(docs)
    assert 0 < held < 8000 and docs == list(range(1, held + 1))
    assert reader.stats.documents_skipped == {"truncated_stream": 1}
    (example,) = reader.stats.skipped_examples
    assert example.startswith(f"{path}:{held + 1}: truncated_stream (EOFError: ")
    assert reader.stats.documents_read == held + 1 and reader.stats.reconciles
    with pytest.raises(InputError, match=rf"r\{suffix}:{held + 1}: truncated_stream"):
        list(DocumentReader([str(path)], on_error="fail"))


@pytest.mark.parametrize("suffix", [".txt.xz", ".txt.zst"])
def test_truncated_text_stream_is_one_unit(tmp_path, suffix):
    import lzma

    compress = _zstd if suffix.endswith("zst") else lzma.compress
    text = "".join(f"line {i} of a long text document\n" for i in range(50_000)).encode()
    whole = compress(text)
    path = _write(tmp_path, "t" + suffix, whole[: len(whole) // 2])
    reader = DocumentReader([str(path)])
    assert list(reader) == []
    assert reader.stats.documents_skipped == {"truncated_stream": 1} and reader.stats.reconciles
    (example,) = reader.stats.skipped_examples
    line = int(example.split("at line ")[1].split(":")[0])
    assert example.startswith(f"{path}: truncated_stream (at line ") and 0 < line < 50_000
    with pytest.raises(InputError, match=rf"t\{suffix}: truncated_stream \(at line {line}: EOFError"):
        list(DocumentReader([str(path)], on_error="fail"))


@pytest.mark.parametrize("name", ["g.jsonl.zst", "g.jsonl.xz", "g.txt.zst", "g.txt.xz"])
def test_not_compressed_after_all_is_unreadable(tmp_path, name):
    path = _write(tmp_path, name, b"plain text, not compressed\n")
    reader = DocumentReader([str(path)])
    assert list(reader) == []
    assert reader.stats.documents_skipped == {"unreadable_file": 1} and reader.stats.reconciles
    where = f"{path}:1" if ".jsonl" in name else str(path)
    assert reader.stats.skipped_examples[0].startswith(f"{where}: unreadable_file")


def test_zstd_truncation_is_detected_at_every_cut(tmp_path):
    """zstandard's stream_reader ends quietly on a truncated file: the frame walk must see
    every cut (every 7th byte, and all around the frame boundaries) but those between
    frames, which leave valid zstd data."""
    import zstandard

    from data.sources import zstd_frames_complete

    raw = (
        random.Random(0).randbytes(140_000) + b"x" * 300_000 + bytes(range(256)) * 64
    )  # raw, RLE, compressed
    written = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=True).stream_writer(written, closefd=False) as w:
        w.write(b"no content size, a checksum" * 100)
    skippable = (0x184D2A5F).to_bytes(4, "little") + (2).to_bytes(4, "little") + b"zz"
    frames = [_zstd(raw), skippable, written.getvalue(), _zstd(b"", write_dict_id=False)]
    data = b"".join(frames)
    boundaries = {sum(len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    around = {b + offset for b in boundaries for offset in range(-20, 21)}
    cuts = sorted({c for c in around if 0 <= c <= len(data)} | set(range(0, len(data), 7)), reverse=True)
    path = _write(tmp_path, "f.zst", data)
    with open(path, "r+b") as f:
        for cut in cuts:
            os.ftruncate(f.fileno(), cut)
            assert zstd_frames_complete(f.fileno()) == (cut in boundaries), cut


# -- Arrow and Hugging Face datasets directories -----------------------------------------------------------
@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory) -> Path:
    """save_to_disk of a Dataset in 3 shards and of a DatasetDict (train, then test)."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hf")
    texts = [f"dataset row {i}" for i in range(9)]
    texts[4] = None
    one = datasets.Dataset.from_dict({"text": texts, "score": [float(i) for i in range(9)]})
    one.save_to_disk(str(root / "one"), num_shards=3)
    split = {
        "train": datasets.Dataset.from_dict({"text": ["train 0", "train 1"]}),
        "test": datasets.Dataset.from_dict({"text": ["test 0", ""]}),
    }
    datasets.DatasetDict(split).save_to_disk(str(root / "dict"))
    return root


def test_datasets_directory_is_read_in_state_order(hf_datasets):
    one = hf_datasets / "one"
    assert sorted(p.name for p in one.iterdir()) == [
        "data-00000-of-00003.arrow",
        "data-00001-of-00003.arrow",
        "data-00002-of-00003.arrow",
        "dataset_info.json",
        "state.json",
    ]
    reader = DocumentReader([str(one)], filter_field="score", filter_max=7)
    docs = [(d.where, d.text) for d in reader]
    shard = [f"{one}/data-0000{i}-of-00003.arrow" for i in range(3)]
    assert docs == [
        *((f"{shard[0]}:row {i}", f"dataset row {i}") for i in range(3)),
        (f"{shard[1]}:row 0", "dataset row 3"),
        (f"{shard[1]}:row 2", "dataset row 5"),
        *((f"{shard[2]}:row {i}", f"dataset row {6 + i}") for i in range(2)),
    ]
    assert reader.stats.skipped_examples == [
        f"{shard[1]}:row 1: missing_field (no 'text')",
        f"{shard[2]}:row 2: filtered (score=8.0 > filter_max=7)",
    ]
    assert reader.files == [Path(s) for s in shard] and reader.stats.reconciles


def test_state_json_order_and_datasets_dict_splits(hf_datasets, tmp_path):
    import shutil

    one = Path(shutil.copytree(hf_datasets / "one", tmp_path / "one"))
    state = json.loads((one / "state.json").read_text())
    state["_data_files"].reverse()
    (one / "state.json").write_text(json.dumps(state))
    assert [p.name[:10] for p in resolve_inputs([str(one)])] == ["data-00002", "data-00001", "data-00000"]
    dd = hf_datasets / "dict"
    assert json.loads((dd / "dataset_dict.json").read_text()) == {"splits": ["train", "test"]}
    reader = DocumentReader([str(dd)])
    assert [(d.where.removeprefix(f"{dd}/"), d.text) for d in reader] == [
        ("train/data-00000-of-00001.arrow:row 0", "train 0"),
        ("train/data-00000-of-00001.arrow:row 1", "train 1"),
        ("test/data-00000-of-00001.arrow:row 0", "test 0"),
    ]
    assert reader.stats.skipped_examples == [f"{dd}/test/data-00000-of-00001.arrow:row 1: empty_document"]


def test_datasets_directories_inside_a_directory_or_a_glob(hf_datasets):
    with_file = hf_datasets / "zz_notes.txt"
    _write(hf_datasets, "zz_notes.txt", "a plain file beside the datasets")
    try:
        files = [p.relative_to(hf_datasets).as_posix() for p in resolve_inputs([str(hf_datasets)])]
        assert files == [
            "dict/train/data-00000-of-00001.arrow",
            "dict/test/data-00000-of-00001.arrow",
            *(f"one/data-0000{i}-of-00003.arrow" for i in range(3)),
            "zz_notes.txt",
        ]  # no metadata .json read as a document
        globbed = resolve_inputs([f"{hf_datasets}/*"])
        assert [p.relative_to(hf_datasets).as_posix() for p in globbed] == files
    finally:
        with_file.unlink()


def test_broken_datasets_metadata_is_an_error_naming_it(tmp_path):
    _write(tmp_path, "dd/dataset_dict.json", json.dumps({"splits": ["train"]}))
    with pytest.raises(ValueError, match=r"dd/train: a split of .*dd/dataset_dict\.json is not a datasets"):
        resolve_inputs([str(tmp_path / "dd")])
    _write(tmp_path, "ds/state.json", "{not json")
    _write(tmp_path, "ds/dataset_info.json", "{}")
    with pytest.raises(ValueError, match=r"ds/state\.json: not a datasets metadata file \(JSONDecodeError"):
        resolve_inputs([f"{tmp_path}/ds*"])  # a glob reaching it
    _write(tmp_path, "ds/state.json", json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    reader = DocumentReader([str(tmp_path / "ds")])  # a listed file that is missing: reported, not ignored
    assert list(reader) == [] and reader.stats.documents_skipped == {"unreadable_file": 1}


def test_broken_arrow_streams(hf_datasets, tmp_path):
    import pyarrow as pa

    table = pa.table({"text": [f"ipc row {i}" for i in range(1000)]})
    stream = tmp_path / "s.arrow"
    with pa.ipc.new_stream(stream, table.schema) as w:
        for batch in table.to_batches(max_chunksize=100):
            w.write_batch(batch)
    whole = stream.read_bytes()
    stream.write_bytes(whole[: len(whole) // 2])
    file_format = tmp_path / "f.arrow"
    with pa.ipc.new_file(file_format, table.schema) as w:
        w.write_table(table)
    garbage = _write(tmp_path, "g.arrow", b"not arrow at all")
    reader = DocumentReader([str(stream), str(file_format), str(garbage)])
    docs = [d.where for d in reader]
    held = sum(1 for w in docs if w.startswith(str(stream)))
    assert 0 < held < 1000 and held % 100 == 0  # whole batches before the cut
    assert len(docs) == held + 1000  # the IPC file format, whole
    assert reader.stats.documents_skipped == {"truncated_stream": 1, "unreadable_file": 1}
    assert [e.split(" (")[0] for e in reader.stats.skipped_examples] == [
        f"{stream}:row {held}: truncated_stream",
        f"{garbage}: unreadable_file",
    ]
    with pytest.raises(InputError, match=rf"s\.arrow:row {held}: truncated_stream"):
        list(DocumentReader([str(stream)], on_error="fail"))


# -- bounded memory ----------------------------------------------------------------------------------------
PEAK_SCRIPT = """
import sys
from data.sources import DocumentReader, TextPieces
import pyarrow, pyarrow.parquet, pyarrow.compute, zstandard

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

pieces = TextPieces(int(sys.argv[2]), lambda a, b: True, 1 << 62) if len(sys.argv) > 2 else None
start = status("VmRSS:")
next(iter(DocumentReader([sys.argv[1]], pieces=pieces)))  # one-time setup (pyarrow thread pools, allocator)
before = status("VmRSS:")
reader = DocumentReader([sys.argv[1]], pieces=pieces)
documents = sum(1 for _ in reader)
print(documents, reader.stats.bytes_read, status("VmHWM:") - before, status("VmHWM:") - start)
"""


def _big_inputs(root: Path, total: int) -> tuple[int, Path, Path]:
    """~`total` bytes of distinct documents of ~4 kB as .parquet and .jsonl.zst, made quickly
    (each line's JSON from the escaped text of one of 4000 windows); and their number."""
    import zstandard

    base = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:8000]
    windows = [base[i : i + 4000] for i in range(4000)]
    count = total // 4000
    texts = [f"document {i}: {windows[i % 4000]}" for i in range(count)]
    parquet = _parquet(root / "big.parquet", {"text": texts}, compression="zstd", use_dictionary=False)
    escaped = [json.dumps(w)[1:-1] for w in windows]
    zst = root / "big.jsonl.zst"
    with open(zst, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as w:
        for start in range(0, count, 1000):
            lines = (f'{{"text": "document {i}: {escaped[i % 4000]}"}}\n' for i in range(start, start + 1000))
            w.write("".join(lines).encode())
    return count, parquet, zst


def test_big_inputs_are_streamed_in_bounded_memory(tmp_path):
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    count, parquet, zst = _big_inputs(tmp_path, 200_000_000)
    made = time.perf_counter() - start
    repo = Path(__file__).resolve().parents[2]
    for path in (parquet, zst):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(path)],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
        documents, size, growth, total = (int(x) for x in out.stdout.split())
        print(
            f"{path.name}: {path.stat().st_size / 1e6:.0f} MB on disk, {size / 1e6:.0f} MB of text, "
            f"{documents:,} documents; peak RSS growth while reading {growth / 1e6:.1f} MB "
            f"({total / 1e6:.1f} MB with the first batch's one-time setup)"
        )
        assert documents == count and size > 190_000_000
        assert growth < size / 4 and total < size / 3
    print(f"inputs made in {made:.1f} s")


# -- long whole-file documents read in pieces ------------------------------------------------------------
def _every_cut(left: str, right: str) -> bool:
    return True


def _no_space_after(left: str, right: str) -> bool:
    return right != " "  # e.g. a tokenizer that attaches a space to the next word


@pytest.mark.parametrize("suffix", [".txt", ".txt.zst", ".txt.gz"])
def test_a_long_document_is_read_in_pieces_cut_after_newlines_the_cut_allows(tmp_path, suffix):
    rng = random.Random(3)
    lines = [
        " " * rng.randint(0, 2) + "x" * rng.randint(0, 120) + "é" * rng.randint(0, 3) for _ in range(20_000)
    ]
    text = "\n".join(lines) + "\n"
    raw = text.encode()
    compress = {".txt": bytes, ".txt.zst": _zstd, ".txt.gz": gzip.compress}[suffix]
    path = _write(tmp_path, "long" + suffix, compress(raw))
    pieces = TextPieces(50_000, _no_space_after, max_chars=1 << 62)
    reader = DocumentReader([str(path)], pieces=pieces)
    docs = list(reader)
    assert len(docs) > len(raw) // 100_000 and [d.final for d in docs] == [False] * (len(docs) - 1) + [True]
    assert "".join(d.text for d in docs) == text
    for previous, doc in zip(docs, docs[1:], strict=False):
        assert previous.text.endswith("\n") and doc.text[0] != " " and doc.before == previous.text[-1]
        assert len(previous.text) >= 25_000
    assert docs[0].before == "" and all(d.where == str(path) for d in docs)
    stats = reader.stats
    assert (stats.documents_read, stats.documents_yielded, stats.bytes_read) == (1, 1, len(raw))
    small = DocumentReader([str(path)], pieces=TextPieces(len(raw), _every_cut, max_chars=1 << 62))
    assert [(d.text, d.final) for d in small] == [(text, True)]  # within one piece: whole
    whole = DocumentReader([str(path)], pieces=TextPieces(50_000, _every_cut, max_chars=len(text) - 1))
    assert [d.text for d in whole] == [text]  # longer than the tokenizer can cut: whole


@pytest.mark.parametrize(
    "content",
    [
        b"a\x00b" + b"text\n" * 30_000,
        b"ok\n" * 30_000 + b"\xff\xfe",
        "é".encode() * 40_000 + b"\xc3",
        b" \n" * 60_000,
    ],
    ids=["binary", "invalid-utf8", "cut-utf8", "blank"],
)
def test_bad_long_documents_are_accounted_as_when_read_whole(tmp_path, content):
    path = _write(tmp_path, "bad.txt", content)
    readers = [
        DocumentReader([str(path)], pieces=TextPieces(1000, _every_cut, 1 << 62)),
        DocumentReader([str(path)]),
    ]
    assert [list(r) for r in readers] == [[], []]
    assert readers[0].stats == readers[1].stats and readers[0].stats.reconciles


def test_a_document_much_larger_than_a_piece_is_read_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    line = ("".join(random.Random(5).choice("abcdefgh ") for _ in range(200)) + "\n").encode()
    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        for _ in range(150_000_000 // (len(line) * 1000)):
            f.write(line * 1000)
    size = path.stat().st_size
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path), str(4 << 20)],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    pieces, read, growth, _ = (int(x) for x in out.stdout.split())
    print(f"{size / 1e6:.0f} MB document in {pieces} pieces: peak RSS growth {growth / 1e6:.1f} MB")
    # memory of a few pieces (the decoded buffer, a piece, a slice), not of the document
    assert read == size and pieces >= size // (4 << 20) and growth < 8 * (4 << 20) < size / 4
