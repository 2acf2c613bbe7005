"""What the trainer sees of the data: a vocabulary, and per data-parallel rank a
function from global sample indices to token batches.

- byte sources (`data.source=stdlib|text`): windows of a byte stream, addressed by
  global sample index (any layout reads the same samples; the position is the
  trainer's consumed-sample count);
- `data.source=shards`: `dlm prepare` datasets streamed by data/loader.py, split by
  data-parallel rank, resumed exactly from the loader state saved in checkpoints.

`describe()` needs no process group and reads no data beyond manifests, so the
trainer can validate a config before it starts anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data.corpus import ByteTokenizer, WindowDataset, load_byte_corpus
from data.shards import ShardLocation, load_manifest, read_shard


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the key."""


@dataclass(frozen=True)
class Vocabulary:
    vocab_size: int
    mask_id: int | None  # None: the tokenizer declares none (model.mask_token_id must)
    eos_id: int
    pad_id: int | None
    tokenizer_sha256: str | None
    summary: str


def describe(cfg) -> Vocabulary:
    """The vocabulary the data uses (cfg: pretrain.config.DataConfig)."""
    if cfg.source in ("stdlib", "text"):
        t = ByteTokenizer()
        return Vocabulary(t.vocab_size, t.mask_id, t.EOS, t.PAD, None, f"{cfg.source} (bytes)")
    manifests = [load_manifest(src.path) for src in cfg.sources]
    first = manifests[0]["tokenizer"]
    for src, manifest in zip(cfg.sources, manifests, strict=True):
        if manifest["seq_len"] != cfg.seq_len:
            raise DataConfigError(
                f"data.seq_len={cfg.seq_len} but {src.path} was prepared with seq_len={manifest['seq_len']}"
            )
        if manifest["tokenizer"]["sha256"] != first["sha256"]:
            raise DataConfigError(
                f"data.sources: {src.path} and {cfg.sources[0].path} were tokenized with different "
                f"tokenizers ({manifest['tokenizer']['sha256'][:12]} vs {first['sha256'][:12]})"
            )
    if cfg.tokenizer:
        from data.tokenizer import load_tokenizer

        sha = load_tokenizer(cfg.tokenizer).sha256
        if sha != first["sha256"]:
            raise DataConfigError(
                f"data.tokenizer={cfg.tokenizer} (sha256 {sha[:12]}) is not the tokenizer "
                f"{cfg.sources[0].path} was prepared with ({first['path']}, sha256 {first['sha256'][:12]}): "
                "re-run `dlm prepare` with it"
            )
    samples = sum(m["splits"]["train"]["samples"] for m in manifests)
    names = ", ".join(f"{s.path} x{s.weight:g}" for s in cfg.sources)
    return Vocabulary(
        first["vocab_size"],
        first.get("mask_id"),
        first["eos_id"],
        first.get("pad_id"),
        first["sha256"],
        f"shards [{names}]: {samples:,} train samples",
    )


def check_layout(cfg, vocab: Vocabulary, *, seed: int, micro_batch_size: int, dp_size: int) -> None:
    """Fail before any process starts when the shard stream cannot be laid out for this
    many data-parallel ranks and workers (reads manifests only, starts no worker)."""
    if cfg.source != "shards":
        return
    from data.loader import LoaderConfigError, build_train_loader

    try:
        build_train_loader(
            [(s.path, s.weight) for s in cfg.sources],
            seq_len=cfg.seq_len,
            micro_batch_size=micro_batch_size,
            dp_rank=0,
            dp_size=dp_size,
            seed=seed,
            num_workers=cfg.num_workers,
            shuffle_shards=cfg.shuffle_shards,
            tokenizer_sha256=vocab.tokenizer_sha256,
        )
    except LoaderConfigError as e:
        raise DataConfigError(str(e)) from e


class TrainData:
    """Per-rank sample access for the trainer."""

    def train(self, index: torch.Tensor) -> torch.Tensor:  # [b] global indices -> [b, L]
        raise NotImplementedError

    def eval(self, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


class ByteWindows(TrainData):
    def __init__(self, cfg, seed: int):
        tokens, self.stats = load_byte_corpus(cfg.source, cfg.paths, cfg.max_bytes)
        self.dataset = WindowDataset(tokens, cfg.seq_len, seed=seed, eval_fraction=cfg.eval_fraction)
        self.summary = f"{self.stats.tokens:,} tokens, {self.dataset.num_train:,} train windows"

    def train(self, index):
        return self.dataset.train_samples(index)

    def eval(self, index):
        return self.dataset.eval_samples(index)


class ShardStream(TrainData):
    """Training batches from the streaming loader (the indices only size the batch: the
    loader's own state is the data position); eval batches from the first source's
    eval split, addressed by index."""

    def __init__(self, cfg, vocab: Vocabulary, *, seed, micro_batch_size, dp_rank, dp_size, state):
        from data.loader import build_train_loader

        self.loader = build_train_loader(
            [(s.path, s.weight) for s in cfg.sources],
            seq_len=cfg.seq_len,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            num_workers=cfg.num_workers,
            shuffle_shards=cfg.shuffle_shards,
            tokenizer_sha256=vocab.tokenizer_sha256,
            state=state,
        )
        self.iterator = iter(self.loader)
        self.micro_batch_size = micro_batch_size
        self._eval: torch.Tensor | None = None
        self._eval_location = cfg.sources[0].path
        self.summary = vocab.summary

    def train(self, index):
        if len(index) != self.micro_batch_size:
            raise ValueError(f"asked for {len(index)} samples, the loader yields {self.micro_batch_size}")
        return next(self.iterator)["tokens"]

    def eval(self, index):
        if self._eval is None:
            self._eval = read_split(self._eval_location, "eval")
        if self._eval.shape[0] == 0:
            raise DataConfigError(
                f"train.eval_every needs an eval split: {self._eval_location} has none "
                "(dlm prepare ... eval_fraction=0.01)"
            )
        return self._eval[index % self._eval.shape[0]]

    def state_dict(self):
        return self.loader.state_dict()

    def close(self):
        self.loader.close()


def read_split(location: str, split: str, limit: int = 4096) -> torch.Tensor:
    """Up to `limit` samples of a split, in order, as [n, seq_len] int64."""
    manifest = load_manifest(location)
    loc = ShardLocation(location)
    rows = []
    for shard in manifest["splits"].get(split, {}).get("shards", []):
        for _, tokens, _ in read_shard(
            loc, shard["name"], seq_len=manifest["seq_len"], dtype=manifest["dtype"]
        ):
            rows.append(torch.from_numpy(tokens.astype("int64")))
            if len(rows) >= limit:
                return torch.stack(rows)
    return torch.stack(rows) if rows else torch.zeros(0, manifest["seq_len"], dtype=torch.int64)


def build(
    cfg,
    vocab: Vocabulary,
    *,
    seed: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    state: dict[str, Any] | None,
) -> TrainData:
    if cfg.source in ("stdlib", "text"):
        return ByteWindows(cfg, seed)
    return ShardStream(
        cfg,
        vocab,
        seed=seed,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        state=state,
    )
