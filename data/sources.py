"""Documents from raw inputs, with an account of everything read and skipped.

Inputs are files, directories (recursively, sorted), globs, or the names of the
embedded corpora: `stdlib` (the running Python's standard library sources) and
`manpages` (the gzip'd man pages under /usr/share/man).

A directory written by Hugging Face `datasets`' `save_to_disk` is one input wherever it
is met (given, inside a given directory, or matched by a glob): a Dataset directory
(`state.json` + `dataset_info.json`) stands for its `.arrow` files in the order
`state.json` lists them, a DatasetDict directory (`dataset_dict.json`) for the files of
every split in the order `dataset_dict.json` lists the splits (all splits: to read one,
give its subdirectory). Its metadata files are not read as documents.

A file reached more than once (overlapping globs, directories and arguments; the same
real path, symlinks resolved) is read once, at its first place; the later places are
`DocumentReader.duplicates` (`resolve_inputs(inputs, duplicates)` appends them to the
list `duplicates`; `resolve_arguments` also says which input first reached each file).

Formats, by suffix (case-insensitive). Record formats hold one document per record, its
text in the field `jsonl_field` (the name is historical: it is the text field of every
record format):

- `.jsonl`, and compressed `.jsonl.gz`, `.jsonl.zst`, `.jsonl.xz`: one record per line,
  streamed line by line, named `file:line` (1-based);
- `.parquet`: one record per row, read one row group at a time in batches of
  `batch_rows` rows of the text (and filter) column only, named `file:row N` (0-based
  over the whole file);
- `.arrow`: Arrow IPC, the stream format `datasets` writes (or the file format), record
  batch by record batch, named `file:row N`;
- anything else (`.txt`, `.txt.gz`, `.txt.zst`, `.txt.xz`, `.py`, man pages, a `.zst` or
  `.xz` of any other name, ...): one document per file, named `file`. With `pieces`
  (TextPieces; `dlm prepare` gives its tokenizer's safe cuts), a file longer than
  `piece_bytes` is checked in one streamed pass (same reasons and details as when read
  whole), then yielded in pieces cut after newlines (`Document.final` on the last one):
  memory holds about a piece.

Compressed files are decompressed as they are read (zstd frames are read across), and
no record format is ever held whole: memory is about a line, or a batch of rows (a
whole-file document is held, being one document, unless it is read in pieces).
`bytes_read` counts decompressed bytes (for parquet and arrow: the UTF-8 bytes of the text
column's string values).

Filter (record formats only): with `filter_field`, a record is kept only when that field
holds a number (int or float, not NaN, not bool) within [filter_min, filter_max] (a bound
left None is open). Any other record (value outside, missing, null or not a number) is
skipped under the reason `filtered`, checked before its text field (a filtered record with
a bad text is counted as `filtered`). Filtering is a choice, not bad input: `filtered` is
counted under on_error=fail too, and never raises; only the first FILTERED_EXAMPLES of
them are examples.

Bad input never crashes silently and is never lost unaccounted. Each problem has a reason
and a place; with `on_error="skip"` it is counted under its reason (the first MAX_EXAMPLES
are kept as examples "place: reason (detail)") and reading goes on; with
`on_error="fail"` reading stops with `InputError` naming the place. Reasons:

- per record or document: `invalid_utf8`, `malformed_json`, `missing_field` (no such
  field, or, in parquet and arrow, a null: columns make no difference between the two),
  `invalid_field_type` (not a string), `empty_document` (blank), `binary_file` (NUL bytes
  in a whole-file document);
- per broken unit, whose number of records is unknown, each counted as ONE document read
  and ONE skipped:
  - `unreadable_file`: a file that cannot be opened or whose start cannot be decoded (not
    gzip/zstd/xz/parquet/arrow after all, a missing link target, a parquet file without
    its footer, e.g. truncated), and a gzip stream that breaks (as before zstd and xz were
    read); named `file`, or for JSONL `file:line` of the first line not read;
  - `truncated_stream`: a .zst or .xz stream that ends early, an .arrow stream that
    breaks after its schema; the records decoded before the damage are kept, the rest is
    the unit, named `file:line` / `file:row N` of the first record not read, or `file`
    for a whole-file document (the detail says the line reached);
  - `corrupt_row_group`: a parquet row group whose data fail to decode or to match their
    page checksums; its rows not yet read are the unit, named `file:row group I` (the
    rows are in the detail), and the next row groups are read.

Accounting: `documents_read` counts every record or whole-file document looked at plus
one per broken unit, so that always
`documents_read == documents_yielded + sum(documents_skipped.values())`.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

EMBEDDED = ("stdlib", "manpages")
ON_ERROR = ("skip", "fail")
MAX_EXAMPLES = 50
FILTERED_EXAMPLES = 10  # of those, at most this many `filtered` ones: they must not crowd out bad input
BATCH_ROWS = 1024  # parquet rows per batch
CHUNK = 1 << 20  # bytes per read of a compressed stream or a parquet column chunk
COMPRESSIONS = (".gz", ".zst", ".xz")
# What reading a (compressed) byte stream may raise; anything else is a bug, not bad input.
STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


@dataclass(frozen=True)
class TextPieces:
    """How a whole-file document longer than `piece_bytes` is read: in pieces of about that
    many bytes, each cut after a newline where `allows("\\n", next character)` (the tokenizer's
    safe cuts: the ids of the pieces are those of the whole document), so that memory holds
    about one piece. Documents of more than `max_chars` characters are read whole."""

    piece_bytes: int
    allows: Callable[[str, str], bool]
    max_chars: int


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # a record field that is absent (or null, in a column)


class InputError(ValueError):
    """Bad input under on_error=fail; the message starts with `file[:line | :row N]`."""


@dataclass(frozen=True)
class Document:
    """A document, or one piece of a long whole-file document read in pieces (TextPieces):
    its pieces come one after another, the last one `final`; `before` is the character
    before a continuation piece ("" for a document's first piece)."""

    text: str
    path: str
    line: int | None = None  # 1-based line number for JSONL
    row: int | None = None  # 0-based row number for parquet and arrow
    before: str = ""
    final: bool = True

    @property
    def where(self) -> str:
        if self.row is not None:
            return f"{self.path}:row {self.row}"
        return self.path if self.line is None else f"{self.path}:{self.line}"


@dataclass
class InputStats:
    documents_read: int = 0
    documents_yielded: int = 0
    documents_skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)  # "place: reason (detail)"
    bytes_read: int = 0
    files: int = 0

    def skip(self, reason: str, where: str, detail: str = "", example: bool = True) -> None:
        self.documents_skipped[reason] = self.documents_skipped.get(reason, 0) + 1
        if example and len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def reconciles(self) -> bool:
        return self.documents_read == self.documents_yielded + sum(self.documents_skipped.values())


