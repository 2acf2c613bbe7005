"""Embedded corpora and a byte-level tokenizer: enough to train without downloads.

The default corpus is the running interpreter's standard library sources (~31 MB of
Python on CPython 3.11). Documents are joined with EOS into one token stream and
cut into fixed-length windows; `WindowDataset` maps a *global sample index* to a
window through a per-epoch permutation, so any data-parallel layout reads the same
samples in the same global order, and the data position is one integer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data.sources import DocumentReader


class ByteTokenizer:
    """UTF-8 bytes 0-255 plus four special tokens."""

    PAD, BOS, EOS, MASK = 256, 257, 258, 259
    vocab_size = 260
    mask_id = MASK
    name = "bytes"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids, mask_char: str = "\u2592") -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif i == self.MASK:
                out.extend(mask_char.encode("utf-8"))
            elif i == self.EOS:
                out.extend(b"\n")
        return out.decode("utf-8", errors="replace")


@dataclass
class CorpusStats:
    documents_read: int = 0
    documents_written: int = 0
    documents_skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    tokens: int = 0


def load_byte_corpus(
    source: str, paths: list[str] | None = None, max_bytes: int | None = None
) -> tuple[np.ndarray, CorpusStats]:
    """Token stream (uint16) of the corpus, documents separated by EOS.

    source 'stdlib' reads the standard library sources; 'text' reads `paths` (files,
    directories, globs; see data/sources.py). Bad documents are skipped and counted;
    `documents_read == documents_written + sum(documents_skipped)`."""
    if source == "stdlib":
        inputs = ["stdlib"]
    elif source == "text":
        if not paths:
            raise ValueError("data.source=text needs data.paths")
        inputs = list(paths)
    else:
        raise ValueError(f"data.source={source!r}: expected 'stdlib' or 'text'")
    reader = DocumentReader(inputs)
    pieces, total = [], 0
    eos = np.array([ByteTokenizer.EOS], dtype=np.uint16)
    for doc in reader:
        raw = doc.text.encode("utf-8")
        pieces += [np.frombuffer(raw, dtype=np.uint8).astype(np.uint16), eos]
        total += len(raw)
        if max_bytes is not None and total >= max_bytes:
            break
    if not pieces:
        raise ValueError(f"data: no usable document among {len(reader.files)} files of source {source!r}")
    tokens = np.concatenate(pieces)[:max_bytes]
    r = reader.stats
    stats = CorpusStats(
        r.documents_read, r.documents_yielded, r.documents_skipped, r.skipped_examples, int(tokens.size)
    )
    return tokens, stats


class WindowDataset:
    """Fixed-length windows of a token stream, addressed by global sample index.

    The last `eval_fraction` of windows is held out for evaluation. Training sample
    g is window perm_e[g mod n] with e = g div n and perm_e a permutation drawn from
    (seed, e): epochs reshuffle, resuming needs only the number of consumed samples.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, seed: int, eval_fraction: float = 0.01):
        n = tokens.size // seq_len
        if n < 2:
            raise ValueError(f"data: corpus of {tokens.size} tokens is too small for data.seq_len={seq_len}")
        self.windows = torch.from_numpy(tokens[: n * seq_len].astype(np.int64).reshape(n, seq_len))
        self.num_eval = max(1, int(n * eval_fraction)) if eval_fraction > 0 else 0
        self.num_train = n - self.num_eval
        if self.num_train < 1:
            raise ValueError(
                f"data: {n} windows of data.seq_len={seq_len} leave none for training after "
                f"holding out data.eval_fraction={eval_fraction}"
            )
        self.seq_len = seq_len
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_train, generator=g))
        return self._perm[1]

    def train_samples(self, indices: torch.Tensor) -> torch.Tensor:
        """[b] global sample indices -> [b, seq_len] tokens."""
        rows = []
        for g in indices.tolist():
            epoch, pos = divmod(int(g), self.num_train)
            rows.append(self._permutation(epoch)[pos])
        return self.windows[torch.stack(rows)]

    def eval_samples(self, indices: torch.Tensor) -> torch.Tensor:
        """[b] eval indices (taken modulo the held-out set) -> [b, seq_len] tokens."""
        return self.windows[self.num_train + indices % self.num_eval]
