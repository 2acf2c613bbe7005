"""Throughput of the streaming training loader (data/loader.py) against the raw limit.

    .venv/bin/python bench/loader_throughput.py [--mb 300] [--seq-len 2048] [--workers 0,2]
    .venv/bin/python bench/loader_throughput.py --path /data/my-prepared-shards

Without --path, writes a synthetic dlm-shards/1 dataset of about --mb MB with
data.shards.write_shard into a temporary directory (removed at the end). Measures:

- raw: a cat-like sequential read of every train shard file (8 MiB reads, bytes
  discarded): the bytes/s limit of this storage, expressed as tokens/s of the dataset;
- read_shard: data.shards.read_shard over every shard in order, one process (the tar
  parsing every reader pays; no shuffling, batching or tensors);
- loader: one data-parallel rank (dp_size=1), one epoch, for each num_workers, counting
  the tokens of the microbatches the trainer receives (LongTensor[B, L] tokens and
  segments, keys, source, epoch), start-up of the DataLoader workers included.

Figures are printed, never asserted. Page cache: the raw read runs first (and last) so
both sides read from memory when the dataset fits; `tokens/s/process` divides by the
number of reading processes (max(num_workers, 1)).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.loader import build_train_loader  # noqa: E402
from data.shards import (  # noqa: E402
    FORMAT,
    MANIFEST,
    ShardLocation,
    load_manifest,
    read_shard,
    segment_ids,
    write_shard,
)


def write_dataset(root: Path, megabytes: float, seq_len: int, samples_per_shard: int) -> None:
    """Random tokens (vocab 32000, EOS=2 every ~500 tokens) in uint16 shards."""
    bytes_per_sample = seq_len * 4 + 1536  # tokens + segments + tar headers/padding
    n_samples = int(megabytes * 1e6 / bytes_per_sample)
    rng = np.random.default_rng(0)
    shards, key = [], 0
    for i in range(max(1, n_samples // samples_per_shard)):
        samples = []
        for _ in range(samples_per_shard):
            tok = rng.integers(4, 32000, seq_len, dtype=np.uint16)
            tok[rng.random(seq_len) < 1 / 500] = 2
            samples.append((tok, segment_ids(tok, 2)))
        shards.append(write_shard(root / f"train-{i:05d}.tar", samples, key, "uint16"))
        key += samples_per_shard
    tokenizer = dict(path="synthetic", sha256="0" * 64, vocab_size=32000, pad_id=0, bos_id=1, eos_id=2)
    tokenizer["mask_id"] = 3
    train = {"shards": shards, "samples": key, "tokens": key * seq_len}
    manifest = {"format": FORMAT, "seq_len": seq_len, "dtype": "uint16", "tokenizer": tokenizer}
    manifest["splits"] = {"train": train}
    (root / MANIFEST).write_text(json.dumps(manifest))


def raw_read(root: Path, names: list[str]) -> tuple[float, int]:
    start, total = time.perf_counter(), 0
    for name in names:
        with open(root / name, "rb", buffering=0) as f:
            while block := f.read(8 << 20):
                total += len(block)
    return time.perf_counter() - start, total


def parse_read(root: Path, names: list[str], seq_len: int, dtype: str) -> tuple[float, int]:
    """data.shards.read_shard over every shard in order: the tar parsing the loader builds on."""
    start, tokens, loc = time.perf_counter(), 0, ShardLocation(str(root))
    for name in names:
        for _, tok, _ in read_shard(loc, name, seq_len=seq_len, dtype=dtype):
            tokens += tok.size
    return time.perf_counter() - start, tokens


def loader_read(location: str, seq_len: int, num_workers: int, mbs: int, shuffle_shards: int) -> tuple:
    start = time.perf_counter()
    ld = build_train_loader(
        [(location, 1.0)],
        seq_len=seq_len,
        micro_batch_size=mbs,
        dp_rank=0,
        dp_size=1,
        seed=0,
        num_workers=num_workers,
        shuffle_shards=shuffle_shards,
        epochs=1,
    )
    tokens = batches = 0
    first = None
    for batch in ld:
        if first is None:
            first = time.perf_counter() - start
        tokens += batch["tokens"].numel()
        batches += 1
    ld.close()
    return time.perf_counter() - start, tokens, batches, first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", help="a prepared dataset (directory); default: a synthetic one in a temp dir")
    p.add_argument("--mb", type=float, default=300.0, help="size of the synthetic dataset")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--shuffle-shards", type=int, default=2)
    p.add_argument("--workers", default="0,2", help="comma-separated num_workers values")
    args = p.parse_args()

    tmp = None
    try:
        if args.path:
            root = Path(args.path)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="dlm-loader-bench-"))
            root = tmp / "shards"
            root.mkdir()
            t = time.perf_counter()
            write_dataset(root, args.mb, args.seq_len, args.samples_per_shard)
            print(f"wrote a synthetic dataset in {time.perf_counter() - t:.1f} s: {root}")
        manifest = load_manifest(str(root))
        seq_len, train = manifest["seq_len"], manifest["splits"]["train"]
        names = [s["name"] for s in train["shards"]]
        n_tokens = train["samples"] * seq_len
        size = sum((root / n).stat().st_size for n in names)
        print(
            f"dataset: {len(names)} train shards, {size / 1e6:.1f} MB, {train['samples']:,} samples x "
            f"{seq_len} = {n_tokens / 1e6:.2f}M tokens ({manifest['dtype']}); micro batch "
            f"{args.micro_batch_size}, shuffle_shards {args.shuffle_shards}, dp_size 1, one epoch"
        )
        raw = [raw_read(root, names) for _ in range(2)]  # the first one also warms the page cache
        parse_secs, parse_tokens = parse_read(root, names, seq_len, manifest["dtype"])
        rows = []
        for w in [int(x) for x in args.workers.split(",")]:
            secs, tokens, batches, first = loader_read(
                str(root), seq_len, w, args.micro_batch_size, args.shuffle_shards
            )
            rows.append((w, secs, tokens, batches, first))
        raw.append(raw_read(root, names))
        raw_secs = min(r[0] for r in raw)
        raw_tps = n_tokens / raw_secs
        print(
            f"raw sequential read (best of {len(raw)}): {raw_secs:.3f} s, {size / raw_secs / 1e6:,.0f} MB/s "
            f"= {raw_tps / 1e6:,.1f}M tokens/s"
        )
        parse_tps = parse_tokens / parse_secs
        print(
            f"read_shard alone, sequential, 1 process: {parse_secs:.2f} s, {parse_tps / 1e6:,.1f}M tokens/s "
            f"({parse_tps / raw_tps:.1%} of raw)"
        )
        print(
            f"{'num_workers':>11} {'batches':>8} {'tokens':>12} {'seconds':>8} {'1st batch s':>11} "
            f"{'Mtok/s':>8} {'Mtok/s/proc':>11} {'vs raw':>7} {'vs read_shard':>13}"
        )
        for w, secs, tokens, batches, first in rows:
            tps = tokens / secs
            print(
                f"{w:>11} {batches:>8,} {tokens:>12,} {secs:>8.2f} {first:>11.2f} {tps / 1e6:>8.2f} "
                f"{tps / max(w, 1) / 1e6:>11.2f} {tps / raw_tps:>7.1%} {tps / parse_tps:>13.1%}"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
