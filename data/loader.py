"""The streaming training loader: `dlm prepare` shards (data/shards.py) -> microbatches
for ONE data-parallel rank, equal in number on every rank, resumable exactly.

Layout of one epoch e of source s (every rank computes all of it from the manifest
alone, without communication):

- the source's train shards are permuted from (seed, s, e); the epoch's stream is their
  samples in that shard order (file order within a shard): all N(s) train samples;
- the stream is cut into S = dp_size * W reader slots (W = max(num_workers, 1),
  slot = worker * dp_size + rank): slot k gets the contiguous range [k * E, (k + 1) * E),
  E(s) = N(s) // S, i.e. whole shards plus part of a shard at either end. Every rank and
  worker yields the same number of samples per epoch; only the stream's last N mod S < S
  samples are dropped (`dropped_per_epoch`; other ones each epoch, as the order changes);
- a slot's pieces (whole or partial shards), `shuffle_shards` at a time, form its groups;
  inside group j the samples of its pieces are permuted jointly from (seed, s, e, k, j):
  the slot's epoch stream is its permuted groups, one after another. A shard cut by a
  slot boundary is read whole by both of its slots (at most S - 1 extra shard reads per
  epoch: `Layout.read_factor`). A slot needs E >= micro_batch_size (`Layout.check`), so
  a micro batch holds samples of at most two of a slot's epochs.

Each logical worker draws the source of its n-th sample from the weights with a
counter-based generator keyed by (seed, rank, worker, n) (single source: no draws),
takes the next sample of that source's slot stream (epochs chain: the stream is
infinite unless `epochs` is given, single source only) and cuts its samples into
microbatches of micro_batch_size. Rank batch b is batch b // W of logical worker b % W:
torch DataLoader's in-order round-robin over its workers.

State and exact resume: the state is C = batches returned by `__next__` (plus the
static layout), identical on every rank. Logical worker lw has produced
n_lw = #{b < C : b % W == lw} batches; its per-source cursors (epoch, offset) follow
from replaying the cheap source draws of its first n_lw * B samples and the epoch
length E(s); whole groups are skipped without reading, only the current group is read.
DataLoader always restarts its round-robin at worker id 0, so worker id d plays
logical worker (d + C) % W: the first batch returned after a resume is exactly batch C.

A saved state from a different layout (dp_size, W, micro_batch_size, seed,
shuffle_shards, sources) is not an error: a warning is logged and each source
continues at the same fraction of its current epoch as rank 0 of the old layout had
reached (APPROXIMATE: the new layout's epoch order differs, so within that epoch some
samples are seen twice and others not at all). num_workers 0 and 1 are the same layout.
A state of STATE_VERSION 1 (before: slot k read groups k, k + S, ... and every slot was
cut to the smallest one, so the same C names other samples now) takes the same
approximate path, placed with the version-1 epoch lengths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import ShardFormatError, ShardLocation, load_manifest, read_shard

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: contiguous slot ranges of the epoch's stream (1: groups dealt round-robin)
_M64 = (1 << 64) - 1
_TAG_SHARDS, _TAG_GROUP, _TAG_SOURCE = 0x5A4D, 0x6E0F, 0x50C3
_REPLAY_CHUNK = 1 << 22  # source draws replayed per numpy call on resume


class LoaderConfigError(ValueError):
    """A loader setting or dataset combination that cannot work (the message says what to change)."""


# -- counter-based randomness -------------------------------------------------------------
def _mix(x: int) -> int:
    """SplitMix64 finaliser on a Python int."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    h = 0
    for p in parts:
        h = _mix(h ^ (p & _M64))
    return h


def _uniform(key: int, start: int, stop: int) -> np.ndarray:
    """u_n in [0, 1) for counters n in [start, stop): SplitMix64's stream seeded at key."""
    return _uniform_rows(np.array([key], dtype=np.uint64), start, stop)[0]


