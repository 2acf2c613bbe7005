"""Loader tokens/s of the Megatron source (data.source=megatron: megatron-core's GPTDataset over
a .bin/.idx) against our shards (data.source=shards: the streaming loader over webdataset
.tar shards), on the same documents.

    .venv/bin/python bench/loader_sources.py [--mb 200] [--seq-len 2048] [--batch 4] [--workers 0,2]

Writes about --mb MB of synthetic documents (random ids of a 32k vocabulary, lengths drawn
around 600 tokens, EOS at each end) twice into a temporary directory (removed at the end):
as one Megatron prefix (parallel/datasets.IndexedWriter, one item per document) and as
dlm-shards/1 shards of the same token stream packed into seq_len samples
(data.shards.write_shard, segments from EOS). Then, one data-parallel rank, one process:

- megatron index: megatron-core's GPTDataset build (document, sample and shuffle index) for
  one epoch of samples, the start-up cost a run pays once (cached afterwards);
- megatron: MegatronSamples.train over every sample of that epoch in microbatches of
  --batch, as the trainer asks for them (tokens and segments rebuilt from the index);
- shards: the streaming loader's microbatches for the same number of samples, per
  num_workers (DataLoader start-up included).

Figures are printed, never asserted; both sides read from the page cache (written just before).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.loader import build_train_loader  # noqa: E402
from data.shards import FORMAT, MANIFEST, segment_ids, write_shard  # noqa: E402
from parallel.datasets import IndexedWriter, MegatronSamples, build_samples, resolve  # noqa: E402

VOCAB, EOS, SHA = 32000, 2, "ab" * 32


def documents(megabytes: float, seed: int = 0):
    """Documents of uint16 ids (2 bytes a token) until about `megabytes` MB."""
    rng, total = np.random.default_rng(seed), 0
    while total < megabytes * 1e6 / 2:
        doc = rng.integers(4, VOCAB, int(rng.lognormal(6.0, 0.8)) + 2).astype(np.uint16)
        doc[-1] = EOS
        total += doc.size
        yield doc


def write_both(root: Path, megabytes: float, seq_len: int, per_shard: int = 1024) -> int:
    """The prefix root/corpus and the shards root/shards of the same stream; returns samples."""
    import json

    writer, pending, shards, key = IndexedWriter(root / "corpus", VOCAB), [], [], 0
    (root / "shards").mkdir()
    rows: list[np.ndarray] = []
    for doc in documents(megabytes):
        writer.add(doc)
        pending.append(doc)
        if sum(p.size for p in pending) >= seq_len * per_shard:
            stream = np.concatenate(pending)
            cut = stream.size // seq_len * seq_len
            rows += list(stream[:cut].reshape(-1, seq_len))
            pending = [stream[cut:]]
            samples = [(row, segment_ids(row, EOS)) for row in rows]
            shards.append(
                write_shard(root / "shards" / f"train-{len(shards):05d}.tar", samples, key, "uint16")
            )
            key, rows = key + len(samples), []
    writer.finish()
    tokenizer = {
        "path": "bench",
        "sha256": SHA,
        "vocab_size": VOCAB,
        "eos_id": EOS,
        "pad_id": 0,
        "mask_id": 3,
    }
    train = {"shards": shards, "samples": key, "tokens": key * seq_len}
    manifest = {"format": FORMAT, "seq_len": seq_len, "dtype": "uint16", "tokenizer": tokenizer}
    (root / "shards" / MANIFEST).write_text(json.dumps({**manifest, "splits": {"train": train}}))
    return key


class Vocab:
    vocab_size, eos_id = VOCAB, EOS


def megatron(root: Path, samples: int, seq_len: int, batch: int) -> tuple[float, float]:
    start = time.perf_counter()
    train, _ = build_samples(
        [resolve(0, str(root / "corpus"))], [1.0], seq_len=seq_len, seed=0, eval_fraction=0.0,
        vocab=Vocab, cache_dir=None, train_samples=samples, reads=True,
    )  # fmt: skip
    built = time.perf_counter() - start
    data = MegatronSamples(train, None, names=["corpus"], seq_len=seq_len, planned=samples, summary="")
    start = time.perf_counter()
    for first in range(0, samples - batch + 1, batch):
        data.train(torch.arange(first, first + batch))
    return built, samples // batch * batch * seq_len / (time.perf_counter() - start)


def shards(root: Path, samples: int, seq_len: int, batch: int, workers: int) -> float:
    start = time.perf_counter()
    loader = build_train_loader(
        [(str(root / "shards"), 1.0)], seq_len=seq_len, micro_batch_size=batch, dp_rank=0, dp_size=1,
        seed=0, num_workers=workers, shuffle_shards=2, tokenizer_sha256=SHA,
    )  # fmt: skip
    read = 0
    for _, _batch in zip(range(samples // batch), loader, strict=False):
        read += batch
    loader.close()
    return read * seq_len / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", default="0,2")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dlm-loader-sources-"))
    try:
        start = time.perf_counter()
        samples = write_both(root, args.mb, args.seq_len)
        print(
            f"wrote {samples:,} samples of {args.seq_len} ({samples * args.seq_len / 1e6:.1f}M tokens) "
            f"both ways in {time.perf_counter() - start:.1f} s"
        )
        built, rate = megatron(root, samples, args.seq_len, args.batch)
        print(f"megatron index build: {built:.2f} s for {samples:,} samples (once per run; cached after)")
        print(f"{'megatron (GPTDataset)':<28} {rate / 1e6:8.2f}M tokens/s")
        for workers in (int(w) for w in args.workers.split(",")):
            shard_rate = shards(root, samples, args.seq_len, args.batch, workers)
            print(
                f"{f'shards, num_workers={workers}':<28} {shard_rate / 1e6:8.2f}M tokens/s "
                f"(megatron / shards = {rate / shard_rate:.2f})"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