# -- inputs ------------------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]


def manpage_files(root: str = "/usr/share/man") -> list[Path]:
    return sorted(p for p in Path(root).glob("man[1-8]/*.gz") if p.is_file())


def resolve_inputs(inputs: list[str], duplicates: list[Path] | None = None) -> list[Path]:
    """Expand embedded corpus names, directories, `datasets` directories and globs into a
    file list: the inputs in their order, each directory's files and each glob's matches
    sorted. A file reached again (the same real path, however spelled) is listed once, at
    its first place; its later places are appended to `duplicates` when a list is given.
    An input that matches nothing is an error naming it."""
    return [path for _, path in resolve_arguments(inputs, duplicates)]


def resolve_arguments(inputs: list[str], duplicates: list[Path] | None = None) -> list[tuple[int, Path]]:
    """resolve_inputs, each file with the index of the input that first reaches it."""
    files: list[tuple[int, Path]] = []
    seen: set[str] = set()
    for index, item in enumerate(inputs):
        found = _expand(item)
        if not found:
            raise FileNotFoundError(f"input {item!r} matches no file")
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append((index, path))
            elif duplicates is not None:
                duplicates.append(path)
    return files


def _expand(item: str) -> list[Path]:
    if item == "stdlib":
        return stdlib_files()
    if item == "manpages":
        return manpage_files()
    path = Path(item)
    if path.is_dir():
        return directory_files(path)
    if _is_file_or_link(path):
        return [path]
    return [f for match in sorted(glob.glob(item, recursive=True)) for f in _glob_match(Path(match))]