def _uniform_rows(keys: np.ndarray, start: int, stop: int) -> np.ndarray:
    """_uniform of every key (uint64[k]) at once: float64[k, stop - start]."""
    n = np.arange(start, stop, dtype=np.uint64)
    x = keys[:, None] + (n + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@cache
def _source_keys(seed: int, dp_size: int, worker: int) -> np.ndarray:
    """The source-draw keys of a logical worker on every data-parallel rank (computed once:
    Layout.drawn runs every step)."""
    return np.array([_key(_TAG_SOURCE, seed, r, worker) for r in range(dp_size)], dtype=np.uint64)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([p & _M64 for p in parts])))


# -- the static layout: everything that determines every rank's stream ---------------------
@dataclass(frozen=True)
class Source:
    location: str
    weight: float
    names: tuple[str, ...]
    sizes: tuple[int, ...]  # samples per train shard, manifest order
    dtype: str
    train_hash: str  # sha256 of the train shard list (names, sample counts, file hashes)

    def describe(self) -> dict:
        return {"location": self.location, "weight": self.weight, "train_hash": self.train_hash}

    @cached_property
    def samples(self) -> int:
        return sum(self.sizes)


@dataclass
class Layout:
    sources: tuple[Source, ...]
    seq_len: int
    micro_batch_size: int
    dp_size: int
    workers: int  # W = max(num_workers, 1): logical workers per rank
    seed: int
    shuffle_shards: int

    @property
    def slots(self) -> int:
        return self.dp_size * self.workers

    def slot(self, rank: int, worker: int) -> int:
        return worker * self.dp_size + rank

    def samples(self, s: int) -> int:
        """N(s): train samples of source s."""
        return self.sources[s].samples

    def check(self, only=None) -> None:
        """Every slot must get at least one micro batch of every source per epoch."""
        for s, src in enumerate(self.sources):
            if only is not None and s not in only:
                continue
            if self.samples(s) == 0:
                raise LoaderConfigError(f"data source {src.location} has no train samples")
            if self.epoch_len(s) < self.micro_batch_size:
                raise LoaderConfigError(
                    f"data source {src.location} has {self.samples(s):,} train samples, fewer than "
                    f"train.micro_batch_size={self.micro_batch_size} for each of the dp_size={self.dp_size} "
                    f"x data.num_workers={self.workers} = {self.slots} reader slots (needs "
                    f"{self.slots * self.micro_batch_size:,}): lower data.num_workers or "
                    "train.micro_batch_size, train on fewer data-parallel ranks, or add data"
                )

    def order(self, s: int, epoch: int) -> np.ndarray:
        """Shard indices of source s in epoch order."""
        return _rng(_TAG_SHARDS, self.seed, s, epoch).permutation(len(self.sources[s].sizes))

    def spans(self, s: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shards of source s in epoch order and where each starts in the epoch's stream
        (the shards' samples in file order, one shard after another), with its end."""
        order = self.order(s, epoch)
        ends = np.cumsum(np.asarray(self.sources[s].sizes, dtype=np.int64)[order])
        return order, np.concatenate([[0], ends])

    def pieces(self, s: int, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """The (shard, first, stop) sample ranges (file order) that make up `slot`'s contiguous
        range [slot * E, (slot + 1) * E) of source s's stream in `epoch`."""
        order, bounds = self.spans(s, epoch)
        E = self.epoch_len(s)
        lo, hi = slot * E, (slot + 1) * E
        first = int(np.searchsorted(bounds, lo, side="right")) - 1
        last = int(np.searchsorted(bounds, hi - 1, side="right")) - 1
        pieces = [
            (int(order[i]), max(lo - int(bounds[i]), 0), min(hi, int(bounds[i + 1])) - int(bounds[i]))
            for i in range(first, last + 1)
        ]
        return [p for p in pieces if p[2] > p[1]]

    def epoch_len(self, s: int, epoch: int = 0) -> int:
        """E(s): samples every slot yields from source s per epoch (the same in every epoch)."""
        return self.samples(s) // self.slots

    def dropped(self, s: int, epoch: int = 0) -> int:
        """Samples of source s per epoch that no slot yields: the stream's last N mod S."""
        return self.samples(s) - self.slots * self.epoch_len(s, epoch)

    def read_factor(self, s: int, epoch: int = 0) -> float:
        """Samples of source s that all slots read in `epoch` (whole shards) / N(s): shards cut by
        a slot boundary are read twice."""
        _, bounds = self.spans(s, epoch)
        E, slots = self.epoch_len(s, epoch), np.arange(self.slots)
        first = np.searchsorted(bounds, slots * E, side="right") - 1
        last = np.searchsorted(bounds, (slots + 1) * E - 1, side="right") - 1
        return float((bounds[last + 1] - bounds[first]).sum()) / self.samples(s)

    def choices(self, rank: int, worker: int, start: int, stop: int) -> np.ndarray:
        """Source of samples [start, stop) of a logical worker."""
        if len(self.sources) == 1:
            return np.zeros(stop - start, dtype=np.int64)
        weights = np.asarray([src.weight for src in self.sources], dtype=np.float64)
        cum = np.cumsum(weights / weights.sum())
        u = _uniform(_key(_TAG_SOURCE, self.seed, rank, worker), start, stop)
        return np.minimum(np.searchsorted(cum, u, side="right"), len(self.sources) - 1)

    def drawn(self, worker: int, start: int, stop: int) -> np.ndarray:
        """Samples per source among samples [start, stop) of logical worker `worker`, summed
        over every data-parallel rank (the draws are counter-based: no communication)."""
        if len(self.sources) == 1:
            return np.array([self.dp_size * (stop - start)], dtype=np.int64)
        weights = np.asarray([src.weight for src in self.sources], dtype=np.float64)
        cum = np.cumsum(weights / weights.sum())
        keys = _source_keys(self.seed, self.dp_size, worker)
        counts = np.zeros(len(self.sources), dtype=np.int64)
        chunk = max(1, _REPLAY_CHUNK // self.dp_size)
        for a in range(start, stop, chunk):
            u = _uniform_rows(keys, a, min(stop, a + chunk))
            picks = np.minimum(np.searchsorted(cum, u.ravel(), side="right"), len(self.sources) - 1)
            counts += np.bincount(picks, minlength=len(self.sources))
        return counts

    def advance(self, s: int, cursor: tuple[int, int], count: int) -> tuple[int, int]:
        """The (epoch, offset) of source s's slot stream `count` samples after `cursor`."""
        epochs, offset = divmod(cursor[1] + count, self.epoch_len(s))
        return cursor[0] + epochs, offset

    def cursors(self, rank: int, worker: int, samples: int, start: list[tuple[int, int]], only=None):
        """Per-source (epoch, offset) after a logical worker's first `samples` samples
        (None for sources not in `only`, when given)."""
        counts = np.zeros(len(self.sources), dtype=np.int64)
        for a in range(0, samples, _REPLAY_CHUNK):
            b = min(samples, a + _REPLAY_CHUNK)
            counts += np.bincount(self.choices(rank, worker, a, b), minlength=len(self.sources))
        return [
            self.advance(s, start[s], int(counts[s])) if only is None or s in only else None
            for s in range(len(self.sources))
        ]

    def describe(self) -> dict:
        return {
            "dp_size": self.dp_size,
            "num_workers": self.workers,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
            "shuffle_shards": self.shuffle_shards,
            "sources": [src.describe() for src in self.sources],
        }

    def same_stream(self, other: dict) -> bool:
        """Whether a saved layout (`describe()`) yields the same streams; locations may differ."""
        mine = self.describe()
        keys = ("dp_size", "micro_batch_size", "seed", "shuffle_shards")
        if any(other.get(k) != mine[k] for k in keys) or max(other.get("num_workers", 0), 1) != self.workers:
            return False
        theirs = [(s.get("weight"), s.get("train_hash")) for s in other.get("sources", [])]
        return theirs == [(s["weight"], s["train_hash"]) for s in mine["sources"]]


class _LayoutV1(Layout):
    """STATE_VERSION 1 epoch lengths (group j read by slot j % S, every slot cut to the smallest
    one), only to place a version-1 state in the current layout (`TrainLoader._approximate`)."""

    def epoch_len(self, s: int, epoch: int = 0) -> int:
        sizes = np.asarray(self.sources[s].sizes, dtype=np.int64)[self.order(s, epoch)]
        group = np.arange(sizes.size) // self.shuffle_shards
        per_slot = np.bincount(group % self.slots, weights=sizes, minlength=self.slots)
        if per_slot.min() == 0:
            raise LoaderConfigError(f"version-1 layout: a reader slot gets no samples in epoch {epoch}")
        return int(per_slot.min())

    def advance(self, s: int, cursor: tuple[int, int], count: int) -> tuple[int, int]:
        epoch, offset = cursor
        offset += count
        while offset >= (length := self.epoch_len(s, epoch)):
            offset -= length
            epoch += 1
        return epoch, offset


# -- reading one slot's stream of one source ----------------------------------------------
class _SlotReader:
    """Samples of one source's stream for one reader slot; holds only the current group."""

    def __init__(self, layout: Layout, s: int, slot: int):
        self.layout, self.s, self.slot = layout, s, slot
        self.location = ShardLocation(layout.sources[s].location)
        self.epoch = -1
        self.groups: list[list[tuple[int, int, int]]] = []  # the slot's pieces, shuffle_shards at a time
        self.group_ends = np.zeros(0, dtype=np.int64)  # in the slot's epoch stream
        self.loaded = None  # (group index, its first offset, tokens, segments, keys)

    def _epoch(self, epoch: int) -> None:
        pieces, g = self.layout.pieces(self.s, epoch, self.slot), self.layout.shuffle_shards
        self.groups = [pieces[i : i + g] for i in range(0, len(pieces), g)]
        self.group_ends = np.cumsum([sum(stop - first for _, first, stop in grp) for grp in self.groups])
        self.epoch, self.loaded = epoch, None

    def _read(self, shard: int, first: int, stop: int) -> tuple[list, list, list]:
        """Keys, tokens and segments of samples [first, stop) of a shard (read whole, counted)."""
        src, lay = self.layout.sources[self.s], self.layout
        name, keys, tokens, segments, n = src.names[shard], [], [], [], 0
        for key, tok, seg in read_shard(self.location, name, seq_len=lay.seq_len, dtype=src.dtype):
            if first <= n < stop:
                keys.append(key)
                tokens.append(tok)
                segments.append(seg)
            n += 1
        if n != src.sizes[shard]:
            raise ShardFormatError(
                f"{self.location.url(name)}: {n} samples, the manifest says {src.sizes[shard]}"
            )
        return keys, tokens, segments

    def _load(self, j: int) -> None:
        """Group j of the slot's epoch: its pieces' samples, permuted jointly."""
        keys, tokens, segments = [], [], []
        for piece in self.groups[j]:
            piece_keys, piece_tokens, piece_segments = self._read(*piece)
            keys += piece_keys
            tokens += piece_tokens
            segments += piece_segments
        lay = self.layout
        perm = _rng(_TAG_GROUP, lay.seed, self.s, self.epoch, self.slot, j).permutation(len(keys))
        first = int(self.group_ends[j - 1]) if j else 0
        keys = np.asarray(keys, dtype=np.int64)[perm]
        self.loaded = (j, first, np.stack(tokens)[perm], np.stack(segments)[perm], keys)

    def take(self, epoch: int, start: int, count: int):
        """Rows [start, start + count) of this slot's epoch stream, all from one group;
        returns (tokens, segments, keys, count actually taken)."""
        if epoch != self.epoch:
            self._epoch(epoch)
        if self.loaded is None or not (self.loaded[1] <= start < self.group_ends[self.loaded[0]]):
            self._load(int(np.searchsorted(self.group_ends, start, side="right")))
        j, first, tokens, segments, keys = self.loaded
        stop = min(start + count, int(self.group_ends[j]))
        a, b = start - first, stop - first
        return tokens[a:b], segments[a:b], keys[a:b], stop - start


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step: a worker leaves SIGUSR1/SIGTERM to the
    trainer, which stops at a step boundary (pretrain/stop.py) and then ends its workers."""
    for number in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def _as_is(batch):
    return batch


class _RankStream(IterableDataset):
    """One rank's batches; inside DataLoader worker d it plays logical worker (d + C) % W."""

    def __init__(self, layout: Layout, rank: int, first_batch: int, start: list, limit: int | None):
        self.layout, self.rank, self.first_batch = layout, rank, first_batch
        self.start, self.limit = [tuple(c) for c in start], limit  # limit: batches per logical worker

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        d = info.id if info is not None else 0
        W = self.layout.workers
        lw = (d + self.first_batch) % W
        batch = self.first_batch // W + (1 if lw < self.first_batch % W else 0)
        yield from self.batches(lw, batch)

    def batches(self, lw: int, batch: int) -> Iterator[dict]:
        lay, B = self.layout, self.layout.micro_batch_size
        cursors = lay.cursors(self.rank, lw, batch * B, self.start)
        readers = [_SlotReader(lay, s, lay.slot(self.rank, lw)) for s in range(len(lay.sources))]
        while self.limit is None or batch < self.limit:
            choice = lay.choices(self.rank, lw, batch * B, (batch + 1) * B)
            parts, i = [], 0
            while i < B:
                s = int(choice[i])
                run = 1 + int(np.argmax(choice[i + 1 :] != s)) if np.any(choice[i + 1 :] != s) else B - i
                while run:
                    epoch, offset = cursors[s]
                    run_len = min(run, lay.epoch_len(s, epoch) - offset)
                    tok, seg, key, n = readers[s].take(epoch, offset, run_len)
                    parts.append((tok, seg, key, s, epoch))
                    cursors[s] = lay.advance(s, cursors[s], n)
                    run, i = run - n, i + n
            # compact numpy (source dtype tokens, one int64 block for keys/source/epoch): out of a
            # worker it is pickled through a pipe, much cheaper than one shared-memory file per tensor
            meta = np.empty((3, B), dtype=np.int64)
            meta[0] = np.concatenate([p[2] for p in parts])
            meta[1] = np.repeat([p[3] for p in parts], [len(p[2]) for p in parts])
            meta[2] = np.repeat([p[4] for p in parts], [len(p[2]) for p in parts])
            tokens = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            segments = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            yield np.ascontiguousarray(tokens), np.ascontiguousarray(segments), meta
            batch += 1


def _saved_position(state: dict) -> tuple[int, list[tuple[int, int]]]:
    """(batches, start) of a saved state."""
    try:
        batches = int(state["batches"])
        start = [tuple(c) for c in state.get("start") or [(0, 0)] * len(state["sources"])]
    except (KeyError, TypeError, ValueError) as e:
        raise LoaderConfigError(f"data loader state without a readable position ({e!r}): {state}") from e
    return batches, start


def _epoch_progress(layout: Layout, batches: int, start: list, only: dict) -> np.ndarray:
    """Per source of `layout` (those in `only`): epochs completed by rank 0 after `batches`
    batches, fractional, averaged over its logical workers."""
    W, B = layout.workers, layout.micro_batch_size
    progress = np.zeros(len(layout.sources))
    for lw in range(W):
        n = batches // W + (1 if lw < batches % W else 0)
        for j, cursor in enumerate(layout.cursors(0, lw, n * B, start, only=only)):
            if cursor is not None:
                progress[j] += (cursor[0] + cursor[1] / layout.epoch_len(j, cursor[0])) / W
    return progress


# -- the public loader --------------------------------------------------------------------
class TrainLoader:
    """Iterator of microbatches for one data-parallel rank (see the module docstring).

    Batches: tokens/segments LongTensor[B, L], keys/source/epoch LongTensor[B].
    `state_dict()` is the same on every rank after the same number of batches.
    """

    def __init__(self, layout: Layout, *, dp_rank: int, num_workers: int, epochs: int | None, state):
        self.layout, self.dp_rank, self.num_workers, self.epochs = layout, dp_rank, num_workers, epochs
        self.start = [(0, 0)] * len(layout.sources)
        self.batches = 0  # batches returned since `start`
        if state is not None:
            self._restore(state)
        lay, W, B = layout, layout.workers, layout.micro_batch_size
        sources = range(len(lay.sources))
        self.samples_per_epoch = [lay.slots * lay.epoch_len(s) for s in sources]  # all ranks together
        self.dropped_per_epoch = [lay.dropped(s) for s in sources]
        self.batches_per_epoch = W * lay.epoch_len(0) // B if len(lay.sources) == 1 else None
        self.limit = None  # batches per logical worker
        if epochs is not None:
            e0, o0 = self.start[0]
            self.limit = max((epochs - e0) * lay.epoch_len(0) - o0, 0) // B
        self.total_batches = None if self.limit is None else W * self.limit
        self._drawn = np.zeros(len(lay.sources), dtype=np.int64)  # drawn_samples(): counted so far
        self._drawn_upto = [0] * W  # ... up to this sample of each logical worker
        self._loader = None
        self._iter = None

    # state
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "start": [list(c) for c in self.start],
            **self.layout.describe(),
        }

    def _restore(self, state: dict) -> None:
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise LoaderConfigError(
                f"data loader state version {version!r}: this loader reads version {STATE_VERSION} "
                "(and 1, placed approximately)"
            )
        batches, start = _saved_position(state)
        if version == STATE_VERSION and self.layout.same_stream(state):
            self.batches, self.start = batches, start
            return
        self.start = self._approximate(state, batches, start)
        self.batches = 0
        diff, now = self._changes(state), self.state_dict()
        log.warning(
            "data loader: the saved state was made with a different layout or loader version (%s: %s -> %s); "
            "continuing each source at the same fraction of its current epoch (approximate: within that "
            "epoch some samples repeat and others are skipped). Positions (epoch, offset): %s",
            ", ".join(diff),
            {k: state.get(k) for k in diff if k != "sources"},
            {k: now[k] for k in diff if k != "sources"},
            self.start,
        )

    def _changes(self, state: dict) -> list[str]:
        """Names of the layout keys (and "version") in which a saved state differs from this loader."""
        mine = self.layout.describe()
        diff = [k for k in mine if k != "sources" and state.get(k) != mine[k]]
        if [(s.get("weight"), s.get("train_hash")) for s in state.get("sources", [])] != [
            (s["weight"], s["train_hash"]) for s in mine["sources"]
        ]:
            diff.append("sources")
        return diff + (["version"] if state.get("version") != STATE_VERSION else [])

    def _saved_layout(self, state: dict) -> tuple[Layout, dict[int, int]]:
        """The layout a state was saved with (the current shard lists of the sources it shares
        with this loader) and {saved source index: current index}."""
        current = self.layout.sources
        by_hash = {s.train_hash: i for i, s in enumerate(current)}
        by_location = {s.location: i for i, s in enumerate(current)}
        old_sources, matched = [], {}
        for j, saved in enumerate(state.get("sources", [])):
            i = by_hash.get(saved.get("train_hash"), by_location.get(saved.get("location")))
            base = current[i] if i is not None else current[0]  # unmatched: only its weight is used
            location, weight = saved.get("location", "?"), float(saved["weight"])
            old_sources.append(Source(location, weight, base.names, base.sizes, base.dtype, ""))
            if i is not None and i not in matched.values():
                matched[j] = i
        kind = _LayoutV1 if state.get("version") == 1 else Layout
        old = kind(
            tuple(old_sources),
            self.layout.seq_len,
            int(state["micro_batch_size"]),
            int(state["dp_size"]),
            max(int(state["num_workers"]), 1),
            int(state["seed"]),
            int(state["shuffle_shards"]),
        )
        return old, matched

    def _approximate(self, state: dict, batches: int, start: list) -> list[tuple[int, int]]:
        """Each current source's (epoch, offset) at the epoch fraction rank 0 of the saved
        layout had reached (averaged over its workers); rank-independent."""
        result = [(0, 0)] * len(self.layout.sources)
        try:
            old, matched = self._saved_layout(state)
            old.check(only=matched)
            progress = _epoch_progress(old, batches, start, matched)
        except (LoaderConfigError, KeyError, ValueError, TypeError, IndexError) as e:
            log.warning("data loader: cannot place the saved state in the current data (%s); starts over", e)
            return result
        for j, i in matched.items():
            epoch = int(progress[j])
            result[i] = (epoch, int((progress[j] - epoch) * self.layout.epoch_len(i, epoch)))
        return result

    # iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            dataset = _RankStream(self.layout, self.dp_rank, self.batches, self.start, self.limit)
            self._loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_as_is,
                worker_init_fn=_ignore_stop_signals,
            )
            self._iter = iter(self._loader)
        tokens, segments, meta = next(self._iter)
        self.batches += 1
        meta = torch.from_numpy(meta)
        return {
            "tokens": torch.from_numpy(tokens.astype(np.int64)),
            "segments": torch.from_numpy(segments.astype(np.int64)),
            "keys": meta[0],
            "source": meta[1],
            "epoch": meta[2],
        }

    def close(self) -> None:
        it, self._iter, self._loader = self._iter, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def drawn_samples(self) -> np.ndarray:
        """Samples each source has given all data-parallel ranks together in the batches
        returned so far (the same count on every rank), since the start or the last layout
        change. Incremental: only the new batches' draws are replayed."""
        W, B = self.layout.workers, self.layout.micro_batch_size
        for worker in range(W):
            upto = (self.batches // W + (1 if worker < self.batches % W else 0)) * B
            if upto > self._drawn_upto[worker]:
                self._drawn += self.layout.drawn(worker, self._drawn_upto[worker], upto)
                self._drawn_upto[worker] = upto
        return self._drawn.copy()

    def epoch_samples(self, source: int, epoch: int = 0) -> int:
        """Samples each (rank, worker) yields from `source` per epoch (E(s), the same in every epoch)."""
        return self.layout.epoch_len(source, epoch)

    def dropped(self, source: int, epoch: int = 0) -> int:
        """Samples of `source` per epoch that no rank yields (fewer than the reader slots)."""
        return self.layout.dropped(source, epoch)

    def epochs_for(self, total_samples: int) -> list[float]:
        """Per source: epochs that a run of `total_samples` samples (all ranks together) goes
        through; for a mixture the expected figure, from the weights."""
        weights = [src.weight for src in self.layout.sources]
        return [
            total_samples * w / sum(weights) / n for w, n in zip(weights, self.samples_per_epoch, strict=True)
        ]

    def epoch_report(self, total_samples: int) -> str:
        """One line for the trainer: samples per epoch (all ranks), dropped per epoch, and the
        epochs a run of `total_samples` samples (all ranks) goes through, per source."""
        lay, epochs = self.layout, self.epochs_for(total_samples)
        ranks = f"{lay.dp_size} ranks x {lay.workers} workers"
        if len(lay.sources) == 1:
            return (
                f"data: {self.samples_per_epoch[0]:,} samples per epoch over {ranks}, "
                f"{self.dropped_per_epoch[0]:,} dropped per epoch; {total_samples:,} samples = "
                f"{_epochs_text(epochs[0])} epochs"
            )
        parts = [
            f"{src.location} x{src.weight:g}: {self.samples_per_epoch[s]:,} samples per epoch, "
            f"{self.dropped_per_epoch[s]:,} dropped, ~{_epochs_text(epochs[s])} epochs"
            for s, src in enumerate(lay.sources)
        ]
        return f"data over {ranks}: " + "; ".join(parts) + f" (in {total_samples:,} samples)"

    @property
    def summary(self) -> str:
        lay = self.layout
        parts = [
            f"{src.location} x{src.weight:g}: {len(src.sizes)} shards, {lay.samples(s):,} samples, "
            f"{lay.epoch_len(s):,}/slot/epoch, {self.dropped_per_epoch[s]:,} dropped/epoch, "
            f"shards read {lay.read_factor(s):.2f}x/epoch"
            for s, src in enumerate(lay.sources)
        ]
        return f"{lay.dp_size} ranks x {lay.workers} workers = {lay.slots} reader slots; " + "; ".join(parts)


def _epochs_text(epochs: float) -> str:
    return f"{epochs:,.2f}" if epochs >= 1 else f"{epochs:.2g}"


def _train_hash(train: dict) -> str:
    shards = [[s["name"], int(s["samples"]), s.get("sha256", "")] for s in train.get("shards", [])]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def build_train_loader(
    sources: list[tuple[str, float]],
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    num_workers: int = 2,
    shuffle_shards: int = 2,
    tokenizer_sha256: str | None = None,
    state: dict | None = None,
    epochs: int | None = None,
) -> TrainLoader:
    """The streaming loader of data-parallel rank `dp_rank` (tensor/pipeline peers pass the
    same dp_rank and get identical batches). `sources`: [(location, weight)]."""
    if not sources:
        raise LoaderConfigError("data.sources is empty")
    if not 0 <= dp_rank < dp_size:
        raise LoaderConfigError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
    if micro_batch_size < 1 or shuffle_shards < 1 or num_workers < 0:
        raise LoaderConfigError(
            f"micro_batch_size={micro_batch_size} and shuffle_shards={shuffle_shards} must be >= 1, "
            f"num_workers={num_workers} >= 0"
        )
    weights = [float(w) for _, w in sources]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise LoaderConfigError(f"data.sources weights {weights}: need finite weights >= 0, positive sum")
    if epochs is not None and (len(sources) != 1 or epochs < 1):
        raise LoaderConfigError(
            f"epochs={epochs}: a finite number of epochs (>= 1) needs exactly one source "
            f"(got {len(sources)}); a mixture streams forever"
        )
    loaded, first_sha = [], None
    for location, weight in sources:
        location = str(location)
        manifest = load_manifest(location)
        if manifest["seq_len"] != seq_len:
            raise LoaderConfigError(
                f"{location} was prepared with seq_len={manifest['seq_len']}, the trainer uses "
                f"data.seq_len={seq_len}: set data.seq_len={manifest['seq_len']} or re-run `dlm prepare` "
                f"with seq_len={seq_len}"
            )
        sha = manifest["tokenizer"].get("sha256")
        if tokenizer_sha256 is not None and sha != tokenizer_sha256:
            raise LoaderConfigError(
                f"{location} was tokenized with tokenizer sha256 {str(sha)[:12]} "
                f"({manifest['tokenizer'].get('path')}), but the trainer's tokenizer is "
                f"{tokenizer_sha256[:12]}: re-run `dlm prepare` on this data with the trainer's tokenizer, "
                "or train with the tokenizer it was prepared with"
            )
        if first_sha is not None and sha != first_sha:
            raise LoaderConfigError(
                f"{location} (tokenizer sha256 {str(sha)[:12]}) and {loaded[0].location} "
                f"({str(first_sha)[:12]}) were tokenized with different tokenizers: re-run `dlm prepare` "
                "on one of them with the other's tokenizer"
            )
        first_sha = sha
        train = manifest["splits"].get("train", {})
        shards = train.get("shards", [])
        loaded.append(
            Source(
                location,
                float(weight),
                tuple(s["name"] for s in shards),
                tuple(int(s["samples"]) for s in shards),
                manifest["dtype"],
                _train_hash(train),
            )
        )
    layout = Layout(
        tuple(loaded), seq_len, micro_batch_size, dp_size, max(num_workers, 1), int(seed), shuffle_shards
    )
    layout.check()
    return TrainLoader(layout, dp_rank=dp_rank, num_workers=num_workers, epochs=epochs, state=state)
