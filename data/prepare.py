"""`dlm prepare`: tokenize, pack and shard a corpus into a dlm-shards/1 dataset.

    dlm prepare input=[a.jsonl,dir/] output=DIR tokenizer=DIR/tokenizer.model seq_len=2048

`tokenizer` is a `dlm tokenizer` .model or a Hugging Face tokenizer.json (or a directory
holding one, e.g. `<import>/tokenizer/` of `dlm import-hf`): data.tokenizer.load_tokenizer.

Pipeline (the on-disk format is data/shards.py):

- read (main process): every resolved input file through its own
  `data.sources.DocumentReader` (so the manifest can account per file), in the stable
  order of `resolve_inputs`. A whole-file document (plain text) longer than
  TEXT_PIECE_BYTES is read in pieces of about that size, each ending after a newline where
  `tok.cuts` allows a cut (data.sources.TextPieces; one streamed pass checks it first), so
  memory holds a piece, not the file; the pieces are encoded as the chunks below (a
  continuation piece after the character before it when the tokenizer has a dummy prefix),
  EOS follows the last one, and they count as one document: the shards are those of
  reading it whole (tested for every tokenizer kind). Without cuts, documents are read whole;
- tokenize: documents are sent in batches to `cfg.workers` processes (a Pool whose
  initializer loads the Tokenizer once per process; at most 2 * workers batches in flight,
  results taken back in submission order, i.e. an ordered imap with back-pressure), or
  encoded in-process when workers=1 (workers start with `fork` where available: ~0.1 s
  instead of ~2 s for `spawn`; the tokenizer runs single-threaded in each). A document
  longer than chunk_chars is cut into pieces of about chunk_chars characters (`split_text`:
  after the last newline of the window's second half, else before the last run of spaces,
  else at any position), but only where `tok.cuts` (data/tokenizer.py) proves that the cut
  cannot change the ids: the ids of the pieces, concatenated, are those of the whole
  document. With a dummy prefix (Llama-2 style) a continuation piece is encoded after the
  character before its cut and the ids of that character alone are dropped. Tokenizers that
  cuts does not cover encode whole documents. EOS is appended to every document.
  The output does not depend on the number of workers or on the batching;
- split: with eval_fraction > 0, document number `d` (0-based, among the documents the
  reader yields from its file) of input file number `f` (0-based, in the resolved list)
  goes to eval when blake2b(f"{seed}:{f}:{d}") / 2**64 < eval_fraction (`is_eval`): a
  hash, so neither resuming, the workers nor the partitioning below can change it;
- pack: per split, the stream of the split's documents (each ending in EOS) is cut into
  consecutive samples of exactly seq_len tokens (segments: shards.segment_ids); the final
  tail shorter than seq_len is dropped and counted in `tokens_dropped`;
- shard: samples_per_shard samples per `<split>-<i:05d>.tar` (shards.write_shard, atomic),
  keys = sample number within the split; manifest.json written atomically last, with both
  splits (eval empty when eval_fraction=0).

`format=megatron` replaces pack and shard: each split's documents (EOS included) go, one
item per document, into `<split>.bin/.idx` through megatron-core's IndexedDatasetBuilder
(parallel/datasets.IndexedWriter: written under .tmp names, renamed when complete),
uint16 ids below 65,500 ids, else int32; megatron-core cuts samples at training time, so
nothing is dropped (`tokens_dropped` 0) and `samples` is 0. The manifest (format
dlm-megatron/1) has the same accounting, its splits `{prefix, bin_bytes, documents,
tokens}`; the config and its hash add `output_format`. Such a run saves no state between
shards: interrupted, it starts its files again. Parts merge by megatron's `add_index`.

Counts. `documents_read == documents_written + sum(documents_skipped.values())`, where
documents_written counts the documents whose tokens (text + EOS) entered the packed
stream of their split, including the documents that end up partly or wholly in the
dropped tail (their tokens are in `tokens_dropped`). A document that the reader yields but
that encodes to zero ids is skipped under the reason `no_tokens` (no EOS is emitted for it).
`tokens` = tokens in the shards = samples * seq_len. `inputs` lists one entry per input file
(`path`, on-disk `size`, decompressed `bytes` read, documents read/written/skipped); above
MAX_INPUT_ENTRIES files it lists one entry per input argument instead (`input`, `files`,
same counts), so the manifest stays small for corpora of millions of files.

config_hash = sha256 of {format, PREPARE_VERSION, jsonl_field, seq_len, chunk_chars,
samples_per_shard, eval_fraction, seed, tokenizer sha256, inputs_sha256}, inputs_sha256
being the sha256 of the resolved file list [(absolute path, size, mtime_ns)]. Not in it:
workers and progress (the output does not depend on them), the tokenizer path (its sha256
is), on_error (a run either produces exactly these bytes or stops) and the spelling of
`input` (the resolved list is). `manifest["config"]` holds the user-facing fields (no
output/workers/progress, so the manifest itself is identical for any worker count).

Re-running. With a manifest of the same config_hash whose shards are all present (sizes
checked, not hashes), the command prints 'up to date' and touches nothing; if a shard is
missing it prepares the directory again. A manifest, state file or shards of a
different (or unknown) configuration in the output directory is an error naming the
directory; other files there are ignored. There is no overwrite switch: delete the
directory or choose another output.

Resuming. `prepare.state.json` (format "dlm-prepare-state/2"), written atomically at the
start and after every batch of documents during which a shard was completed::

  format, config_hash, config (as in the manifest), generation, dtype,
  documents_consumed   items (documents, or pieces of a long whole-file document: version 2)
                       yielded by the readers whose tokens are all in completed
                       shards or in the carry (the next run skips them by counting: they are
                       read again, which recomputes the reader accounting, but not tokenized),
  carry: {file, sha256, train, eval}   prepare.state.<generation:06d>.bin holds the tokens
                       not yet in a shard: train then eval, raw little-endian `dtype`
                       (pending full samples + the partial tail; train/eval = token counts),
  splits: {train|eval: {shards: [manifest entries], samples, tokens, documents}},
  no_tokens: {count, per_file: {file index: count}, examples: [...]}

The carry file is written (atomically, under a new generation number) before the JSON that
names it, and the previous one is deleted after, so a kill -9 at any point leaves a
consistent pair. On resume, leftover `*.tmp` files and unreferenced carry files are
deleted, shards after the recorded ones are simply written again (same bytes), and the
final shards and manifest are byte-identical to an uninterrupted run. The state and carry
files are removed once the manifest is written.

Partitions and merging. For a Slurm array job, `partitions=N` splits the resolved input list
into N contiguous runs of files balanced by on-disk size (`partition_files`; every part holds
at least one file, so N may not exceed the number of files), and `partition=i` (0-based)
prepares only part i into `<output>/parts/<i:05d>/`, a complete dlm-shards/1 dataset under
every rule above (resumable, atomic, 'up to date' on rerun, refusing a foreign directory)::

  dlm prepare input=[...] output=DIR tokenizer=... partitions=8 partition=$SLURM_ARRAY_TASK_ID  (each task)
  dlm prepare merge input=[...] output=DIR tokenizer=... partitions=8                           (the merge)

(the merge after the array job, e.g. `sbatch --dependency=afterok:<array job id>`: it
prepares any part that is not complete itself, so it must not run while the tasks do; the
same command without `merge` and without `partition` merges too).

A part's config_hash adds partitions and partition to the fields above, its inputs_sha256
being that of its own files; its manifest also records its `tail` (the tokens of each split
after its last full sample, in `tail.bin`, train then eval, with their sha256) and its
skipped `examples` (the readers', those without ids). `inputs_by` is decided from the total
number of resolved files, so that the parts and the merge agree.

Without `partition` (and partitions > 1), the command prepares in this process, one after the
other, every part that is not complete, then merges the parts into `<output>` itself. The
merged dataset is the one a partitions=1 run writes, byte for byte, whatever N (tested for
1, 2 and 3): the same config and config_hash, shards and manifest. The merge

- checks that every part's manifest has the config_hash that part would have now, that its
  tail file is there and matches, and that the parts agree on tokenizer sha256, seq_len and
  dtype (an error names the part);
- packs, per split, the token stream of the parts in order (each part's samples, then its
  tail) into samples and shards exactly as one run does (`_Split`): the samples a part cut
  short continue with the next part's tokens, only the final tail is dropped, and the keys
  are 0..samples-1;
- sums the accounting (documents, skipped per reason, bytes_read; the skipped examples in
  one run's order; `inputs` concatenated per file, or summed per input argument) and checks
  that it reconciles.

The merge reads and writes every token once (I/O bound; the tokenization, the expensive
part, is in the array tasks). It is restartable: `merge.state.json` (format
"dlm-merge-state/1", config_hash, config, partitions) is written before the first shard; a
rerun merges again from the start (every shard is written atomically, so no half shard is
ever visible); manifest.json is written last, then the state file removed. A manifest,
state file or shards of another configuration in `<output>` are refused as above; a
partitions=1 run into a directory with an unfinished merge is told to finish the merge.
Once the manifest is complete, every run of this configuration (partitions=1, the merge,
or a `partition=i` task) prints 'up to date' and touches nothing, without reading the
parts: `<output>/parts/` is kept but can then be deleted.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.config import PrepareConfig
from data.files import write_atomic
from data.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    ShardLocation,
    read_shard,
    segment_ids,
    shard_name,
    token_dtype,
    write_shard,
)
from data.sources import EMBEDDED, MAX_EXAMPLES, ON_ERROR, DocumentReader, TextPieces, resolve_arguments
from data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

PREPARE_VERSION = 3  # bump when a code change alters the bytes written for the same config
STATE = "prepare.state.json"
STATE_FORMAT = "dlm-prepare-state/2"  # 2: documents_consumed counts pieces of long documents
MERGE_STATE = "merge.state.json"
MERGE_STATE_FORMAT = "dlm-merge-state/1"
PARTS = "parts"  # <output>/parts/<partition:05d>/: the parts of partitions > 1
TAIL = "tail.bin"  # a part's tokens after its last full sample, train then eval
NO_TOKENS = "no_tokens"
MAX_INPUT_ENTRIES = 10_000  # above this many input files, `inputs` is per input argument
PRINT_EXAMPLES = 10
BATCH_CHARS = 1 << 20  # characters of text per tokenization task
BATCH_DOCS = 2048  # documents per tokenization task
TEXT_PIECE_BYTES = 8 << 20  # whole-file documents longer than this are read in pieces (bounded memory)
HASHED = (
    "jsonl_field",
    "filter_field",
    "filter_min",
    "filter_max",
    "seq_len",
    "chunk_chars",
    "samples_per_shard",
    "eval_fraction",
    "seed",
)
_TMP = re.compile(
    r"^(?:(?:train|eval)-\d{5}\.tar|(?:train|eval)\.(?:bin|idx)|manifest\.json|(?:prepare|merge)\.state\.json"
    r"|prepare\.state\.\d{6}\.bin)\.tmp$"
)
_CARRY = re.compile(r"^prepare\.state\.\d{6}\.bin$")
_SHARD = re.compile(r"^(?:(?:train|eval)-\d{5}\.tar|(?:train|eval)\.(?:bin|idx))$")  # or megatron's files
FORMATS = ("shards", "megatron")

# Test hook: called with "shard_written" (by runs and merges), "state_saved",
# "manifest_written" (before the state file is removed) or "merge_manifest_written";
# raising there simulates an interruption at that point.
_FAULT: Callable[[str], None] | None = None


class PrepareError(ValueError):
    """A `dlm prepare` run that cannot proceed; the message names the directory or file."""


# -- text cutting and split assignment ---------------------------------------------------------------------
def split_text(text: str, limit: int, may_cut: Callable[[str, str], bool]) -> list[str]:
    """Cut `text` into consecutive pieces whose concatenation is `text`, only at positions p
    where may_cut(text[p - 1], text[p]). In the second half of each window of `limit`
    characters, a cut goes after the last newline, else before the last run of spaces
    (sentencepiece attaches a space to the word after it), else at the last allowed position;
    with none there, at the first allowed position after the window (a longer piece), or
    nowhere (the rest is one piece)."""
    pieces, start, n = [], 0, len(text)
    while n - start > limit:
        end = _cut(text, start + limit // 2, start + limit, may_cut)
        if end is None:
            break
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _cut(text: str, lo: int, hi: int, may_cut: Callable[[str, str], bool]) -> int | None:
    """Where the piece ending in (lo, hi] (hi < len(text)) is cut; see split_text."""
    return (
        _after_newline(text, lo, hi, may_cut)
        or _before_spaces(text, lo, hi, may_cut)
        or next((p for p in range(hi, lo, -1) if may_cut(text[p - 1], text[p])), None)
        or next((p for p in range(hi + 1, len(text)) if may_cut(text[p - 1], text[p])), None)
    )


def _after_newline(text: str, lo: int, hi: int, may_cut: Callable[[str, str], bool]) -> int | None:
    end = hi
    while (newline := text.rfind("\n", lo, end)) >= 0:
        if may_cut("\n", text[newline + 1]):
            return newline + 1
        end = newline
    return None


def _before_spaces(text: str, lo: int, hi: int, may_cut: Callable[[str, str], bool]) -> int | None:
    end = hi + 1
    while (space := text.rfind(" ", lo, end)) >= 0:
        while space > lo and text[space - 1] == " ":
            space -= 1
        if space > lo and may_cut(text[space - 1], " "):
            return space
        end = space
    return None


def is_eval(seed: int, file_index: int, document: int, fraction: float) -> bool:
    """Whether document number `document` of input file number `file_index` (in the whole
    resolved list) is held out: a hash of the three, so neither resuming, the workers nor the
    partitioning can change it."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{file_index}:{document}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


