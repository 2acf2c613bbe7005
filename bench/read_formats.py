"""Throughput of data.sources.DocumentReader on the same text in each input format.

    .venv/bin/python bench/read_formats.py [--mb 50] [--formats jsonl,jsonl.zst,parquet,jsonl.gz,arrow]

Writes about --mb MB of text (the Python standard library's .py files, one document each,
concatenated over and over until the size is reached: varied text, as real documents
are) into a temporary directory as each format: `.jsonl` (one {"text": ...} record per
line), `.jsonl.zst` (zstd level 3), `.parquet` (pyarrow defaults: snappy, dictionary
where it pays), `.jsonl.gz` (gzip level 6) and `.arrow` (an Arrow IPC stream of
1000-row batches, as `datasets` writes). Then reads each once with a DocumentReader,
consuming the documents and nothing else, and prints documents/s and MB/s, MB being the
UTF-8 text of the documents (the same for every format, so the rates compare). One run;
each file is read right after it is written, so from the page cache: the figures are the
reader's decoding and parsing, not the disk's. Figures are printed, never asserted.
Temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.sources import DocumentReader, stdlib_files  # noqa: E402

FORMATS = ("jsonl", "jsonl.zst", "parquet", "jsonl.gz", "arrow")


def corpus(megabytes: float) -> list[str]:
    """Standard library sources, repeated until `megabytes` MB of UTF-8 text."""
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    sources = [s for s in sources if s.strip()]
    texts, size, target = [], 0, int(megabytes * 1e6)
    while size < target:
        for text in sources:
            texts.append(text)
            size += len(text.encode())
            if size >= target:
                break
    return texts


def write_jsonl(texts: list[str], path: Path, opener=open) -> None:
    with opener(path, "wb") as f:
        for start in range(0, len(texts), 1000):
            f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[start : start + 1000]).encode())


def write(fmt: str, texts: list[str], root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    path = root / f"corpus.{fmt}"
    if fmt == "jsonl":
        write_jsonl(texts, path)
    elif fmt == "jsonl.zst":
        write_jsonl(
            texts, path, lambda p, mode: zstandard.ZstdCompressor(level=3).stream_writer(open(p, mode))
        )
    elif fmt == "jsonl.gz":
        write_jsonl(texts, path, lambda p, mode: gzip.open(p, mode, compresslevel=6))
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": texts}), path)
    elif fmt == "arrow":
        table = pa.table({"text": texts})
        with pa.ipc.new_stream(path, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=1000):
                writer.write_batch(batch)
    else:
        raise SystemExit(f"unknown format {fmt!r}; one of {FORMATS}")
    return path


def read(path: Path) -> tuple[int, float, DocumentReader]:
    reader = DocumentReader([str(path)])
    start = time.perf_counter()
    documents = sum(1 for _ in reader)
    return documents, time.perf_counter() - start, reader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    texts = corpus(args.mb)
    text_bytes = sum(len(t.encode()) for t in texts)
    root = Path(tempfile.mkdtemp(prefix="dlm-read-formats-"))
    print(f"{len(texts):,} documents, {text_bytes / 1e6:.1f} MB of text (stdlib sources, repeated)")
    print(f"{'format':<10} {'file MB':>8} {'write s':>8} {'read s':>7} {'documents/s':>12} {'MB/s':>7}")
    try:
        for fmt in args.formats.split(","):
            start = time.perf_counter()
            path = write(fmt, texts, root)
            written = time.perf_counter() - start
            documents, seconds, reader = read(path)
            if documents != len(texts) or not reader.stats.reconciles:
                raise SystemExit(f"{fmt}: read {documents} of {len(texts)} documents: {reader.stats}")
            print(
                f"{fmt:<10} {path.stat().st_size / 1e6:8.1f} {written:8.1f} {seconds:7.2f} "
                f"{documents / seconds:12,.0f} {text_bytes / 1e6 / seconds:7.1f}"
            )
            path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
