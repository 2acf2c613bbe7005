"""`dlm prepare`: tokenize, pack and shard a corpus into a dlm-shards/1 dataset.

    dlm prepare input=[a.jsonl,dir/] output=DIR tokenizer=DIR/tokenizer.model seq_len=2048

`tokenizer` is a `dlm tokenizer` .model or a Hugging Face tokenizer.json (or a directory
holding one, e.g. `<import>/tokenizer/` of `dlm import-hf`): data.tokenizer.load_tokenizer.

Pipeline (the on-disk format is data/shards.py):

- read (main process): every resolved input file through its own
  `data.sources.DocumentReader` (so the manifest can account per file), in the stable
  order of `resolve_inputs`;
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
- split: with eval_fraction > 0, document number `i` (0-based, among the documents the
  reader yields) goes to eval when blake2b(f"{seed}:{i}") / 2**64 < eval_fraction
  (`is_eval`): a hash, so resuming or reordering workers cannot change it;
- pack: per split, the stream of the split's documents (each ending in EOS) is cut into
  consecutive samples of exactly seq_len tokens (segments: shards.segment_ids); the final
  tail shorter than seq_len is dropped and counted in `tokens_dropped`;
- shard: samples_per_shard samples per `<split>-<i:05d>.tar` (shards.write_shard, atomic),
  keys = sample number within the split; manifest.json written atomically last, with both
  splits (eval empty when eval_fraction=0).

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

Resuming. `prepare.state.json` (format "dlm-prepare-state/1"), written atomically at the
start and after every batch of documents during which a shard was completed::

  format, config_hash, config (as in the manifest), generation, dtype,
  documents_consumed   documents yielded by the readers whose tokens are all in completed
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
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.config import PrepareConfig
from data.files import write_atomic
from data.shards import FORMAT, MANIFEST, SPLITS, segment_ids, shard_name, token_dtype, write_shard
from data.sources import EMBEDDED, MAX_EXAMPLES, DocumentReader, resolve_inputs
from data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

PREPARE_VERSION = 2  # bump when a code change alters the bytes written for the same config
STATE = "prepare.state.json"
STATE_FORMAT = "dlm-prepare-state/1"
NO_TOKENS = "no_tokens"
MAX_INPUT_ENTRIES = 10_000  # above this many input files, `inputs` is per input argument
PRINT_EXAMPLES = 10
BATCH_CHARS = 1 << 20  # characters of text per tokenization task
BATCH_DOCS = 2048  # documents per tokenization task
HASHED = ("jsonl_field", "seq_len", "chunk_chars", "samples_per_shard", "eval_fraction", "seed")
_TMP = re.compile(
    r"^(?:(?:train|eval)-\d{5}\.tar|manifest\.json|prepare\.state(?:\.json|\.\d{6}\.bin))\.tmp$"
)
_CARRY = re.compile(r"^prepare\.state\.\d{6}\.bin$")
_SHARD = re.compile(r"^(?:train|eval)-\d{5}\.tar$")

# Test hook: called with "shard_written", "state_saved" or "manifest_written" (before the
# state file is removed); raising there simulates an interruption at that point.
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


def is_eval(seed: int, ordinal: int, fraction: float) -> bool:
    """Whether document number `ordinal` is held out: a hash of (seed, ordinal)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
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

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(per-document token counts incl. EOS (0: no ids, no EOS), flat ids in `dtype`)."""
        inputs, counts = [], []
        for text in texts:
            cut = self.inputs(text)
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
            if n:
                parts.extend(ids)
                parts.append(eos)
                lengths[d] = n + 1
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


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
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

    def add(self, tokens: np.ndarray) -> int:
        """Append tokens to the stream; write every full shard; returns shards written."""
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

    def finish(self) -> int:
        """Write the last (short) shard; returns the dropped tail length."""
        if self.ready_rows:
            self._write(np.concatenate(self.ready))
            self.ready, self.ready_rows = [], 0
        dropped, self.pending, self.pending_len = self.pending_len, [], 0
        return dropped

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


# -- files -------------------------------------------------------------------------------------------------
def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


@dataclass(frozen=True)
class _Input:
    argument: int  # index into cfg.input
    path: Path
    size: int
    mtime_ns: int


def _resolve(cfg: PrepareConfig) -> list[_Input]:
    files = []
    for a, item in enumerate(cfg.input):
        for path in resolve_inputs([item]):
            st = os.stat(path) if path.exists() else os.lstat(path)  # a dangling link is read as unreadable
            files.append(_Input(a, path, st.st_size, st.st_mtime_ns))
    return files


def _configuration(cfg: PrepareConfig, tok: Tokenizer | HFTokenizer, files: list[_Input]) -> tuple[dict, str]:
    listing = [[os.path.abspath(f.path), f.size, f.mtime_ns] for f in files]
    inputs_sha = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    config = {
        "input": list(cfg.input),
        "tokenizer": str(cfg.tokenizer),
        "on_error": cfg.on_error,
        **{key: getattr(cfg, key) for key in HASHED},
        "tokenizer_sha256": tok.sha256,
        "inputs_sha256": inputs_sha,
        "input_files": len(files),
    }
    hashed = {
        "format": FORMAT,
        "version": PREPARE_VERSION,
        **{key: config[key] for key in (*HASHED, "tokenizer_sha256", "inputs_sha256")},
    }
    return config, hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> str:
    changed = []
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


def _complete(out: Path, manifest: dict) -> str | None:
    """None if every shard of the manifest is present with its size, else what is wrong."""
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            path = out / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                return f"{path} is missing or has the wrong size"
    return None


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
    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.start = time.perf_counter()
        self.out = Path(cfg.output)
        self.tok = load_tokenizer(cfg.tokenizer)  # FileNotFoundError naming it
        self.dtype = token_dtype(self.tok.vocab_size)
        self.encoder = _Encoder(self.tok, self.dtype, cfg.chunk_chars)
        self.files = _resolve(cfg)
        self.config, self.config_hash = _configuration(cfg, self.tok, self.files)
        shape = (cfg.seq_len, cfg.samples_per_shard, self.dtype, self.tok.eos_id, self.out)
        self.splits = {s: _Split(s, *shape) for s in SPLITS}
        self.consumed = 0  # documents_consumed of the state
        self.resumed_from = 0
        self.generation = 0
        self.carry_file: str | None = None
        self.no_tokens = {"count": 0, "per_file": {}, "examples": []}
        self.accounts = _Accounts(cfg.input, by_argument=len(self.files) > MAX_INPUT_ENTRIES)
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
    def handle(self, batch: list[tuple[int, int, str]], lengths: np.ndarray, flat: np.ndarray) -> None:
        """Pack one tokenized batch [(ordinal, file index, where)]; save the state if a shard
        was completed."""
        cfg = self.cfg
        if not lengths.all():
            for (_, file_index, where), n in zip(batch, lengths, strict=True):
                if n == 0:
                    nt = self.no_tokens
                    nt["count"] += 1
                    nt["per_file"][str(file_index)] = nt["per_file"].get(str(file_index), 0) + 1
                    if len(nt["examples"]) < MAX_EXAMPLES:
                        nt["examples"].append(f"{where}: {NO_TOKENS} (the tokenizer produced no ids)")
        self.tokens_this_run += int(flat.size)
        written = 0
        if cfg.eval_fraction > 0:
            held = np.array([is_eval(cfg.seed, o, cfg.eval_fraction) for o, _, _ in batch], dtype=bool)
            per_token = np.repeat(held, lengths)
            for name, docs, tokens in (
                ("train", (~held & (lengths > 0)).sum(), flat[~per_token]),
                ("eval", (held & (lengths > 0)).sum(), flat[per_token]),
            ):
                self.splits[name].documents += int(docs)
                written += self.splits[name].add(tokens)
        else:
            self.splits["train"].documents += int((lengths > 0).sum())
            written += self.splits["train"].add(flat)
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
                )
                for doc in reader:
                    if ordinal < self.resumed_from:  # consumed before the interruption: count, skip
                        ordinal += 1
                        bar.update(1)
                        continue
                    batch.append((ordinal, index, doc.where))
                    texts.append(doc.text)
                    chars += len(doc.text)
                    ordinal += 1
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

    def finish(self) -> dict:
        cfg = self.cfg
        dropped = sum(self.splits[s].finish() for s in SPLITS)
        acc = self.accounts.close(self.no_tokens)
        read, written, skipped = acc["documents_read"], acc["documents_written"], acc["documents_skipped"]
        split_documents = sum(s.documents for s in self.splits.values())
        if read != written + sum(skipped.values()) or written != split_documents:
            raise RuntimeError(f"document accounting does not reconcile ({read=}, {written=}, {skipped})")
        samples = sum(s.samples for s in self.splits.values())
        manifest = {
            "format": FORMAT,
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
            "config": self.config,
            "config_hash": self.config_hash,
        }
        write_atomic(self.out / MANIFEST, _json_bytes(manifest))
        if _FAULT:
            _FAULT("manifest_written")
        (self.out / STATE).unlink(missing_ok=True)
        _remove_leftovers(self.out)
        self.report(manifest)
        return manifest

    def report(self, m: dict) -> None:
        seconds = time.perf_counter() - self.start
        shards = {s: len(m["splits"][s]["shards"]) for s in SPLITS}
        rate = self.tokens_this_run / max(seconds, 1e-9)
        print(
            f"dlm prepare: {m['documents_written']:,} documents -> {m['tokens']:,} tokens in "
            f"{m['samples']:,} samples of {m['seq_len']} in {sum(shards.values())} shards "
            f"(train {shards['train']}, eval {shards['eval']}) in {seconds:.1f} s "
            f"({rate / 1e6:.2f}M tokens/s, {self.cfg.workers} workers) -> {self.out}"
        )
        skipped = sum(m["documents_skipped"].values())
        print(
            f"  read {m['documents_read']:,} documents ({m['bytes_read'] / 1e6:.1f} MB), skipped {skipped:,}"
            + (f": {m['documents_skipped']}" if skipped else "")
            + f"; dropped the last {m['tokens_dropped']:,} tokens (tails shorter than seq_len)"
        )
        if not m["splits"]["train"]["samples"]:
            print(f"  warning: the train split is empty: its documents hold < seq_len={m['seq_len']} tokens")
        for example in m["skipped_examples"][:PRINT_EXAMPLES]:
            print(f"  skipped {example}")
        if skipped > PRINT_EXAMPLES:
            print(f"  ... {skipped - PRINT_EXAMPLES:,} more skipped (first {MAX_EXAMPLES} in {MANIFEST})")


def _validate(cfg: PrepareConfig) -> None:
    """The checks of pretrain.config.load_command_config, for callers of run() in Python."""
    if not cfg.input:
        raise PrepareError("input=[...] is empty (files, directories, globs, stdlib, manpages)")
    for key in ("seq_len", "workers", "chunk_chars", "samples_per_shard"):
        if getattr(cfg, key) <= 0:
            raise PrepareError(f"{key}={getattr(cfg, key)} must be positive")
    if not 0 <= cfg.eval_fraction < 1:
        raise PrepareError(f"eval_fraction={cfg.eval_fraction} must be in [0, 1)")


def run(cfg: PrepareConfig) -> dict:
    """Prepare (or resume, or confirm up to date) the dataset of `cfg`; returns its manifest."""
    _validate(cfg)
    prep = _Run(cfg)
    manifest = prep.prepare_output()
    if manifest is not None:
        print(
            f"dlm prepare: {prep.out} is up to date ({manifest['samples']:,} samples, config "
            f"{prep.config_hash[:12]}); nothing to do"
        )
        return manifest
    return prep.execute()
