"""`dlm prepare` tokens/s on the same text stored as JSONL, Parquet and .jsonl.zst.

    .venv/bin/python bench/prepare_formats.py [--mb 30] [--formats jsonl,parquet,jsonl.zst]
        [--workers 2] [--rounds 2]

Writes about --mb MB of text (this Python's standard library sources, one document each,
repeated; bench/read_formats.py's corpus and writers) in each format, trains one 8k BPE on
the JSONL, then runs the real command (`python -m pretrain.cli prepare ... workers=N`, via
bench/prepare_throughput.py's `prepare`) on each format, interleaved over rounds (the speed
of a shared machine drifts), and prints per format the median prepare tokens/s (the
command's own figure) and wall tokens/s, relative to JSONL, and whether every format gave
byte-identical shards (the same documents in the same order: the hold-out hash depends on
the file and document numbers only). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prepare_throughput import prepare  # noqa: E402
from read_formats import corpus, write  # noqa: E402


def tokenizer(jsonl: Path, root: Path, vocab: int) -> str:
    from data.config import TokenizerConfig
    from data.tokenizer import train_tokenizer

    start = time.perf_counter()
    path, _ = train_tokenizer(TokenizerConfig(input=[str(jsonl)], output=str(root / "tok"), vocab_size=vocab))
    print(f"tokenizer: BPE {vocab} in {time.perf_counter() - start:.1f} s")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=30)
    ap.add_argument("--formats", default="jsonl,parquet,jsonl.zst")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    formats = args.formats.split(",")
    root = Path(tempfile.mkdtemp(prefix="dlm-prepare-formats-"))
    try:
        texts = corpus(args.mb)
        paths = {fmt: write(fmt, texts, root) for fmt in formats}
        tok = tokenizer(paths.get("jsonl") or write("jsonl", texts, root), root, args.vocab)
        results: dict[str, list[dict]] = {fmt: [] for fmt in formats}
        for r in range(args.rounds):
            for fmt in formats if r % 2 == 0 else formats[::-1]:
                out = root / f"out-{fmt}-{r}"
                results[fmt].append(prepare([str(paths[fmt])], tok, out, args.workers, 2048))
                shutil.rmtree(out)
        report(results, formats, len(texts), args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(results: dict[str, list[dict]], formats: list[str], documents: int, args) -> None:
    shas = {tuple(res["sha"]) for runs in results.values() for res in runs}
    print(
        f"\ndlm prepare, {documents:,} documents ({args.mb:g} MB of text), workers={args.workers}, "
        f"median of {args.rounds} rounds; identical shards for every format: {len(shas) == 1}"
    )
    base = statistics.median(x["prepare_rate"] for x in results[formats[0]])
    for fmt in formats:
        prep = statistics.median(x["prepare_rate"] for x in results[fmt])
        wall = statistics.median(x["wall_rate"] for x in results[fmt])
        print(
            f"  {fmt:<10} {prep / 1e6:.2f}M tokens/s (prepare, {prep / base:.2f}x {formats[0]})   "
            f"{wall / 1e6:.2f}M tokens/s (wall)"
        )


if __name__ == "__main__":
    main()