def _glob_match(path: Path) -> list[Path]:
    """A file a glob matched; a `datasets` directory stands for its .arrow files; any
    other directory a glob matches is ignored (its files are matched one by one)."""
    if _is_file_or_link(path):
        return [path]
    return (dataset_files(path) or []) if path.is_dir() else []


def directory_files(root: Path) -> list[Path]:
    """The files under `root`, recursively, sorted by path (as sorted(root.rglob("*")):
    symlinked directories are not followed); a `datasets` directory, `root` or met on the
    way, stands for its .arrow files (dataset_files)."""
    with os.scandir(root) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    arrow = dataset_files(root, {e.name for e in entries})
    if arrow is not None:
        return arrow
    files: list[Path] = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            files += directory_files(Path(entry.path))
        elif entry.is_file() or (entry.is_symlink() and not entry.is_dir()):
            files.append(Path(entry.path))
    return files


def dataset_files(directory: Path, names: set[str] | None = None) -> list[Path] | None:
    """The .arrow files of a `datasets` save_to_disk directory in reading order, or None if
    `directory` (whose entries are `names`) is not one: a DatasetDict (dataset_dict.json)
    is every split's files, in the order of its "splits"; a Dataset (state.json and
    dataset_info.json) its files in the order of state.json's "_data_files". A listed file
    that does not exist is listed all the same (and reported unreadable when read)."""
    names = set(os.listdir(directory)) if names is None else names
    if "dataset_dict.json" in names:
        splits = _json_list(directory / "dataset_dict.json", "splits")
        return [path for split in splits for path in _split_files(directory / str(split))]
    if "state.json" in names and "dataset_info.json" in names:
        return [
            directory / str(entry["filename"])
            for entry in _json_list(directory / "state.json", "_data_files")
        ]
    return None


def _split_files(directory: Path) -> list[Path]:
    files = dataset_files(directory) if directory.is_dir() else None
    if files is None:
        raise ValueError(
            f"{directory}: a split of {directory.parent}/dataset_dict.json is not a datasets directory"
        )
    return files


def _json_list(path: Path, key: str) -> list:
    """`key` of the JSON object in `path`, a list; a ValueError naming the file otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a datasets metadata file ({type(e).__name__}: {e})") from e
    if not isinstance(value, list):
        raise ValueError(f"{path}: not a datasets metadata file (no list {key!r})")
    return value


def _is_file_or_link(path: Path) -> bool:
    """Files, and links to anything but directories: a dangling link is listed so that it
    is reported as unreadable rather than silently ignored."""
    return path.is_file() or (path.is_symlink() and not path.is_dir())


# -- formats -----------------------------------------------------------------------------------------------
def file_format(path: Path) -> tuple[str, str | None]:
    """(kind, compression) of a file by its name: kind is jsonl | parquet | arrow | text,
    compression None or one of COMPRESSIONS (only jsonl and text are read compressed)."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    base = name[: -len(compression)] if compression else name
    if base.endswith(".jsonl"):
        return "jsonl", compression
    if compression is None and name.endswith((".parquet", ".arrow")):
        return name.rsplit(".", 1)[1], None
    return "text", compression


def open_stream(path: Path, compression: str | None) -> IO[bytes]:
    """The decompressed bytes of `path`, read as they are needed."""
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdStream(path), CHUNK)
    return open(path, "rb")


def _stream_failure(compression: str | None, error: Exception) -> str:
    """The reason of a stream that breaks: an early end of a .zst/.xz file is
    `truncated_stream`; anything else (and gzip's, as before) `unreadable_file`."""
    return (
        "truncated_stream"
        if compression in (".zst", ".xz") and isinstance(error, EOFError)
        else "unreadable_file"
    )