# -- tokenization (in-process or in the pool's workers) ------------------------------------------------------
_WORKER: dict = {}


class _Encoder:
    """Encodes documents as `dlm prepare` does: a document longer than chunk_chars is cut
    where `tok.cuts` allows (data.tokenizer), so its ids are those of the whole document."""

    def __init__(self, tok: Tokenizer | HFTokenizer, dtype: str, chunk_chars: int):
        self.tok, self.dtype, self.chunk_chars = tok, dtype, chunk_chars
        self.heads: dict[str, np.ndarray] = {}  # ids of one character before a cut (context)

    def inputs(self, text: str) -> list[tuple[str, str]]:
        """(character before the piece or "", piece) whose encodings make the document's ids."""
        cuts = self.tok.cuts
        if cuts is None or len(text) <= self.chunk_chars or len(text) > cuts.max_chars:
            return [("", text)]
        pieces = split_text(text, self.chunk_chars, cuts.allows)
        if not cuts.context:
            return [("", piece) for piece in pieces]
        return [("", pieces[0])] + [(a[-1], b) for a, b in zip(pieces, pieces[1:], strict=False)]

    def head(self, char: str) -> np.ndarray:
        if char not in self.heads:
            self.heads[char] = self.tok.encode_batch_numpy([char])[0]
        return self.heads[char]

    def encode(self, texts: list[tuple[str, str, bool]]) -> tuple[np.ndarray, np.ndarray]:
        """Per (character before, text, final) of a document or of a piece of one (a
        continuation piece has a character before it; only a final piece ends in EOS):
        (token counts incl. EOS (0: no ids, no EOS), flat ids in `dtype`)."""
        inputs, counts = [], []
        for before, text, _ in texts:
            cut = self.inputs(text)
            if before and self.tok.cuts.context:  # a continuation piece read by the reader
                cut[0] = (before, cut[0][1])
            inputs.extend(cut)
            counts.append(len(cut))
        # One thread per process: the processes are the parallelism (cfg.workers).
        encoded = self.tok.encode_batch_numpy([before + piece for before, piece in inputs])
        encoded = [self.drop_head(ids, before) for ids, (before, _) in zip(encoded, inputs, strict=True)]
        eos = np.array([self.tok.eos_id], dtype=np.int64)
        parts, lengths, i = [], np.zeros(len(texts), dtype=np.int64), 0
        for d, count in enumerate(counts):
            ids = encoded[i : i + count]
            i += count
            n = sum(int(a.size) for a in ids)
            before, _, final = texts[d]
            parts.extend(ids)
            # EOS ends a document with ids; a document in pieces has them (it is not blank)
            eos_here = final and (n > 0 or bool(before))
            if eos_here:
                parts.append(eos)
            lengths[d] = n + eos_here
        flat = np.concatenate(parts).astype(self.dtype) if parts else np.zeros(0, dtype=self.dtype)
        return lengths, flat

    def drop_head(self, ids: np.ndarray, before: str) -> np.ndarray:
        """The ids of a continuation piece encoded after `before` (with the dummy prefix)."""
        if not before:
            return ids
        head = self.head(before)
        if not np.array_equal(ids[: head.size], head):
            raise RuntimeError(f"the ids of {before!r} before a cut are not {head.tolist()}: not a safe cut")
        return ids[head.size :]


