"""What the trainer sees of the data: a vocabulary, and per data-parallel rank a
function from global sample indices to batches: {"tokens": [b, L], "segments": [b, L]}
(document numbers within each sample, for document-level attention).

- byte sources (`data.source=stdlib|text`): windows of a byte stream, addressed by
  global sample index (any layout reads the same samples; the position is the
  trainer's consumed-sample count);
- `data.source=shards`: `dlm prepare` datasets streamed by data/loader.py, split by
  data-parallel rank, resumed exactly from the loader state saved in checkpoints;
  eval batches come from every source's eval split, in proportion to the weights.
- `data.source=megatron`: Megatron indexed datasets (.bin/.idx, or `dlm prepare
  format=megatron` directories) through megatron-core's dataset code (parallel/datasets.py),
  addressed by global sample index like the byte sources.

`describe()` needs no process group and reads no data beyond manifests, so the
trainer can validate a config before it starts anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data import mixture
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
    if cfg.source == "megatron":
        from parallel.datasets import describe as describe_megatron

        tok, summary = describe_megatron(cfg)
        return Vocabulary(
            tok["vocab_size"], tok["mask_id"], tok["eos_id"], tok["pad_id"], tok["sha256"], summary
        )
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


def token_byte_lengths(cfg) -> torch.Tensor | None:
    """[vocab] UTF-8 bytes each token id stands for (0 for special tokens), for bits per
    byte; None where unknown (a Hugging Face tokenizer, a tokenizer file not present)."""
    if cfg.source in ("stdlib", "text"):
        lengths = torch.zeros(ByteTokenizer.vocab_size, dtype=torch.float64)
        lengths[:256] = 1
        return lengths
    from pathlib import Path

    from data.tokenizer import Tokenizer, load_tokenizer

    path = tokenizer_path(cfg)
    tokenizer = load_tokenizer(path) if Path(path).is_file() else None
    if not isinstance(tokenizer, Tokenizer):
        return None
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)


def decoder(cfg):
    """ids -> text with the data's tokenizer, or None where it cannot be loaded."""
    if cfg.source in ("stdlib", "text"):
        return ByteTokenizer().decode
    from pathlib import Path

    from data.tokenizer import load_tokenizer

    path = tokenizer_path(cfg)
    return load_tokenizer(path).decode if Path(path).exists() else None