class _ZstdStream(io.RawIOBase):
    """A .zst file decompressed by zstandard's stream_reader (frames read across) that raises
    EOFError at its end when its last frame is incomplete: the stream_reader itself ends
    quietly on a truncated file."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._file, read_across_frames=True, closefd=False
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._reader.readinto(buffer)
        if count == 0 and not zstd_frames_complete(self._file.fileno()):
            raise EOFError("zstd stream ends inside a frame (truncated file)")
        return count

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
            self._file.close()
        super().close()


def zstd_frames_complete(fd: int) -> bool:
    """Whether the zstd frames of the file `fd` end exactly at its end, from the frame and
    block headers alone (RFC 8878; skippable frames included), without decoding."""
    size, position = os.fstat(fd).st_size, 0
    while position < size:
        position = _zstd_frame_end(fd, position)
        if position < 0:
            return False
    return position == size


def _zstd_frame_end(fd: int, start: int) -> int:
    """Offset after the frame at `start`, or -1 when the file ends inside its headers."""
    head = os.pread(fd, 5, start)
    if len(head) < 5:
        return -1
    magic, descriptor = int.from_bytes(head[:4], "little"), head[4]
    if magic >> 4 == 0x184D2A5:  # skippable frame: magic, 4-byte size, data
        size = os.pread(fd, 4, start + 4)
        return start + 8 + int.from_bytes(size, "little") if len(size) == 4 else -1
    single = descriptor >> 5 & 1
    position = start + 5 + (1 - single) + (0, 1, 2, 4)[descriptor & 3] + (single, 2, 4, 8)[descriptor >> 6]
    while True:  # blocks: 3-byte header (last, type, size), then size bytes (1 for an RLE block)
        header = os.pread(fd, 3, position)
        if len(header) < 3:
            return -1
        value = int.from_bytes(header, "little")
        position += 3 + (1 if value >> 1 & 3 == 1 else value >> 3)
        if value & 1:
            return position + 4 * (descriptor >> 2 & 1)  # content checksum


# -- filter ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordFilter:
    """Keeps the records whose `field` is a number within [minimum, maximum] (None: open)."""

    field: str
    minimum: float | None = None
    maximum: float | None = None

    def rejects(self, value: object) -> str | None:
        """Why a record whose filter field holds `value` (MISSING when absent) is filtered
        out, or None to keep it."""
        if value is MISSING or value is None:
            return f"no {self.field!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"{self.field!r} is {value!r}"
        if self.minimum is not None and value < self.minimum:
            return f"{self.field}={value} < filter_min={self.minimum}"
        if self.maximum is not None and value > self.maximum:
            return f"{self.field}={value} > filter_max={self.maximum}"
        return None


def record_filter(field: str | None, minimum: float | None, maximum: float | None) -> RecordFilter | None:
    """The filter of the DocumentReader options, checked: bounds need a field, min <= max."""
    if field is None:
        if minimum is not None or maximum is not None:
            raise ValueError("filter_min/filter_max need a filter_field")
        return None
    if minimum is not None and maximum is not None and minimum > maximum:
        raise ValueError(f"filter_min={minimum} > filter_max={maximum}")
    return RecordFilter(field, minimum, maximum)


# -- reader ------------------------------------------------------------------------------------------------
class DocumentReader:
    """Iterate the documents of `inputs` in a stable order, filling `self.stats`; formats,
    reasons and the accounting rules are in the module docstring. `self.files` are the
    resolved files, `self.duplicates` the places of files reached again (not read again)."""

    def __init__(
        self,
        inputs: list[str],
        *,
        jsonl_field: str = "text",
        on_error: str = "skip",
        filter_field: str | None = None,
        filter_min: float | None = None,
        filter_max: float | None = None,
        batch_rows: int = BATCH_ROWS,
        pieces: TextPieces | None = None,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}")
        self.filter = record_filter(filter_field, filter_min, filter_max)
        self.duplicates: list[Path] = []
        self.files = resolve_inputs(inputs, self.duplicates)
        self.jsonl_field = jsonl_field
        self.on_error = on_error
        self.batch_rows = batch_rows
        self.pieces = pieces
        self.stats = InputStats()

    def _bad(self, reason: str, where: str, detail: str = "") -> None:
        if self.on_error == "fail":
            raise InputError(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.stats.skip(reason, where, detail)

    def _broken(self, reason: str, where: str, error: BaseException, detail: str = "") -> None:
        """A unit whose records are unknown (a file, the rest of a stream or of a row
        group): one document read, one skipped (or InputError)."""
        self.stats.documents_read += 1
        self._bad(reason, where, f"{detail}{type(error).__name__}: {error}")

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            self.stats.files += 1
            kind, compression = file_format(path)
            if kind == "jsonl":
                yield from self._jsonl(path, compression)
            elif kind == "parquet":
                yield from self._parquet(path)
            elif kind == "arrow":
                yield from self._arrow(path)
            else:
                yield from self._text(path, compression)

    # -- whole-file documents
    def _text(self, path: Path, compression: str | None) -> Iterator[Document]:
        if self.pieces is not None and not (compression is None and _size(path) <= self.pieces.piece_bytes):
            yield from self._text_in_pieces(path, compression)
            return
        raw = self._read_whole(path, compression)
        if raw is not None:
            self.stats.bytes_read += len(raw)
            yield from self._whole_file(path, raw)

    def _text_in_pieces(self, path: Path, compression: str | None) -> Iterator[Document]:
        """A whole-file document checked in one streamed pass (the reasons and details of
        _whole_file), then, when longer than a piece, read again piece by piece."""
        scan = _TextScan(path, self.pieces.piece_bytes)
        try:
            with open_stream(path, compression) as f:
                scan.run(f)
        except STREAM_ERRORS as e:
            return self._broken(_stream_failure(compression, e), str(path), e, f"at line {scan.lines + 1}: ")
        self.stats.bytes_read += scan.size
        if scan.kept is not None:  # one piece: as any whole-file document
            yield from self._whole_file(path, scan.kept)
            return
        if scan.problem is not None:
            self.stats.documents_read += 1
            return self._bad(*scan.problem)
        if scan.chars > self.pieces.max_chars:  # the tokenizer cannot cut it: read whole
            raw = self._read_whole(path, compression)
            if raw is not None:
                yield from self._whole_file(path, raw)
            return
        self.stats.documents_read += 1
        self.stats.documents_yielded += 1
        yield from _pieces(path, compression, self.pieces)

    def _read_whole(self, path: Path, compression: str | None) -> bytes | None:
        """The decompressed file, or None when it breaks (one unit, detail: line reached)."""
        if compression is None:
            try:
                return path.read_bytes()
            except OSError as e:
                return self._broken("unreadable_file", str(path), e)
        chunks: list[bytes] = []
        try:
            with open_stream(path, compression) as f:
                while chunk := f.read(CHUNK):
                    chunks.append(chunk)
        except STREAM_ERRORS as e:
            line = sum(c.count(b"\n") for c in chunks) + 1
            return self._broken(_stream_failure(compression, e), str(path), e, f"at line {line}: ")
        return b"".join(chunks)

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

    # -- records
    def _record_text(self, where: str, text: object, score: object = MISSING) -> str | None:
        """The text of a record whose text field holds `text` and filter field `score`
        (MISSING when absent), or None when it is filtered out or bad (counted)."""
        if self.filter is not None and (why := self.filter.rejects(score)) is not None:
            example = self.stats.documents_skipped.get("filtered", 0) < FILTERED_EXAMPLES
            return self.stats.skip("filtered", where, why, example)
        if text is MISSING:
            return self._bad("missing_field", where, f"no {self.jsonl_field!r}")
        if not isinstance(text, str):
            return self._bad("invalid_field_type", where, f"{self.jsonl_field!r} is {type(text).__name__}")
        if not text.strip():
            return self._bad("empty_document", where)
        self.stats.documents_yielded += 1
        return text

    def _jsonl(self, path: Path, compression: str | None) -> Iterator[Document]:
        """Streams the file line by line (a large compressed file is never held in memory);
        a stream that breaks is one unit at the first line not read."""
        number = 0
        try:
            with open_stream(path, compression) as f:
                for number, line in enumerate(f, 1):  # noqa: B007 - used after the loop
                    self.stats.bytes_read += len(line)
                    document = self._jsonl_line(path, number, line.rstrip(b"\r\n"))
                    if document is not None:
                        yield document
        except STREAM_ERRORS as e:
            self._broken(_stream_failure(compression, e), f"{path}:{number + 1}", e)

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
        if not isinstance(record, dict):
            return self._bad("missing_field", where, f"no {self.jsonl_field!r}")
        score = record.get(self.filter.field, MISSING) if self.filter else MISSING
        text = self._record_text(where, record.get(self.jsonl_field, MISSING), score)
        return None if text is None else Document(text, str(path), number)

    def _fields(self) -> list[str]:
        """The fields a record is read for: its text and, with a filter, the filter's."""
        return [self.jsonl_field] + ([self.filter.field] if self.filter else [])

    def _record_batch(self, path: Path, first_row: int, batch) -> Iterator[Document]:
        """The rows of a pyarrow RecordBatch, numbered from `first_row`; a null is MISSING."""
        texts = _column_values(batch, self.jsonl_field)
        scores = _column_values(batch, self.filter.field) if self.filter else itertools.repeat(MISSING)
        self.stats.bytes_read += _text_bytes(batch, self.jsonl_field)
        name = str(path)
        for row, text, score in zip(itertools.count(first_row), texts, scores):
            self.stats.documents_read += 1
            kept = self._record_text(f"{name}:row {row}", MISSING if text is None else text, score)
            if kept is not None:
                yield Document(kept, name, row=row)

    def _parquet(self, path: Path) -> Iterator[Document]:
        """Row group by row group, `batch_rows` rows at a time, reading only the text and
        filter columns (unbuffered column chunks: memory is about a page and a batch).
        Page checksums are verified where the writer stored them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(
                str(path), pre_buffer=False, buffer_size=CHUNK, page_checksum_verification=True
            )
        except (OSError, pa.ArrowException) as e:
            return self._broken("unreadable_file", str(path), e)
        with parquet:
            names = parquet.schema_arrow.names
            columns = [c for c in dict.fromkeys(self._fields()) if c in names]
            first_row = 0
            for group in range(parquet.num_row_groups):
                yield from self._row_group(parquet, path, group, first_row, columns)
                first_row += parquet.metadata.row_group(group).num_rows

    def _row_group(
        self, parquet, path: Path, group: int, first_row: int, columns: list[str]
    ) -> Iterator[Document]:
        """One row group; if its data fail to decode, its rows not yet read are one
        `corrupt_row_group` unit."""
        import pyarrow as pa

        row = first_row
        batches = parquet.iter_batches(
            batch_size=self.batch_rows, row_groups=[group], columns=columns, use_threads=False
        )
        try:
            for batch in batches:
                yield from self._record_batch(path, row, batch)
                row += batch.num_rows
        except (OSError, pa.ArrowException) as e:
            last = first_row + parquet.metadata.row_group(group).num_rows - 1
            self._broken("corrupt_row_group", f"{path}:row group {group}", e, f"rows {row}-{last} unread: ")

    def _arrow(self, path: Path) -> Iterator[Document]:
        """Record batch by record batch from the file (not memory-mapped: a batch is read,
        used and released); a stream that breaks after its schema is one
        `truncated_stream` unit at the first row not read."""
        import pyarrow as pa

        try:
            source, batches = _open_ipc(path)
        except (OSError, pa.ArrowException) as e:
            return self._broken("unreadable_file", str(path), e)
        row = 0
        with source:
            try:
                for batch in batches:
                    yield from self._record_batch(path, row, batch)
                    row += batch.num_rows
            except (OSError, pa.ArrowException) as e:
                self._broken("truncated_stream", f"{path}:row {row}", e)


def _open_ipc(path: Path):
    """(open file, iterator of record batches) of an Arrow IPC stream or file."""
    import pyarrow as pa

    source = pa.OSFile(str(path))
    try:
        if source.read(6) == b"ARROW1":  # the file format (random access, footer)
            reader = pa.ipc.open_file(source)
            return source, (reader.get_batch(i) for i in range(reader.num_record_batches))
        source.seek(0)
        return source, iter(pa.ipc.open_stream(source))
    except BaseException:
        source.close()
        raise


def _column_values(batch, name: str) -> list:
    """The Python values of column `name` (None for nulls); MISSING for every row if absent."""
    if name not in batch.schema.names:
        return [MISSING] * batch.num_rows
    return batch.column(name).to_pylist()


def _text_bytes(batch, name: str) -> int:
    """The bytes of the string values of column `name` (0 if absent or not strings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in batch.schema.names:
        return 0
    column = batch.column(name)
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        return 0
    return pc.sum(pc.binary_length(column)).as_py() or 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # unreadable: read whole, which reports it


class _TextScan:
    """One streamed pass over a whole-file document: decompressed size, characters, lines,
    what _whole_file would refuse it for (`problem`: (reason, place, detail), with the same
    precedence and details), and its bytes when they fit one piece (`kept`)."""

    def __init__(self, path: Path, piece_bytes: int):
        self.path, self.piece_bytes = path, piece_bytes
        self.size = self.chars = self.lines = 0
        self.kept: bytes | None = None
        self.problem: tuple[str, str, str] | None = None

    def run(self, stream: IO[bytes]) -> None:
        decoder, blank, kept = codecs.getincrementaldecoder("utf-8")(), True, []
        binary, bad_byte = False, None
        while chunk := stream.read(CHUNK):
            binary = binary or (self.size < 8192 and b"\x00" in chunk[: 8192 - self.size])
            if bad_byte is None:
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(chunk)
                    blank = blank and not text.strip()
                    self.chars += len(text)
                except UnicodeDecodeError as e:
                    bad_byte = self.size - pending + e.start
            self.lines += chunk.count(b"\n")
            self.size += len(chunk)
            if kept is not None:
                kept = kept + [chunk] if self.size <= self.piece_bytes else None
        if bad_byte is None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                bad_byte = self.size - len(decoder.getstate()[0]) + e.start
        self.kept = b"".join(kept) if kept is not None else None
        where = str(self.path)
        if binary:
            self.problem = ("binary_file", where, "NUL bytes")
        elif bad_byte is not None:
            self.problem = ("invalid_utf8", where, f"byte {bad_byte}")
        elif blank:
            self.problem = ("empty_document", where, "")


def _pieces(path: Path, compression: str | None, pieces: TextPieces) -> Iterator[Document]:
    """The pieces of a valid whole-file document (checked by _TextScan), each ending after a
    newline where pieces.allows lets it be cut, of about pieces.piece_bytes (longer where no
    such newline comes sooner); the last one `final`."""
    decoder, buffer, before = codecs.getincrementaldecoder("utf-8")(), "", ""
    try:
        with open_stream(path, compression) as f:
            searched = 0  # buffer[:searched] holds no allowed cut (a long stretch without one)
            while chunk := f.read(CHUNK):
                buffer += decoder.decode(chunk)
                while len(buffer) >= pieces.piece_bytes:
                    cut = _line_cut(buffer, pieces, searched)
                    if cut is None:
                        searched = len(buffer)
                        break
                    yield Document(buffer[:cut], str(path), before=before, final=False)
                    before, buffer, searched = buffer[cut - 1], buffer[cut:], 0
            buffer += decoder.decode(b"", final=True)
    except (*STREAM_ERRORS, UnicodeDecodeError) as e:  # the scan read it whole a moment ago
        raise InputError(f"{path}: changed while it was read in pieces ({type(e).__name__}: {e})") from e
    yield Document(buffer, str(path), before=before, final=True)


def _line_cut(text: str, pieces: TextPieces, searched: int) -> int | None:
    """The end of the next piece: after the last newline of text[piece_bytes // 2 : piece_bytes]
    followed by a character the cut allows, else after the first such newline further on;
    None when there is none yet (text[:searched] was searched before)."""
    last = len(text) - 1  # a newline needs the character after it
    window = min(pieces.piece_bytes, last)
    end = window if searched <= window else pieces.piece_bytes // 2  # the window was searched
    while (newline := text.rfind("\n", pieces.piece_bytes // 2, end)) >= 0:
        if pieces.allows("\n", text[newline + 1]):
            return newline + 1
        end = newline
    position = max(window, searched - 1)
    while (newline := text.find("\n", position, last)) >= 0:
        if pieces.allows("\n", text[newline + 1]):
            return newline + 1
        position = newline + 1
    return None