def _init_worker(tokenizer: str, sha256: str, dtype: str, chunk_chars: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers: the processes are the parallelism
    tok = load_tokenizer(tokenizer)
    if tok.sha256 != sha256:
        raise RuntimeError(f"tokenizer {tokenizer} changed while `dlm prepare` was running")
    _WORKER["encoder"] = _Encoder(tok, dtype, chunk_chars)


def _encode_in_worker(texts: list[tuple[str, str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER["encoder"].encode(texts)


# -- packing -----------------------------------------------------------------------------------------------
@dataclass
class _Split:
    name: str
    seq_len: int
    samples_per_shard: int
    dtype: str
    eos_id: int
    out: Path
    shards: list[dict] = field(default_factory=list)
    samples: int = 0  # samples in completed shards
    tokens: int = 0
    documents: int = 0
    ready: list[np.ndarray] = field(default_factory=list)  # [n, seq_len] blocks not yet in a shard
    ready_rows: int = 0
    pending: list[np.ndarray] = field(default_factory=list)  # < seq_len tokens after `ready`
    pending_len: int = 0

    def add(
        self, tokens: np.ndarray, lengths: np.ndarray | None = None, finals: np.ndarray | None = None
    ) -> int:
        """Append tokens to the stream (documents or pieces of one, `lengths` ids each, the
        last piece `final`: not needed to pack); write every full shard; returns shards written."""
        if tokens.size == 0:
            return 0
        self.pending.append(tokens)
        self.pending_len += int(tokens.size)
        if self.pending_len < self.seq_len:
            return 0
        stream = np.concatenate(self.pending)
        rows = stream.size // self.seq_len
        self.ready.append(stream[: rows * self.seq_len].reshape(rows, self.seq_len))
        self.ready_rows += rows
        rest = stream[rows * self.seq_len :]
        self.pending, self.pending_len = ([rest] if rest.size else []), int(rest.size)
        written = 0
        while self.ready_rows >= self.samples_per_shard:
            block = np.concatenate(self.ready) if len(self.ready) > 1 else self.ready[0]
            self._write(block[: self.samples_per_shard])
            rest = block[self.samples_per_shard :]
            self.ready, self.ready_rows = ([rest] if len(rest) else []), len(rest)
            written += 1
        return written

    def _write(self, block: np.ndarray) -> None:
        name = shard_name(self.name, len(self.shards))
        samples = [(row, segment_ids(row, self.eos_id)) for row in block]
        entry = write_shard(self.out / name, samples, self.samples, self.dtype)
        self.shards.append(entry)
        self.samples += entry["samples"]
        self.tokens += entry["tokens"]
        if _FAULT:
            _FAULT("shard_written")

    def finish(self) -> np.ndarray:
        """Write the last (short) shard; returns the tail shorter than seq_len (not in a shard)."""
        if self.ready_rows:
            self._write(np.concatenate(self.ready))
            self.ready, self.ready_rows = [], 0
        tail = np.concatenate(self.pending).astype(self.dtype) if self.pending else np.zeros(0, self.dtype)
        self.pending, self.pending_len = [], 0
        return tail

    def carry(self) -> np.ndarray:
        parts = [b.reshape(-1) for b in self.ready] + self.pending
        return np.concatenate(parts).astype(self.dtype) if parts else np.zeros(0, dtype=self.dtype)

    def summary(self) -> dict:
        return {
            "shards": self.shards,
            "samples": self.samples,
            "tokens": self.tokens,
            "documents": self.documents,
        }


@dataclass
class _IndexedSplit:
    """format=megatron: the split's documents, one item each, into `<out>/<name>.bin/.idx`
    (parallel/datasets.IndexedWriter, megatron-core's builder, renamed into place when
    finished). megatron-core cuts them into samples at training time: nothing is packed or
    dropped here. Nothing is resumable mid-file: an interrupted run starts the file again."""

    name: str
    vocab_size: int
    dtype: str
    out: Path
    shards: list[dict] = field(default_factory=list)  # none (the state file's shape)
    samples: int = 0
    tokens: int = 0
    documents: int = 0
    bin_bytes: int = 0
    writer: object = None

    def _writer(self):
        if self.writer is None:
            from parallel.datasets import IndexedWriter

            self.writer = IndexedWriter(self.out / self.name, self.vocab_size)
        return self.writer

    def add(
        self, tokens: np.ndarray, lengths: np.ndarray | None = None, finals: np.ndarray | None = None
    ) -> int:
        """Documents, or pieces of one (a document ends with its final piece)."""
        writer, start = self._writer(), 0
        for length, final in zip(lengths.tolist(), finals.tolist(), strict=True):
            if length:
                writer.add_piece(tokens[start : start + length])
            if final and writer.pending:
                writer.end_document()
            start += length
        self.tokens += int(tokens.size)
        return 0

    def finish(self) -> np.ndarray:
        self._writer().finish()
        self.bin_bytes = (self.out / f"{self.name}.bin").stat().st_size
        return np.zeros(0, dtype=self.dtype)

    def append(self, prefix: Path, summary: dict) -> None:
        """Every document of a part's complete prefix (the merge); summary: its manifest entry."""
        self._writer().append(prefix, summary["documents"], summary["tokens"])
        self.documents += summary["documents"]
        self.tokens += summary["tokens"]

    def carry(self) -> np.ndarray:
        return np.zeros(0, dtype=self.dtype)

    def summary(self) -> dict:
        counts = {"documents": self.documents, "tokens": self.tokens}
        return {"prefix": self.name, "bin_bytes": self.bin_bytes, **counts, "shards": [], "samples": 0}


def _splits(cfg: PrepareConfig, vocab_size: int, dtype: str, eos_id: int, out: Path) -> dict:
    """The writers of the train and eval splits, of cfg.format."""
    if cfg.format == "megatron":
        return {s: _IndexedSplit(s, vocab_size, dtype, out) for s in SPLITS}
    return {s: _Split(s, cfg.seq_len, cfg.samples_per_shard, dtype, eos_id, out) for s in SPLITS}


# -- files -------------------------------------------------------------------------------------------------
def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


@dataclass(frozen=True)
class _Input:
    argument: int  # index into cfg.input
    path: Path
    size: int
    mtime_ns: int


def _resolve(cfg: PrepareConfig) -> tuple[list[_Input], dict]:
    """The input files, each once (a file reached again through another glob, directory or
    argument is read once), and the duplicates' record for the manifest."""
    files, duplicates = [], []
    for a, path in resolve_arguments(cfg.input, duplicates):
        st = os.stat(path) if path.exists() else os.lstat(path)  # a dangling link is read as unreadable
        files.append(_Input(a, path, st.st_size, st.st_mtime_ns))
    return files, {"count": len(duplicates), "examples": [str(d) for d in duplicates[:MAX_EXAMPLES]]}


def _partition_scope(cfg: PrepareConfig, partition: int | None) -> dict:
    """The partition keys of a configuration: partitions and partition for a part; none for
    a whole dataset, merged or not (it is the same dataset whatever the partitioning)."""
    if partition is None:
        return {}
    return {"partitions": cfg.partitions, "partition": partition}


def _configuration(
    cfg: PrepareConfig, tok: Tokenizer | HFTokenizer, files: list[_Input], partition: int | None = None
) -> tuple[dict, str]:
    """(manifest config, config_hash) of the dataset of `files`: the whole input, or part
    `partition` of cfg.partitions."""
    listing = [[os.path.abspath(f.path), f.size, f.mtime_ns] for f in files]
    inputs_sha = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    scope = _partition_scope(cfg, partition)
    # format=shards adds no key: the hashes of datasets prepared before `format` existed hold
    scope_format = {} if cfg.format == "shards" else {"output_format": cfg.format}
    config = {
        "input": list(cfg.input),
        "tokenizer": str(cfg.tokenizer),
        "on_error": cfg.on_error,
        **{key: getattr(cfg, key) for key in HASHED},
        **scope,
        **scope_format,
        "tokenizer_sha256": tok.sha256,
        "inputs_sha256": inputs_sha,
        "input_files": len(files),
    }
    hashed = {
        "format": FORMAT,
        "version": PREPARE_VERSION,
        **{key: config[key] for key in (*HASHED, "tokenizer_sha256", "inputs_sha256")},
        **scope,
        **scope_format,
    }
    return config, hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> str:
    changed = []
    for key in ("partitions", "partition", "output_format"):
        default = {"partitions": 1, "output_format": "shards"}.get(key)
        if old.get(key, default) != new.get(key, default):
            changed.append(f"{key} {old.get(key, default)!r} -> {new.get(key, default)!r}")
    for key in (*HASHED, "tokenizer_sha256", "inputs_sha256"):
        if old.get(key) != new.get(key):
            if key == "inputs_sha256":
                changed.append(
                    f"the input files (names, sizes or mtimes; {old.get('input_files')} -> "
                    f"{new.get('input_files')} files)"
                )
            elif key == "tokenizer_sha256":
                changed.append(f"the tokenizer (sha256 {str(old.get(key))[:12]} -> {new[key][:12]})")
            else:
                changed.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    return "; ".join(changed) or "code version"


def _refuse(out: Path, what: str, old_config: dict | None, config: dict) -> PrepareError:
    why = _differences(old_config, config) if isinstance(old_config, dict) else "unknown configuration"
    return PrepareError(
        f"output directory {out} already holds {what} prepared with a different configuration ({why}): "
        f"choose another output= or delete {out} first"
    )


def _remove_leftovers(out: Path, keep_carry: str | None = None) -> None:
    for p in out.iterdir():
        if _TMP.match(p.name) or (_CARRY.match(p.name) and p.name != keep_carry):
            p.unlink()


def manifest_format(cfg: PrepareConfig) -> str:
    if cfg.format == "megatron":
        from parallel.datasets import FORMAT as MEGATRON_FORMAT

        return MEGATRON_FORMAT
    return FORMAT


def _complete(out: Path, manifest: dict) -> str | None:
    """None if every shard (megatron: .bin/.idx) of the manifest is present with its size,
    else what is wrong."""
    for split in manifest.get("splits", {}).values():
        if "prefix" in split:
            data, index = out / f"{split['prefix']}.bin", out / f"{split['prefix']}.idx"
            if not index.is_file() or not data.is_file() or data.stat().st_size != split["bin_bytes"]:
                return f"{data} or {index} is missing or has the wrong size"
        for shard in split.get("shards", []):
            path = out / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                return f"{path} is missing or has the wrong size"
    return None


def _config_in(path: Path) -> dict | None:
    """The `config` recorded in a manifest or state file."""
    return _read_json(path).get("config")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PrepareError(f"{path} is unreadable ({e}): delete {path.parent} and run again") from e


class _Accounts:
    """The input accounting, folded file by file as the readers finish (so that it stays
    small for millions of files): totals, the first skipped examples, and `inputs` entries
    per file or, with by_argument, per input argument."""

    def __init__(self, arguments: list[str], by_argument: bool):
        self.arguments = list(arguments)
        self.by_argument = by_argument
        self.read = self.yielded = self.bytes_read = 0
        self.skipped: dict[str, int] = {}
        self.examples: list[str] = []
        self.entries: list[dict] = []
        self.entry_of: list[int] = []  # entry index of every file added
        self.by_arg: dict[int, int] = {}

    def add(self, item: _Input, stats) -> None:
        self.read += stats.documents_read
        self.yielded += stats.documents_yielded
        self.bytes_read += stats.bytes_read
        for reason, n in stats.documents_skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.examples.extend(stats.skipped_examples[: MAX_EXAMPLES - len(self.examples)])
        entry = {
            "path": str(item.path),
            "size": item.size,
            "bytes": stats.bytes_read,
            "documents_read": stats.documents_read,
            "documents_written": stats.documents_yielded,
            "documents_skipped": dict(stats.documents_skipped),
        }
        if not self.by_argument:
            self.entry_of.append(len(self.entries))
            self.entries.append(entry)
            return
        if item.argument not in self.by_arg:
            self.by_arg[item.argument] = len(self.entries)
            self.entries.append(
                {"input": self.arguments[item.argument], "files": 0, "size": 0, "bytes": 0}
                | {"documents_read": 0, "documents_written": 0, "documents_skipped": {}}
            )
        self.entry_of.append(self.by_arg[item.argument])
        agg = self.entries[self.by_arg[item.argument]]
        agg["files"] += 1
        for key in ("size", "bytes", "documents_read", "documents_written"):
            agg[key] += entry[key]
        for reason, n in entry["documents_skipped"].items():
            agg["documents_skipped"][reason] = agg["documents_skipped"].get(reason, 0) + n

    def close(self, no_tokens: dict) -> dict:
        """The manifest's accounting fields; documents that gave no ids move from written
        to skipped[no_tokens] (in their file's entry too)."""
        for index, n in no_tokens["per_file"].items():
            entry = self.entries[self.entry_of[int(index)]]
            entry["documents_written"] -= n
            entry["documents_skipped"][NO_TOKENS] = entry["documents_skipped"].get(NO_TOKENS, 0) + n
        for entry in self.entries:
            entry["documents_skipped"] = dict(sorted(entry["documents_skipped"].items()))
        skipped = dict(self.skipped)
        if no_tokens["count"]:
            skipped[NO_TOKENS] = no_tokens["count"]
        return {
            "documents_read": self.read,
            "documents_written": self.yielded - no_tokens["count"],
            "documents_skipped": dict(sorted(skipped.items())),
            "skipped_examples": (self.examples + no_tokens["examples"])[:MAX_EXAMPLES],
            "bytes_read": self.bytes_read,
            "inputs_by": "input" if self.by_argument else "file",
            "inputs": self.entries,
        }


# -- the command -------------------------------------------------------------------------------------------
class _Run:
    """Prepares one dataset: the whole input into cfg.output, or, with `partition`, part
    `partition` of cfg.partitions (`files` being its share) into `out`."""

    def __init__(
        self,
        cfg: PrepareConfig,
        tok: Tokenizer | HFTokenizer,
        files: list[_Input],
        out: Path,
        *,
        by_argument: bool,
        partition: int | None = None,
        first_file: int = 0,
        duplicates: dict | None = None,
        start: float | None = None,
    ):
        self.cfg = cfg
        self.start = time.perf_counter() if start is None else start
        self.out = out
        self.tok = tok
        self.dtype = token_dtype(self.tok.vocab_size)
        self.encoder = _Encoder(self.tok, self.dtype, cfg.chunk_chars)
        self.files = files
        self.duplicates = duplicates  # input paths read once though reached twice (whole datasets only)
        self.partition = partition
        self.first_file = first_file  # the number of files[0] in the whole resolved list (is_eval)
        self.config, self.config_hash = _configuration(cfg, self.tok, self.files, partition)
        self.splits = _splits(cfg, self.tok.vocab_size, self.dtype, self.tok.eos_id, self.out)
        self.consumed = 0  # documents_consumed of the state
        self.resumed_from = 0
        self.generation = 0
        self.carry_file: str | None = None
        self.no_tokens = {"count": 0, "per_file": {}, "examples": []}
        self.accounts = _Accounts(cfg.input, by_argument=by_argument)
        self.tokens_this_run = 0

    # state ------------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        self.generation += 1
        carries = {s: self.splits[s].carry() for s in SPLITS}
        data = b"".join(carries[s].astype(np.dtype(self.dtype).newbyteorder("<")).tobytes() for s in SPLITS)
        name = f"prepare.state.{self.generation:06d}.bin"
        write_atomic(self.out / name, data)
        state = {
            "format": STATE_FORMAT,
            "config_hash": self.config_hash,
            "config": self.config,
            "generation": self.generation,
            "documents_consumed": self.consumed,
            "dtype": self.dtype,
            "carry": {
                "file": name,
                "sha256": hashlib.sha256(data).hexdigest(),
                **{s: int(carries[s].size) for s in SPLITS},
            },
            "splits": {s: self.splits[s].summary() for s in SPLITS},
            "no_tokens": self.no_tokens,
        }
        write_atomic(self.out / STATE, _json_bytes(state))
        if self.carry_file and self.carry_file != name:
            (self.out / self.carry_file).unlink(missing_ok=True)
        self.carry_file = name
        if _FAULT:
            _FAULT("state_saved")

    def load_state(self, state: dict) -> None:
        carry = state["carry"]
        path = self.out / carry["file"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PrepareError(f"{path} (named by {STATE}) is unreadable ({e}): delete {self.out}") from e
        if hashlib.sha256(data).hexdigest() != carry["sha256"]:
            raise PrepareError(f"{path} does not match {self.out / STATE}: delete {self.out} and run again")
        tokens = np.frombuffer(data, dtype=np.dtype(self.dtype).newbyteorder("<")).astype(self.dtype)
        offset = 0
        for s in SPLITS:
            split, saved = self.splits[s], state["splits"][s]
            split.shards, split.samples = list(saved["shards"]), saved["samples"]
            split.tokens, split.documents = saved["tokens"], saved["documents"]
            split.add(tokens[offset : offset + carry[s]].copy())  # < one shard: writes nothing
            offset += carry[s]
        self.consumed = self.resumed_from = state["documents_consumed"]
        self.generation = state["generation"]
        self.carry_file = carry["file"]
        self.no_tokens = state["no_tokens"]

    def prepare_output(self) -> dict | None:
        """The finished manifest when up to date; else set up a fresh or resumed run."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise PrepareError(f"output {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        manifest_path, state_path = out / MANIFEST, out / STATE
        redo = False
        if manifest_path.exists():
            manifest = _read_json(manifest_path)
            if manifest.get("config_hash") != self.config_hash:
                raise _refuse(out, "a dataset", manifest.get("config"), self.config)
            problem = _complete(out, manifest)
            if problem is None:
                state_path.unlink(missing_ok=True)  # a run killed after writing its manifest
                _remove_leftovers(out)
                return manifest
            print(f"dlm prepare: {problem}: preparing {out} again")
            redo = True
        if not redo and (out / MERGE_STATE).exists():
            merging = _read_json(out / MERGE_STATE)
            if merging.get("config_hash") != self.config_hash:
                raise _refuse(out, f"an unfinished merge ({MERGE_STATE})", merging.get("config"), self.config)
            raise PrepareError(
                f"{out} holds an unfinished merge of this dataset ({MERGE_STATE}): finish it with "
                f"`dlm prepare ... partitions={merging.get('partitions')}`, or delete {out} first"
            )
        if state_path.exists() and not redo:
            state = _read_json(state_path)
            if state.get("config_hash") != self.config_hash or state.get("format") != STATE_FORMAT:
                raise _refuse(out, "an unfinished run (prepare.state.json)", state.get("config"), self.config)
            _remove_leftovers(out, keep_carry=state["carry"]["file"])
            self.load_state(state)
            done = sum(len(s.shards) for s in self.splits.values())
            print(f"dlm prepare: resuming {out}: {self.consumed:,} documents and {done} shards already done")
            return None
        if not redo and any(_SHARD.match(p.name) or _CARRY.match(p.name) for p in out.iterdir()):
            raise PrepareError(
                f"output directory {out} holds shards but no manifest.json or prepare.state.json "
                f"(an unknown or foreign run): choose another output= or delete {out} first"
            )
        _remove_leftovers(out)
        self.save_state()  # from here on, the directory is resumable
        if redo:
            manifest_path.unlink()
        return None

    # main loop --------------------------------------------------------------------------------------------
    def handle(self, batch: list[tuple], lengths: np.ndarray, flat: np.ndarray) -> None:
        """Pack one tokenized batch [(ordinal, file index, where, document number in its file,
        final)] (file index within self.files; final: the last piece of a document read in
        pieces, True for the others); save the state if a shard was completed."""
        cfg = self.cfg
        finals = np.array([item[4] for item in batch], dtype=bool)
        if not lengths.all():
            for (_, file_index, where, _, final), n in zip(batch, lengths, strict=True):
                if n == 0 and final:
                    nt = self.no_tokens
                    nt["count"] += 1
                    nt["per_file"][str(file_index)] = nt["per_file"].get(str(file_index), 0) + 1
                    if len(nt["examples"]) < MAX_EXAMPLES:
                        nt["examples"].append(f"{where}: {NO_TOKENS} (the tokenizer produced no ids)")
        self.tokens_this_run += int(flat.size)
        written = 0
        if cfg.eval_fraction > 0:
            seed, first, fraction = cfg.seed, self.first_file, cfg.eval_fraction
            held = np.array([is_eval(seed, first + f, d, fraction) for _, f, _, d, _ in batch], dtype=bool)
            per_token = np.repeat(held, lengths)
            ended = finals & (lengths > 0)  # a document with ids ends here
            for name, docs, keep in (
                ("train", (~held & ended).sum(), ~held),
                ("eval", (held & ended).sum(), held),
            ):
                self.splits[name].documents += int(docs)
                tokens = flat[per_token] if name == "eval" else flat[~per_token]
                written += self.splits[name].add(tokens, lengths[keep], finals[keep])
        else:
            self.splits["train"].documents += int((finals & (lengths > 0)).sum())
            written += self.splits["train"].add(flat, lengths, finals)
        self.consumed = batch[-1][0] + 1
        if written:
            self.save_state()

    def execute(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        pool = None
        if cfg.workers > 1:
            # fork: the workers start in ~0.1 s (spawn re-imports the parent's modules, ~2 s);
            # created before the progress bar starts its monitor thread.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            pool = ctx.Pool(
                cfg.workers,
                initializer=_init_worker,
                initargs=(str(cfg.tokenizer), self.tok.sha256, self.dtype, cfg.chunk_chars),
            )
        inflight: deque = deque()
        bar = tqdm(
            desc="dlm prepare",
            unit=" docs",
            disable=None if cfg.progress else True,
            mininterval=0.5,
            smoothing=0.1,
        )
        tokenize_start = time.perf_counter()

        def collect() -> None:
            batch, result = inflight.popleft()
            lengths, flat = result.get() if pool else result
            self.handle(batch, lengths, flat)
            bar.update(len(batch))
            rate = self.tokens_this_run / max(time.perf_counter() - tokenize_start, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s, {self.tokens_this_run:,} tokens", refresh=False)

        def submit(batch: list[tuple[int, int, str]], texts: list[str]) -> None:
            if pool:
                inflight.append((batch, pool.apply_async(_encode_in_worker, (texts,))))
                if len(inflight) > 2 * cfg.workers:
                    collect()
            else:
                inflight.append((batch, self.encoder.encode(texts)))
                collect()

        try:
            ordinal, batch, texts, chars = 0, [], [], 0
            for index, item in enumerate(self.files):
                name = str(item.path)
                reader = DocumentReader(
                    ["./" + name if name in EMBEDDED else name],
                    jsonl_field=cfg.jsonl_field,
                    on_error=cfg.on_error,
                    filter_field=cfg.filter_field,
                    filter_min=cfg.filter_min,
                    filter_max=cfg.filter_max,
                    pieces=self.text_pieces(),
                )
                number = 0  # the next document's number in its file (a document's pieces share it)
                for doc in reader:
                    document, number = number, number + doc.final
                    ordinal += 1
                    if ordinal <= self.resumed_from:  # consumed before the interruption: count, skip
                        bar.update(1)
                        continue
                    batch.append((ordinal - 1, index, doc.where, document, doc.final))
                    texts.append((doc.before, doc.text, doc.final))
                    chars += len(doc.text)
                    if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                        submit(batch, texts)
                        batch, texts, chars = [], [], 0
                self.accounts.add(item, reader.stats)
            if batch:
                submit(batch, texts)
            while inflight:
                collect()
        finally:
            bar.close()
            if pool:
                pool.terminate()
                pool.join()
        if self.consumed < ordinal:  # resumed after the last document: nothing new was tokenized
            self.consumed = ordinal
        return self.finish()

    def text_pieces(self) -> TextPieces | None:
        """Whole-file documents above TEXT_PIECE_BYTES are read in pieces where the
        tokenizer's cuts keep the ids (data.sources.TextPieces); without cuts, whole."""
        cuts = self.tok.cuts
        return None if cuts is None else TextPieces(TEXT_PIECE_BYTES, cuts.allows, cuts.max_chars)

    def finish(self) -> dict:
        cfg = self.cfg
        tails = {s: self.splits[s].finish() for s in SPLITS}
        dropped = sum(int(tail.size) for tail in tails.values())
        acc = self.accounts.close(self.no_tokens)
        read, written, skipped = acc["documents_read"], acc["documents_written"], acc["documents_skipped"]
        split_documents = sum(s.documents for s in self.splits.values())
        if read != written + sum(skipped.values()) or written != split_documents:
            raise RuntimeError(f"document accounting does not reconcile ({read=}, {written=}, {skipped})")
        samples = sum(s.samples for s in self.splits.values())
        manifest = {
            "format": manifest_format(cfg),
            "seq_len": cfg.seq_len,
            "dtype": self.dtype,
            "tokenizer": self.tok.describe(),
            "splits": {s: self.splits[s].summary() for s in SPLITS},
            "documents_read": read,
            "documents_written": written,
            "documents_skipped": skipped,
            "skipped_examples": acc["skipped_examples"],
            "tokens": sum(s.tokens for s in self.splits.values()),
            "samples": samples,
            "tokens_dropped": dropped,
            "bytes_read": acc["bytes_read"],
            "inputs_by": acc["inputs_by"],
            "inputs": acc["inputs"],
            **({"duplicate_inputs": self.duplicates} if self.duplicates is not None else {}),
            "config": self.config,
            "config_hash": self.config_hash,
        }
        if self.partition is not None:  # what the merge needs to pack exactly as one run
            manifest["tail"] = self.write_tail(tails)
            manifest["examples"] = {"reader": self.accounts.examples, NO_TOKENS: self.no_tokens["examples"]}
        write_atomic(self.out / MANIFEST, _json_bytes(manifest))
        if _FAULT:
            _FAULT("manifest_written")
        (self.out / STATE).unlink(missing_ok=True)
        _remove_leftovers(self.out)
        self.report(manifest)
        return manifest

    def write_tail(self, tails: dict[str, np.ndarray]) -> dict:
        """A part's tails (< seq_len tokens per split) in TAIL: the merge continues the
        stream with the next part's tokens, so no tail is dropped between parts."""
        little = np.dtype(self.dtype).newbyteorder("<")
        data = b"".join(tails[s].astype(little).tobytes() for s in SPLITS)
        write_atomic(self.out / TAIL, data)
        return {
            "file": TAIL,
            "sha256": hashlib.sha256(data).hexdigest(),
            **{s: int(tails[s].size) for s in SPLITS},
        }

    def report(self, m: dict) -> None:
        seconds = time.perf_counter() - self.start
        rate = self.tokens_this_run / max(seconds, 1e-9)
        print(
            f"dlm prepare: {m['documents_written']:,} documents -> {m['tokens']:,} tokens in "
            f"{written_as(m)} in {seconds:.1f} s ({rate / 1e6:.2f}M tokens/s, {self.cfg.workers} workers) "
            f"-> {self.out}"
        )
        skipped = sum(m["documents_skipped"].values())
        print(
            f"  read {m['documents_read']:,} documents ({m['bytes_read'] / 1e6:.1f} MB), skipped {skipped:,}"
            + (f": {m['documents_skipped']}" if skipped else "")
            + f"; dropped the last {m['tokens_dropped']:,} tokens (tails shorter than seq_len)"
        )
        if not m["splits"]["train"]["samples"] and m["format"] == FORMAT:
            print(f"  warning: the train split is empty: its documents hold < seq_len={m['seq_len']} tokens")
        for example in m["skipped_examples"][:PRINT_EXAMPLES]:
            print(f"  skipped {example}")
        if skipped > PRINT_EXAMPLES:
            print(f"  ... {skipped - PRINT_EXAMPLES:,} more skipped (first {MAX_EXAMPLES} in {MANIFEST})")
        _report_duplicates(m)


# -- partitions and merging --------------------------------------------------------------------------------
def partition_files(files: list[_Input], count: int) -> list[list[_Input]]:
    """`count` contiguous runs of `files` balanced by on-disk size (a file weighs its size + 1,
    so that empty files count too), every run holding at least one file."""
    if count > len(files):
        raise PrepareError(
            f"partitions={count} but the input resolves to {len(files)} files: every partition needs "
            f"at least one file (choose partitions <= {len(files)})"
        )
    cumulative = list(itertools.accumulate(f.size + 1 for f in files))  # weight of files[: k + 1]
    bounds = [0]
    for k in range(1, count):
        cut = _balanced_cut(cumulative, cumulative[-1] * k / count)
        bounds.append(min(max(cut, bounds[-1] + 1), len(files) - (count - k)))
    bounds.append(len(files))
    return [files[a:b] for a, b in itertools.pairwise(bounds)]


def _balanced_cut(cumulative: list[int], target: float) -> int:
    """The number of leading files whose weight is closest to `target` (the fewer when tied)."""
    cut = bisect.bisect_left(cumulative, target) + 1  # the fewest files weighing >= target
    if cut > 1 and target - cumulative[cut - 2] <= cumulative[cut - 1] - target:
        return cut - 1
    return cut


def _manifest_in(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return _read_json(path) if path.is_file() else None


class _Partitioned:
    """partitions > 1: prepares part cfg.partition alone (an array task), or every part that
    is not complete and then the merge into cfg.output."""

    def __init__(
        self,
        cfg: PrepareConfig,
        tok: Tokenizer | HFTokenizer,
        files: list[_Input],
        duplicates: dict,
        start: float,
    ):
        self.cfg, self.tok, self.start, self.duplicates = cfg, tok, start, duplicates
        self.out = Path(cfg.output)
        if self.out.exists() and not self.out.is_dir():
            raise PrepareError(f"output {self.out} exists and is not a directory")
        self.parts = partition_files(files, cfg.partitions)
        self.by_argument = len(files) > MAX_INPUT_ENTRIES  # from the total: the parts and the merge agree
        self.config, self.config_hash = _configuration(cfg, tok, files)

    def part_dir(self, index: int) -> Path:
        return self.out / PARTS / f"{index:05d}"

    def part_run(self, index: int, start: float | None = None) -> _Run:
        files, out = self.parts[index], self.part_dir(index)
        first_file = sum(len(part) for part in self.parts[:index])
        return _Run(
            self.cfg,
            self.tok,
            files,
            out,
            by_argument=self.by_argument,
            partition=index,
            first_file=first_file,
            start=start,
        )

    def run(self) -> dict:
        merged = self.merged()
        if merged is not None:
            return merged
        if self.cfg.partition is not None:
            return _prepare(self.part_run(self.cfg.partition, self.start))
        merge = _Merge(self)
        merge.check_output()  # before hours of preparing parts
        self.refuse_foreign_parts()
        for index in range(self.cfg.partitions):
            self.ensure_part(index)
        return merge.run([self.verified_part(index) for index in range(self.cfg.partitions)])

    def merged(self) -> dict | None:
        """The merged manifest if it is complete for this configuration (saying 'up to date');
        an error if it is another configuration's."""
        manifest = _manifest_in(self.out)
        if manifest is None:
            return None
        if manifest.get("config_hash") != self.config_hash:
            raise _refuse(self.out, "a dataset", manifest.get("config"), self.config)
        if _complete(self.out, manifest) is not None:
            return None
        (self.out / MERGE_STATE).unlink(missing_ok=True)  # a merge killed after writing its manifest
        task = "" if self.cfg.partition is None else f" for partition={self.cfg.partition}"
        print(
            f"dlm prepare: {self.out} is up to date ({manifest['tokens']:,} tokens, config "
            f"{self.config_hash[:12]}); nothing to do{task}"
        )
        return manifest

    def part_configuration(self, index: int) -> tuple[dict, str]:
        return _configuration(self.cfg, self.tok, self.parts[index], index)

    def refuse_foreign_parts(self) -> None:
        """An error naming the first part prepared with another configuration."""
        for index in range(self.cfg.partitions):
            manifest = _manifest_in(self.part_dir(index))
            config, config_hash = self.part_configuration(index)
            if manifest is not None and manifest.get("config_hash") != config_hash:
                raise self.foreign_part(index, manifest, config)

    def ensure_part(self, index: int) -> None:
        """Prepare part `index` in this process unless it is complete."""
        prep = self.part_run(index)
        manifest = _manifest_in(prep.out)
        if manifest is not None and manifest.get("config_hash") == prep.config_hash:  # (others: refused)
            if _complete(prep.out, manifest) is None:
                return
        print(
            f"dlm prepare: partition {index} of {self.cfg.partitions} ({len(prep.files)} files) is not "
            f"prepared: preparing it in this process -> {prep.out}"
        )
        _prepare(prep)

    def verified_part(self, index: int) -> dict:
        """The manifest of part `index`, checked against this configuration."""
        part = self.part_dir(index)
        manifest = _manifest_in(part)
        if manifest is None or _complete(part, manifest) is not None:
            raise PrepareError(f"part {part} is missing or incomplete: {self.to_run(index)}")
        config, config_hash = self.part_configuration(index)
        if manifest.get("config_hash") != config_hash:
            raise self.foreign_part(index, manifest, config)
        expected = {
            "tokenizer sha256": (manifest["tokenizer"]["sha256"], self.tok.sha256),
            "seq_len": (manifest["seq_len"], self.cfg.seq_len),
            "dtype": (manifest["dtype"], token_dtype(self.tok.vocab_size)),
            "inputs_by": (manifest["inputs_by"], "input" if self.by_argument else "file"),
            "tail": ("tail" in manifest and (part / manifest["tail"]["file"]).is_file(), True),
        }
        for key, (found, wanted) in expected.items():
            if found != wanted:
                raise PrepareError(f"part {part} has {key} {found!r}, not {wanted!r}: {self.to_run(index)}")
        return manifest

    def foreign_part(self, index: int, manifest: dict, config: dict) -> PrepareError:
        old = manifest.get("config")
        why = _differences(old, config) if isinstance(old, dict) else "unknown configuration"
        return PrepareError(
            f"part {self.part_dir(index)} was prepared with a different configuration ({why}): "
            f"delete it, then {self.to_run(index)}"
        )

    def to_run(self, index: int) -> str:
        n = self.cfg.partitions
        return (
            f"run `dlm prepare ... partitions={n} partition={index}` "
            f"(or the merge, `dlm prepare ... partitions={n}`, which prepares missing parts)"
        )


class _Merge:
    """Merges the complete parts of a _Partitioned into its output directory, restartably."""

    def __init__(self, plan: _Partitioned):
        self.plan = plan
        self.out = plan.out
        self.stale: str | None = None  # why a manifest of this configuration is merged again
        self.eos_id = plan.tok.eos_id
        self.tails: list[dict[str, np.ndarray]] = []  # per part: its tail tokens per split

    def check_output(self) -> None:
        """Refuse a directory holding another configuration's merge state, run or shards."""
        out, config = self.out, self.plan.config
        if not out.is_dir():
            return
        manifest = _manifest_in(out)  # if any: this configuration's (plan.merged()), incomplete
        if manifest is not None:
            self.stale = _complete(out, manifest)
        if (out / MERGE_STATE).exists():
            state = _read_json(out / MERGE_STATE)
            if state.get("format") != MERGE_STATE_FORMAT or state.get("config_hash") != self.plan.config_hash:
                raise _refuse(out, f"an unfinished merge ({MERGE_STATE})", state.get("config"), config)
        elif (out / STATE).exists():
            raise _refuse(out, f"an unfinished run ({STATE})", _config_in(out / STATE), config)
        elif manifest is None and any(_SHARD.match(p.name) for p in out.iterdir()):
            raise PrepareError(
                f"output directory {out} holds shards but no manifest.json or {MERGE_STATE} "
                f"(an unknown or foreign run): choose another output= or delete {out} first"
            )

    def begin(self) -> None:
        """The state file first: from here on, the directory is this merge's."""
        out, state = self.out, self.out / MERGE_STATE
        _remove_leftovers(out)
        if state.exists():
            print(f"dlm prepare: resuming the merge into {out}")
        else:
            record = {
                "format": MERGE_STATE_FORMAT,
                "config_hash": self.plan.config_hash,
                "config": self.plan.config,
                "partitions": self.plan.cfg.partitions,
            }
            write_atomic(state, _json_bytes(record))
        if self.stale:
            print(f"dlm prepare: {self.stale}: merging {out} again")
            (out / MANIFEST).unlink()

    def run(self, parts: list[dict]) -> dict:
        self.begin()
        self.read_tails(parts)
        merged = {split: self.merge_split(split, parts) for split in SPLITS}
        splits = {split: summary for split, (summary, _) in merged.items()}
        manifest = self.manifest(parts, splits, sum(dropped for _, dropped in merged.values()))
        write_atomic(self.out / MANIFEST, _json_bytes(manifest))
        if _FAULT:
            _FAULT("merge_manifest_written")
        (self.out / MERGE_STATE).unlink(missing_ok=True)
        self.report(manifest, len(parts))
        return manifest

    def merge_split(self, split: str, parts: list[dict]) -> tuple[dict, int]:
        """The split's token stream, part after part (its samples, then its tail), packed
        again exactly as one run packs it: (the split's summary, tokens dropped at its end)."""
        first = parts[0]
        packer = _splits(self.plan.cfg, self.plan.tok.vocab_size, first["dtype"], self.eos_id, self.out)[
            split
        ]
        if isinstance(packer, _IndexedSplit):  # whole documents: the parts' files one after another
            for index, part in enumerate(parts):
                packer.append(self.plan.part_dir(index) / split, part["splits"][split])
            packer.finish()
            return packer.summary(), 0
        for index, part in enumerate(parts):
            for tokens in self.part_stream(index, part, split):
                packer.add(tokens)
            packer.documents += part["splits"][split]["documents"]
        dropped = int(packer.finish().size)  # writes the last, short shard
        return packer.summary(), dropped

    def part_stream(self, index: int, part: dict, split: str) -> Iterator[np.ndarray]:
        """The tokens of one part's split in order: shard by shard, then the tail."""
        source = ShardLocation(str(self.plan.part_dir(index)))
        for entry in part["splits"][split]["shards"]:
            rows = read_shard(source, entry["name"], seq_len=part["seq_len"], dtype=part["dtype"])
            yield np.concatenate([tokens for _, tokens, _ in rows]).astype(part["dtype"])
        yield self.tails[index][split]

    def read_tails(self, parts: list[dict]) -> None:
        """Every part's tail tokens per split, checked against its manifest."""
        for index, part in enumerate(parts):
            tail, path = part["tail"], self.plan.part_dir(index) / part["tail"]["file"]
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != tail["sha256"]:
                raise PrepareError(f"{path} does not match its manifest: {self.plan.to_run(index)}")
            tokens = np.frombuffer(data, dtype=np.dtype(part["dtype"]).newbyteorder("<")).astype(
                part["dtype"]
            )
            cut = tail["train"]
            self.tails.append({"train": tokens[:cut], "eval": tokens[cut : cut + tail["eval"]]})

    def manifest(self, parts: list[dict], splits: dict, dropped: int) -> dict:
        """The manifest one run over all the input writes (same config, same hash)."""
        first = parts[0]
        totals = _merged_totals(parts)
        documents = sum(split["documents"] for split in splits.values())
        if totals["documents_written"] != documents:
            raise RuntimeError(
                f"the parts wrote {totals['documents_written']} documents, their splits {documents}"
            )
        return {
            "format": manifest_format(self.plan.cfg),
            **{key: first[key] for key in ("seq_len", "dtype", "tokenizer")},
            "splits": splits,
            **{key: totals[key] for key in ("documents_read", "documents_written", "documents_skipped")},
            "skipped_examples": totals["skipped_examples"],
            "tokens": sum(split["tokens"] for split in splits.values()),
            "samples": sum(split["samples"] for split in splits.values()),
            "tokens_dropped": dropped,
            "bytes_read": totals["bytes_read"],
            "inputs_by": first["inputs_by"],
            "inputs": _merged_inputs(parts),
            "duplicate_inputs": self.plan.duplicates,
            "config": self.plan.config,
            "config_hash": self.plan.config_hash,
        }

    def report(self, m: dict, parts: int) -> None:
        seconds = time.perf_counter() - self.plan.start
        print(
            f"dlm prepare: merged {parts} parts -> {m['tokens']:,} tokens in {written_as(m)} "
            f"in {seconds:.1f} s -> {self.out}"
        )
        _report_duplicates(m)


def written_as(m: dict) -> str:
    """What a manifest's dataset is made of, for the reports."""
    splits = m["splits"]
    if m["format"] != FORMAT:
        docs = {split: splits[split]["documents"] for split in SPLITS}
        return (
            f"Megatron indexed datasets {splits['train']['prefix']}.bin/.idx ({docs['train']:,} documents) "
            f"and {splits['eval']['prefix']}.bin/.idx ({docs['eval']:,})"
        )
    shards = {split: len(splits[split]["shards"]) for split in SPLITS}
    return (
        f"{m['samples']:,} samples of {m['seq_len']} in {sum(shards.values())} shards "
        f"(train {shards['train']}, eval {shards['eval']})"
    )


def _report_duplicates(m: dict) -> None:
    duplicates = m.get("duplicate_inputs") or {"count": 0}
    if duplicates["count"]:
        shown = ", ".join(duplicates["examples"][:PRINT_EXAMPLES])
        print(f"  {duplicates['count']} input paths reached a file already read (read once): {shown}")


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, n in count.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def _merged_totals(parts: list[dict]) -> dict:
    """The summed accounting of the parts, in manifest order; it must reconcile. The skipped
    examples in the order of one run: the readers', then those of documents without ids."""
    summed = ("documents_read", "documents_written", "bytes_read")
    total = {key: sum(part[key] for part in parts) for key in summed}
    skipped = _sum_counts([part["documents_skipped"] for part in parts])
    read, written = total["documents_read"], total["documents_written"]
    if read != written + sum(skipped.values()):
        raise RuntimeError(
            f"the parts' document accounting does not reconcile ({read=}, {written=}, {skipped})"
        )
    reader, no_ids = ([x for part in parts for x in part["examples"][kind]] for kind in ("reader", NO_TOKENS))
    return {
        "documents_read": read,
        "documents_written": written,
        "documents_skipped": skipped,
        "skipped_examples": (reader[:MAX_EXAMPLES] + no_ids[:MAX_EXAMPLES])[:MAX_EXAMPLES],
        "bytes_read": total["bytes_read"],
    }


_SUMMED = ("files", "size", "bytes", "documents_read", "documents_written")  # in `inputs` per argument


def _merged_inputs(parts: list[dict]) -> list[dict]:
    """The parts' `inputs`: concatenated per file; per input argument, summed by "input"."""
    entries = [entry for part in parts for entry in part["inputs"]]
    if parts[0]["inputs_by"] == "file":
        return entries
    merged: dict[str, dict] = {}
    for entry in entries:
        into = merged.setdefault(
            entry["input"], {**entry, "documents_skipped": {}} | dict.fromkeys(_SUMMED, 0)
        )
        for key in _SUMMED:
            into[key] += entry[key]
        into["documents_skipped"] = _sum_counts([into["documents_skipped"], entry["documents_skipped"]])
    return list(merged.values())


# -- the command ---------------------------------------------------------------------------------------------
def check_config(cfg: PrepareConfig) -> None:
    """The checks of a PrepareConfig (`dlm prepare` runs them before anything else, exit 2;
    run() again, for callers in Python)."""
    if not cfg.input:
        raise PrepareError("prepare: input=[...] is empty (files, directories, globs, stdlib, manpages)")
    if cfg.format not in FORMATS:
        raise PrepareError(f"format={cfg.format!r} is not one of {FORMATS}")
    if cfg.on_error not in ON_ERROR:
        raise PrepareError(f"on_error={cfg.on_error!r} is not one of {ON_ERROR}")
    for key in ("seq_len", "workers", "chunk_chars", "samples_per_shard", "partitions"):
        if getattr(cfg, key) <= 0:
            raise PrepareError(f"{key}={getattr(cfg, key)} must be positive")
    if not 0 <= cfg.eval_fraction < 1:
        raise PrepareError(f"eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    if cfg.partition is not None and cfg.partitions == 1:
        raise PrepareError(f"partition={cfg.partition} needs partitions > 1 (the number of parts)")
    if cfg.partition is not None and not 0 <= cfg.partition < cfg.partitions:
        raise PrepareError(f"partition={cfg.partition} must be in [0, partitions={cfg.partitions})")


def run(cfg: PrepareConfig) -> dict:
    """Prepare (or resume, or confirm up to date) the dataset of `cfg`; returns its manifest
    (with partitions > 1: part cfg.partition's, or the merged one)."""
    check_config(cfg)
    start = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer)  # FileNotFoundError naming it
    files, duplicates = _resolve(cfg)
    if cfg.partitions > 1:
        return _Partitioned(cfg, tok, files, duplicates, start).run()
    by_argument = len(files) > MAX_INPUT_ENTRIES
    out = Path(cfg.output)
    return _prepare(_Run(cfg, tok, files, out, by_argument=by_argument, duplicates=duplicates, start=start))


def _prepare(prep: _Run) -> dict:
    """Prepare (or resume, or confirm up to date) the dataset of one _Run."""
    manifest = prep.prepare_output()
    if manifest is not None:
        print(
            f"dlm prepare: {prep.out} is up to date ({manifest['tokens']:,} tokens, config "
            f"{prep.config_hash[:12]}); nothing to do"
        )
        return manifest
    return prep.execute()