def tokenizer_path(cfg) -> str:
    """data.tokenizer, else the one the first source's manifest names."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.source == "megatron":
        from parallel.datasets import resolve
        from parallel.datasets import tokenizer_path as megatron_tokenizer

        return megatron_tokenizer(None, [resolve(i, s.path) for i, s in enumerate(cfg.sources)])
    return load_manifest(cfg.sources[0].path)["tokenizer"]["path"]


def mixture_specs(cfg) -> list[mixture.Spec]:
    return [mixture.Spec(s.path, s.weight, s.tokens, s.max_epochs, s.name) for s in cfg.sources]


def weighted_sources(cfg, run_samples: int | None) -> list[tuple[str, float]]:
    """(path, sampling weight) of data.sources: the weights as given, or with token budgets
    the fractions of the run they make (data/mixture.py)."""
    specs = mixture_specs(cfg)
    if run_samples is None or all(s.tokens is None for s in specs):
        return [(s.path, s.weight) for s in specs]
    try:
        weights = mixture.fractions(specs, run_samples * cfg.seq_len)
    except mixture.MixtureError as e:
        raise DataConfigError(str(e)) from e
    return [(s.path, w) for s, w in zip(specs, weights, strict=True)]


def mixture_plan(cfg, samples_per_epoch: list[int], run_samples: int) -> list[mixture.Share]:
    specs = mixture_specs(cfg)
    try:
        return mixture.plan(specs, samples_per_epoch, run_samples, cfg.seq_len)
    except mixture.MixtureError as e:
        raise DataConfigError(str(e)) from e


def check_layout(
    cfg, vocab: Vocabulary, *, seed: int, micro_batch_size: int, dp_size: int, run_samples: int | None = None
):
    """Fail before any process starts when the shard stream cannot be laid out for this
    many data-parallel ranks and workers, or a source would be repeated more often than its
    max_epochs (reads manifests only, starts no worker). Returns the mixture's plan."""
    if cfg.source == "megatron":
        return (
            None if run_samples is None else checked_plan(cfg, megatron_samples_per_epoch(cfg), run_samples)
        )
    if cfg.source != "shards":
        return None
    from data.loader import LoaderConfigError, build_train_loader

    try:
        loader = build_train_loader(
            weighted_sources(cfg, run_samples),
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
    if run_samples is None:
        return None
    return checked_plan(cfg, loader.samples_per_epoch, run_samples)


def checked_plan(cfg, samples_per_epoch: list[int], run_samples: int) -> list[mixture.Share]:
    """The mixture's plan; refused when a source would pass its max_epochs."""
    shares = mixture_plan(cfg, samples_per_epoch, run_samples)
    try:
        mixture.check(shares)
    except mixture.MixtureError as e:
        raise DataConfigError(str(e)) from e
    return shares


def megatron_samples_per_epoch(cfg) -> list[int]:
    """Samples of seq_len tokens in one pass over each Megatron source's train documents."""
    from parallel.datasets import resolve, train_tokens

    sources = [resolve(i, s.path) for i, s in enumerate(cfg.sources)]
    return [max(1, n // cfg.seq_len) for n in train_tokens(sources, cfg.eval_fraction)]


def eos_segments(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document numbers of packed samples [b, L]: +1 after every EOS (the EOS belongs to
    the document it ends), as data.shards.segment_ids stores them."""
    after_eos = torch.zeros_like(tokens)
    after_eos[:, 1:] = tokens[:, :-1] == eos_id
    return after_eos.cumsum(dim=1)


class TrainData:
    """Per-rank sample access for the trainer: [b] global indices -> a batch
    {"tokens": LongTensor[b, L], "segments": LongTensor[b, L]}."""

    def train(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict | None:
        return None

    def epoch_report(self, total_samples: int) -> str:
        """One line for the start of a run that will consume `total_samples` (global)."""
        raise NotImplementedError

    def source_metrics(self, samples_read: int) -> dict[str, float]:
        """Per mixture source: tokens read so far by all ranks (`samples_read` samples in
        all), and the epochs they make."""
        return {}

    def close(self) -> None:
        pass


class NoData(TrainData):
    """A rank that reads nothing: its tensor-parallel group's first rank reads and
    broadcasts, or its pipeline stage needs no data (a middle stage without document
    attention)."""

    summary = "read by another rank of the tensor-parallel group"

    def epoch_report(self, total_samples: int) -> str:
        return ""


class ByteWindows(TrainData):
    def __init__(self, cfg, seed: int):
        tokens, self.stats = load_byte_corpus(cfg.source, cfg.paths, cfg.max_bytes)
        self.dataset = WindowDataset(tokens, cfg.seq_len, seed=seed, eval_fraction=cfg.eval_fraction)
        self.summary = f"{self.stats.tokens:,} tokens, {self.dataset.num_train:,} train windows"

    def train(self, index):
        return self._batch(self.dataset.train_samples(index))

    def epoch_report(self, total_samples: int) -> str:
        n = self.dataset.num_train
        return (
            f"epoch: {n:,} windows (every one read, none dropped); {total_samples:,} samples = "
            f"{total_samples / n:.2f} epochs"
        )

    def eval(self, index):
        return self._batch(self.dataset.eval_samples(index))

    @staticmethod
    def _batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": tokens, "segments": eos_segments(tokens, ByteTokenizer.EOS)}


class ShardStream(TrainData):
    """Training batches from the streaming loader (the indices only size the batch: the
    loader's own state is the data position); eval batches from the sources' eval
    splits (mixed by weight, in a fixed order), addressed by index."""

    def __init__(
        self, cfg, vocab: Vocabulary, *, seed, micro_batch_size, dp_rank, dp_size, state, run_samples
    ):
        from data.loader import build_train_loader

        self.loader = build_train_loader(
            weighted_sources(cfg, run_samples),
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
        self._eval: dict[str, torch.Tensor] | None = None
        self._sources = weighted_sources(cfg, run_samples)
        self._names = [spec.label for spec in mixture_specs(cfg)]
        self._seq_len = cfg.seq_len
        self.summary = f"{vocab.summary}; {self.loader.summary}"

    def train(self, index):
        if len(index) != self.micro_batch_size:
            raise ValueError(f"asked for {len(index)} samples, the loader yields {self.micro_batch_size}")
        batch = next(self.iterator)
        return {"tokens": batch["tokens"], "segments": batch["segments"]}

    def eval(self, index):
        if self._eval is None:
            self._eval = eval_mixture(self._sources)
        n = self._eval["tokens"].shape[0]
        return {k: v[index % n] for k, v in self._eval.items()}

    def state_dict(self):
        return self.loader.state_dict()

    def source_metrics(self, samples_read: int) -> dict[str, float]:
        drawn, per_epoch = self.loader.drawn_samples(), self.loader.samples_per_epoch
        metrics = {}
        for name, samples, epoch in zip(self._names, drawn.tolist(), per_epoch, strict=True):
            metrics[f"data/tokens/{name}"] = samples * self._seq_len
            metrics[f"data/epochs/{name}"] = samples / epoch
        return metrics

    def epoch_report(self, total_samples: int) -> str:
        return self.loader.epoch_report(total_samples)

    def close(self):
        self.loader.close()


def read_split(location: str, split: str, limit: int = 4096) -> dict[str, torch.Tensor]:
    """Up to `limit` samples of a split, in order: {"tokens", "segments"} [n, seq_len] int64."""
    manifest = load_manifest(location)
    loc = ShardLocation(location)
    tokens, segments = [], []
    for shard in manifest["splits"].get(split, {}).get("shards", []):
        if len(tokens) >= limit:
            break
        for _, tok, seg in read_shard(
            loc, shard["name"], seq_len=manifest["seq_len"], dtype=manifest["dtype"]
        ):
            tokens.append(torch.from_numpy(tok.astype("int64")))
            segments.append(torch.from_numpy(seg.astype("int64")))
            if len(tokens) >= limit:
                break
    empty = torch.zeros(0, manifest["seq_len"], dtype=torch.int64)
    return {
        "tokens": torch.stack(tokens) if tokens else empty,
        "segments": torch.stack(segments) if segments else empty,
    }


def eval_mixture(sources: list[tuple[str, float]], limit: int = 4096) -> dict[str, torch.Tensor]:
    """The eval set of a weighted mixture: up to limit * weight / total samples of every
    source's eval split, shuffled together in a fixed order (so the first eval batches
    already cover every source)."""
    total = sum(w for _, w in sources)
    parts = []
    for location, weight in sources:
        part = read_split(location, "eval", limit=max(1, round(limit * weight / total)))
        if part["tokens"].shape[0] == 0:
            raise DataConfigError(
                f"evaluation (train.eval_every, dlm eval) needs an eval split in every data.sources entry: "
                f"{location} has none (dlm prepare ... eval_fraction=0.01, and held-out documents of at "
                "least seq_len tokens in all)"
            )
        parts.append(part)
    mixed = {k: torch.cat([p[k] for p in parts]) for k in ("tokens", "segments")}
    order = torch.randperm(mixed["tokens"].shape[0], generator=torch.Generator().manual_seed(0))
    return {k: v[order] for k, v in mixed.items()}


def build(
    cfg,
    vocab: Vocabulary,
    *,
    seed: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    state: dict[str, Any] | None,
    run_samples: int | None = None,
    reads: bool = True,
    cache_dir: str | None = None,
) -> TrainData:
    """The training data of one rank; run_samples (samples read over the whole run, all
    ranks) turns token budgets into sampling weights. A rank that does not read gets
    NoData; with data.source=megatron every rank must call this (megatron's index build is
    collective), cache_dir being where it caches its index."""
    if cfg.source == "megatron":
        from parallel.datasets import open_samples

        return open_samples(
            cfg, vocab, seed=seed, run_samples=run_samples, state=state, cache_dir=cache_dir, reads=reads
        )
    if not reads:
        return NoData()
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
        run_samples=run_samples,
    )
