"""DocumentReader: every kind of bad input is counted under its reason and named by
file[:line] (or, with on_error=fail, stops reading with InputError naming it), gzip'd
inputs are read, inputs resolve from files, directories, globs and embedded corpora,
and documents come in a stable order."""

from __future__ import annotations

import gzip
import json
import sysconfig
import zlib
from pathlib import Path

import pytest

from data.sources import (
    MAX_EXAMPLES,
    Document,
    DocumentReader,
    InputError,
    manpage_files,
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
    files = resolve_inputs(inputs)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "g/x1.md",  # glob, sorted
        "g/x2.md",
        "d/a.txt",  # directory: recursive, sorted
        "d/b.txt",
        "d/sub/c.txt",
        "d/sub/deeper/e.md",
        "g/y.txt",  # a file; inputs keep their order
        "d/sub/deeper/e.md",  # recursive glob
    ]
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
