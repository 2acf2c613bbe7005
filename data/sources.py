"""Documents from raw inputs, with an account of everything read and skipped.

Inputs are files, directories (recursively, sorted), globs, or the names of the
embedded corpora: `stdlib` (the running Python's standard library sources) and
`manpages` (the gzip'd man pages under /usr/share/man). By suffix:

- `.jsonl`, `.jsonl.gz`: one document per line, text in the field `jsonl_field`;
- anything else (`.txt`, `.txt.gz`, `.py`, man pages, ...): one document per file.

Bad input never crashes silently and is never lost unaccounted. Each problem has a
reason (`invalid_utf8`, `malformed_json`, `missing_field`, `invalid_field_type`,
`empty_document`, `binary_file`, `unreadable_file`) and a place (`file:line` for
JSONL, `file` otherwise). With `on_error="skip"` the document is counted under its
reason and skipped; with `on_error="fail"` reading stops with `InputError` naming the
place. `documents_read == documents_yielded + sum(documents_skipped.values())`.
"""

from __future__ import annotations

import glob
import gzip
import json
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED = ("stdlib", "manpages")
ON_ERROR = ("skip", "fail")
MAX_EXAMPLES = 50


class InputError(ValueError):
    """Bad input under on_error=fail; the message starts with `file[:line]`."""


@dataclass(frozen=True)
class Document:
    text: str
    path: str
    line: int | None = None  # 1-based line number for JSONL

    @property
    def where(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"


@dataclass
class InputStats:
    documents_read: int = 0
    documents_yielded: int = 0
    documents_skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)  # "file[:line]: reason (detail)"
    bytes_read: int = 0
    files: int = 0

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.documents_skipped[reason] = self.documents_skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def reconciles(self) -> bool:
        return self.documents_read == self.documents_yielded + sum(self.documents_skipped.values())


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]


def manpage_files(root: str = "/usr/share/man") -> list[Path]:
    return sorted(p for p in Path(root).glob("man[1-8]/*.gz") if p.is_file())


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand embedded corpus names, directories and globs into a sorted file list.
    An input that matches nothing is an error naming it."""
    files: list[Path] = []
    for item in inputs:
        if item == "stdlib":
            found = stdlib_files()
        elif item == "manpages":
            found = manpage_files()
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if _is_file_or_link(p))
        elif _is_file_or_link(Path(item)):
            found = [Path(item)]
        else:
            found = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if _is_file_or_link(Path(m))]
        if not found:
            raise FileNotFoundError(f"input {item!r} matches no file")
        files.extend(found)
    return files


def _is_file_or_link(path: Path) -> bool:
    """Files, and links to anything but directories: a dangling link is listed so that it
    is reported as unreadable rather than silently ignored."""
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def _is_gzip(path: Path) -> bool:
    return path.suffix.lower() == ".gz"  # as case-insensitive as _is_jsonl: DATA.JSONL.GZ


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


class DocumentReader:
    """Iterate the documents of `inputs` in a stable order, filling `self.stats`."""

    def __init__(self, inputs: list[str], *, jsonl_field: str = "text", on_error: str = "skip"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}")
        self.files = resolve_inputs(inputs)
        self.jsonl_field = jsonl_field
        self.on_error = on_error
        self.stats = InputStats()

    def _bad(self, reason: str, where: str, detail: str = "") -> None:
        if self.on_error == "fail":
            raise InputError(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.stats.skip(reason, where, detail)

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            self.stats.files += 1
            if _is_jsonl(path):
                yield from self._jsonl(path)
                continue
            try:
                raw = path.read_bytes()
                if _is_gzip(path):
                    raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as e:
                self.stats.documents_read += 1
                self._bad("unreadable_file", str(path), f"{type(e).__name__}: {e}")
                continue
            self.stats.bytes_read += len(raw)
            yield from self._whole_file(path, raw)

    def _whole_file(self, path: Path, raw: bytes) -> Iterator[Document]:
        self.stats.documents_read += 1
        where = str(path)
        if b"\x00" in raw[:8192]:
            return self._bad("binary_file", where, "NUL bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad("invalid_utf8", where, f"byte {e.start}")
        if not text.strip():
            return self._bad("empty_document", where)
        self.stats.documents_yielded += 1
        yield Document(text, where)

    def _jsonl(self, path: Path) -> Iterator[Document]:
        """Streams the file (a large .jsonl.gz is never held in memory)."""
        number = 0
        try:
            with gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb") as f:
                for number, line in enumerate(f, 1):  # noqa: B007 - used after the loop
                    self.stats.bytes_read += len(line)
                    document = self._jsonl_line(path, number, line.rstrip(b"\r\n"))
                    if document is not None:
                        yield document
        except (OSError, EOFError, zlib.error) as e:
            self.stats.documents_read += 1
            self._bad("unreadable_file", f"{path}:{number + 1}", f"{type(e).__name__}: {e}")

    def _jsonl_line(self, path: Path, number: int, line: bytes) -> Document | None:
        self.stats.documents_read += 1
        where = f"{path}:{number}"
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad("invalid_utf8", where, f"byte {e.start}")
        if not decoded.strip():
            return self._bad("empty_document", where, "blank line")
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as e:
            return self._bad("malformed_json", where, e.msg)
        if not isinstance(record, dict) or self.jsonl_field not in record:
            return self._bad("missing_field", where, f"no {self.jsonl_field!r}")
        text = record[self.jsonl_field]
        if not isinstance(text, str):
            return self._bad("invalid_field_type", where, f"{self.jsonl_field!r} is {type(text).__name__}")
        if not text.strip():
            return self._bad("empty_document", where)
        self.stats.documents_yielded += 1
        return Document(text, str(path), number)
