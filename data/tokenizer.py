"""`dlm tokenizer`: a sentencepiece tokenizer for DLM pretraining, and its loader.

BPE or unigram, byte fallback (no unknown characters), digits split, text kept
verbatim (identity normalisation, whitespace runs preserved: code stays code).
Reserved ids, the same in every tokenizer this writes:

    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>   4 <mask>   5.. <extra_0>...

<mask> and the spares are control symbols: text never produces them. Beside
`<output>/<name>.model` the command writes the equivalent Hugging Face tokenizer
(`tokenizer.json` and friends, see data/hf_tokenizer.py) so that an exported model
ships a tokenizer `transformers.AutoTokenizer` loads offline.

`load_tokenizer(path)` is what `dlm prepare` and `dlm train data.tokenizer=` use: a
`.model` file is such a sentencepiece model (`Tokenizer`); a `tokenizer.json`, or a
directory holding one (an imported model's `<import>/tokenizer/`), is a Hugging Face
tokenizer (`HFTokenizer`, the `tokenizers` library only) with the same interface.

Cutting documents (`Cuts`, `tok.cuts`). `dlm prepare` encodes long documents in pieces (BPE
and unigram slow down on long inputs), and a piece must never change the ids of its document.
`tok.cuts` says where a cut is provably harmless, or is None (then documents are encoded
whole): a model that sees pre-tokenized words (byte-level BPE, Metaspace(split=true),
WordPiece, ...; whole documents are not slower there), and anything not analysed
(sentencepiece normalisation other than identity, remove_extra_whitespaces,
treat_whitespace_as_suffix; BPE dropout, subword affixes or ignore_merges; normalisers other
than those below). For a model that sees the whole text (sentencepiece; a tokenizer.json
without a pre-tokenizer or with Metaspace(split=false)):

- the cut is at position p, and no token of the vocabulary (or added token) contains the two
  characters around p as the model sees them (after the per-character normalisation: ' ' ->
  '▁', NFC/NFKC/lowercase on ASCII only). Then BPE never merges across p, because every merge
  makes a vocabulary token, and the merges on each side happen in the same relative order as
  when that side is encoded alone; a unigram lattice has no edge across p, so the best path is
  the best path to p followed by the best path from p, provided the path scores are exact
  float sums (sentencepiece float32, tokenizers float64): `max_chars` bounds the document
  length for which that holds, from the scores' binary quantum and magnitude;
- both characters are vocabulary tokens, or encoded byte-wise (byte fallback): unknown
  characters may otherwise be fused into one unknown token across the cut;
- a dummy prefix (sentencepiece add_dummy_prefix, a Prepend normaliser, Metaspace
  prepend_scheme first/always) belongs to the document's start only: a continuation piece is
  encoded after the character before the cut, `c + piece`, and the ids of `c` alone are
  dropped (`context`): both carry the same prefix, which therefore stays on the `c` side;
- no added token contains the pair either, or begins or ends at the cut (the text after an
  added token is a new segment, which may get its own prefix), or (when one strips
  whitespace) has whitespace around the cut within reach.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data.config import TokenizerConfig
from data.files import write_atomic
from data.sources import DocumentReader, InputError

PAD, BOS, EOS, UNK, MASK = "<pad>", "<s>", "</s>", "<unk>", "<mask>"


class Tokenizer:
    """A loaded sentencepiece model with the special ids dlm-pretrain relies on."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path} does not exist")
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.mask_id = self.sp.piece_to_id(MASK)
        if self.mask_id == self.sp.unk_id() or min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise ValueError(
                f"tokenizer {self.path} lacks <pad>/<s>/</s>/<mask>: was it written by `dlm tokenizer`?"
            )
        self.name = self.path.stem

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def encode_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        """One int array per text, single-threaded (the caller's processes are the parallelism)."""
        return self.sp.encode(texts, num_threads=1, return_type="numpy")

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    @functools.cached_property
    def cuts(self) -> Cuts | None:
        """Where a document may be cut before encoding (module doc); None: nowhere."""
        return _sentencepiece_cuts(self.sp.serialized_model_proto())

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes of the (normalized) text each id stands for: a byte-fallback piece
        is one byte, '▁' a space, control and unknown pieces none. Summed over a
        sample, the bytes it decodes to (bits per byte)."""
        sp = self.sp
        return [
            0
            if sp.is_control(i) or sp.is_unknown(i)
            else 1
            if sp.is_byte(i)
            else len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
            for i in range(self.vocab_size)
        ]

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "mask_id": self.mask_id,
        }


HF_SPECIAL = ("pad_token", "bos_token", "eos_token", "mask_token")
HF_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")  # the later one wins, as in transformers


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (via `tokenizers`, no transformers), with the special
    ids named in the tokenizer_config.json / special_tokens_map.json beside it. Encoding adds
    no special tokens and, like `AutoTokenizer(text, add_special_tokens=False)`, turns the
    text of a special token into its id unless tokenizer_config sets split_special_tokens.
    eos is required (`dlm prepare` ends every document with it); pad/bos/mask may be None."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path} does not exist")
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.hf = Backend.from_str(data.decode("utf-8"))
        self.hf.no_truncation()  # a tokenizer.json may carry settings for model inputs: documents stay whole
        self.hf.no_padding()
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        specials: dict = {}
        read = []
        for name in HF_CONFIGS:
            config = self.path.parent / name
            if config.is_file():
                read.append(config)
                try:
                    values = json.loads(config.read_text())
                except ValueError as e:
                    raise ValueError(f"tokenizer {self.path}: {config} is not valid JSON: {e}") from None
                specials.update({k: values[k] for k in HF_SPECIAL if values.get(k) is not None})
                if name == "tokenizer_config.json" and values.get("split_special_tokens"):
                    self.hf.encode_special_tokens = True
        ids = {}
        for key in HF_SPECIAL:
            token = specials.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            ids[key] = self.hf.token_to_id(token) if token else None
            if token and ids[key] is None:
                raise ValueError(f"tokenizer {self.path}: {key} {token!r} is not in its vocabulary")
        if ids["eos_token"] is None:
            where = " / ".join(str(c) for c in read) or str(self.path.parent / HF_CONFIGS[0])
            raise ValueError(
                f"tokenizer {self.path}: no eos_token declared in {where} "
                "(`dlm prepare` ends every document with it)"
            )
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (ids[k] for k in HF_SPECIAL)
        self.name = self.path.parent.name if self.path.name == "tokenizer.json" else self.path.stem

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        return [
            np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch(texts, add_special_tokens=False)
        ]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @functools.cached_property
    def cuts(self) -> Cuts | None:
        """Where a document may be cut before encoding (module doc); None: nowhere."""
        return _hf_cuts(self.hf)

    describe = Tokenizer.describe


# -- where a document may be cut before encoding (module doc) --------------------------------------------
SPACE = "\u2581"  # sentencepiece's and Metaspace's escaped ' '
UNK_PENALTY = 10.0  # unknown-token score = lowest score - this, in sentencepiece and tokenizers
MAX_CHARS = 1 << 62  # "no limit" for Cuts.max_chars


class Cuts:
    """Where a document may be cut: `allows(left, right)` for the characters around a cut;
    continuation pieces are encoded after the character before the cut when `context`;
    documents longer than `max_chars` are not cut."""

    def __init__(
        self,
        tokens: Iterable[str],
        *,
        known: Iterable[str] | None = None,
        model_char: Callable[[str], str],
        byte_fallback: bool,
        context: bool,
        ascii_only: bool = False,
        blocked: Iterable[str] = (),
        blocked_whitespace: bool = False,
        max_chars: int = MAX_CHARS,
    ):
        tokens = list(tokens)
        self.inside = {t[i : i + 2] for t in tokens for i in range(len(t) - 1)}
        self.known = set(known) if known is not None else {t for t in tokens if len(t) == 1}
        self.model_char = model_char
        self.byte_fallback = byte_fallback
        self.context = context
        self.ascii_only = ascii_only
        self.blocked = set(blocked)
        self.blocked_whitespace = blocked_whitespace
        self.max_chars = max_chars
        self._memo: dict[str, bool] = {}

    def allows(self, left: str, right: str) -> bool:
        """Whether a cut between the characters `left` and `right` leaves the ids unchanged."""
        pair = left + right
        allowed = self._memo.get(pair)
        if allowed is None:
            allowed = self._memo[pair] = self._allows(left, right)
        return allowed

    def _allows(self, left: str, right: str) -> bool:
        if left in self.blocked or right in self.blocked:
            return False
        if self.blocked_whitespace and (left.isspace() or right.isspace()):
            return False
        if self.ascii_only and not (left.isascii() and right.isascii()):
            return False
        seen_left, seen_right = self.model_char(left), self.model_char(right)
        if not (self._encodable(seen_left) and self._encodable(seen_right)):
            return False
        return (left + right) not in self.inside and (seen_left[-1] + seen_right[0]) not in self.inside

    def _encodable(self, seen: str) -> bool:
        """Non-empty and never an unknown token (which may fuse with a neighbour)."""
        return bool(seen) and (self.byte_fallback or all(ch in self.known for ch in seen))


def exact_sum_chars(
    scores: Iterable[float], mantissa_bits: int, growth: int = 1, prefix_chars: int = 1
) -> int:
    """The longest text whose unigram path scores (sums of at most one score per model
    character; `growth` model characters per text character, plus a dummy prefix) are exact
    floats of `mantissa_bits`: every score is a multiple of the finest binary quantum q among
    them, so a sum of n scores is exact while n * max|score| <= 2**bits * q."""
    exact = [Fraction(s) for s in scores]
    largest = max((abs(s) for s in exact), default=Fraction(0))
    if largest == 0:
        return MAX_CHARS
    quantum = Fraction(1, max(s.denominator for s in exact))
    terms = math.floor(2**mantissa_bits * quantum / largest)
    return max(0, min(MAX_CHARS, (terms - prefix_chars) // growth))


def _sentencepiece_cuts(model_proto: bytes) -> Cuts | None:
    """Identity normalisation (no charsmap, whitespace kept) and a dummy prefix or none;
    BPE, or unigram within the float32 bound of its scores."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    from data.hf_tokenizer import BPE, NORMAL, UNIGRAM, USER_DEFINED

    proto = spm_pb.ModelProto()
    proto.ParseFromString(model_proto)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or trainer.treat_whitespace_as_suffix:
        return None
    if trainer.model_type == BPE:
        max_chars = MAX_CHARS
    elif trainer.model_type == UNIGRAM and not any(p.type == USER_DEFINED for p in proto.pieces):
        normal = [np.float32(p.score) for p in proto.pieces if p.type == NORMAL]
        unknown = min(normal) - np.float32(UNK_PENALTY)  # float32 arithmetic, as sentencepiece
        max_chars = exact_sum_chars([float(s) for s in (*normal, unknown)], 24)
    else:
        return None
    escape = norm.escape_whitespaces
    return Cuts(
        [p.piece for p in proto.pieces],
        known=[p.piece for p in proto.pieces if p.type in (NORMAL, USER_DEFINED) and len(p.piece) == 1],
        model_char=lambda ch: SPACE if escape and ch == " " else ch,
        byte_fallback=trainer.byte_fallback,
        context=norm.add_dummy_prefix,
        max_chars=max_chars,
    )


class _Unsupported(Exception):
    """A tokenizer.json step whose effect on cuts is not analysed: documents are not cut."""


def _steps(spec: dict | None, key: str) -> list[dict]:
    if spec is None:
        return []
    return [s for sub in spec[key] for s in _steps(sub, key)] if spec["type"] == "Sequence" else [spec]


@dataclass
class _Pipeline:
    """What a tokenizer.json does to the text before its model, for one character."""

    maps: list[Callable[[str], str]] = field(default_factory=list)  # in order
    ascii_only: bool = False  # cuts only between ASCII characters (NF*, lowercase)
    context: bool = False  # a dummy prefix
    growth: int = 1  # model characters per text character, at most
    prefix_chars: int = 0

    def model_char(self, ch: str) -> str:
        for f in self.maps:
            ch = f(ch)
        return ch


def _pipeline(normalizer: dict | None, pre_tokenizer: dict | None) -> _Pipeline:
    """The per-character steps before the model; _Unsupported for anything else."""
    pipe = _Pipeline()
    for step in _steps(normalizer, "normalizers"):
        kind = step["type"]
        pattern = step.get("pattern", {}).get("String")
        if kind == "Replace" and pattern is not None and len(pattern) == 1:
            pipe.maps.append(lambda s, a=pattern, b=step["content"]: s.replace(a, b))
            pipe.growth *= max(1, len(step["content"]))
        elif kind == "Prepend":
            pipe.context = True
            pipe.prefix_chars += len(step["prepend"])
        elif kind in ("NFC", "NFD", "NFKC", "NFKD"):
            pipe.ascii_only = True  # ASCII characters are normalisation boundaries, mapped to themselves
            pipe.growth *= 18  # the longest NFKC expansion of one character
        elif kind == "Lowercase":
            pipe.ascii_only = True
            pipe.maps.append(str.lower)
            pipe.growth *= 3
        else:
            raise _Unsupported(kind)
    for step in _steps(pre_tokenizer, "pretokenizers"):
        if step["type"] != "Metaspace" or step.get("split", True):
            raise _Unsupported(step["type"])  # a splitting pre-tokenizer: the model sees words
        pipe.maps.append(lambda s, b=step["replacement"]: s.replace(" ", b))
        if step.get("prepend_scheme", "always") != "never":
            pipe.context = True
            pipe.prefix_chars += 1
    return pipe


def _hf_model(model: dict, vocab: dict[str, int], pipe: _Pipeline) -> tuple[bool, int]:
    """(byte fallback, max_chars) of a BPE or unigram model; other models are not cut."""
    fallback = bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in vocab for b in range(256))
    if model["type"] == "BPE":
        if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise _Unsupported("BPE with dropout or subword affixes")
        if model.get("ignore_merges"):
            raise _Unsupported("BPE ignore_merges (a whole piece in the vocabulary skips the merges)")
        return fallback, MAX_CHARS
    if model["type"] == "Unigram":
        scores = [float(score) for _, score in model["vocab"]]
        unknown = min(scores, default=0.0) - UNK_PENALTY
        return fallback, exact_sum_chars([*scores, unknown], 53, pipe.growth, pipe.prefix_chars)
    raise _Unsupported(model["type"])


def _hf_cuts(hf) -> Cuts | None:
    """A tokenizer.json whose model sees the whole text: no pre-tokenizer or Metaspace(split
    false); normalisers Replace (one character), Prepend, NF*, Lowercase; BPE or unigram."""
    spec = json.loads(hf.to_str())
    try:
        pipe = _pipeline(spec.get("normalizer"), spec.get("pre_tokenizer"))
        vocab = hf.get_vocab(with_added_tokens=True)
        byte_fallback, max_chars = _hf_model(spec["model"], vocab, pipe)
    except _Unsupported:
        return None
    # No added token may begin or end at a cut: in the whole document, the text after it is a
    # new segment (Prepend and prepend_scheme=always give it a prefix). One that strips
    # whitespace also reaches over the whitespace around it.
    added = list(hf.get_added_tokens_decoder().values())
    ends = [a.content[0] + a.content[-1] for a in added]
    seen_added = ["".join(pipe.model_char(ch) for ch in a.content) for a in added]
    model_vocab = hf.get_vocab(with_added_tokens=False)
    return Cuts(
        [*vocab, *(a.content for a in added), *seen_added, *(SPACE + s for s in seen_added)],
        known=[t for t in model_vocab if len(t) == 1],
        model_char=pipe.model_char,
        byte_fallback=byte_fallback,
        context=pipe.context,
        ascii_only=pipe.ascii_only,
        blocked="".join(ends),
        blocked_whitespace=any(a.lstrip or a.rstrip for a in added),
        max_chars=max_chars,
    )


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """A `.model` (sentencepiece, `dlm tokenizer`) or a Hugging Face tokenizer: a
    `tokenizer.json`, or a directory containing one."""
    path = Path(path)
    if path.is_dir() or path.name.endswith(".json"):
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"tokenizer {path} is a directory without a tokenizer.json "
                "(give a sentencepiece .model, a tokenizer.json or a directory holding one)"
            )
        return HFTokenizer(path)
    return Tokenizer(path)


def _sentences(reader: DocumentReader, max_bytes: int) -> Iterator[str]:
    """Lines of every document (sentencepiece trains on 'sentences'), cut to max_bytes."""
    for doc in reader:
        for line in doc.text.splitlines():
            if line.strip():
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _train_sentencepiece(sentences: Iterator[str], **options) -> None:
    """SentencePieceTrainer.train, with failures the CLI reports: sentencepiece wraps an
    exception of the sentence iterator in a RuntimeError, so bad input under on_error=fail
    is re-raised as the InputError naming file:line; other training failures (vocab_size
    too large for the corpus) become a ValueError."""
    failure: list[InputError] = []

    def guarded() -> Iterator[str]:
        try:
            yield from sentences
        except InputError as e:
            failure.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(sentence_iterator=guarded(), **options)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        raise ValueError(f"sentencepiece training failed: {e}") from e


def train_tokenizer(cfg: TokenizerConfig) -> tuple[Path, dict]:
    """Train `<cfg.output>/<cfg.name>.model`; returns its path and an input report."""
    from data.hf_tokenizer import finalize_model, training_options  # what the exact HF export needs

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    reader = DocumentReader(
        cfg.input,
        jsonl_field=cfg.jsonl_field,
        on_error=cfg.on_error,
        filter_field=cfg.filter_field,
        filter_min=cfg.filter_min,
        filter_max=cfg.filter_max,
    )
    spares = [f"<extra_{i}>" for i in range(cfg.spare_tokens)]
    start = time.perf_counter()
    spm.set_random_generator_seed(cfg.seed)  # which sentences the sampling cap keeps
    _train_sentencepiece(
        _sentences(reader, cfg.max_sentence_length),
        model_prefix=str(out / cfg.name),
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        control_symbols=[MASK, *spares],
        input_sentence_size=cfg.max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=cfg.max_sentence_length,
        seed_sentencepiece_size=1_000_000,
        num_threads=cfg.num_threads,
        minloglevel=2,
        **training_options(cfg.model_type, cfg.spare_tokens),
    )
    finalize_model(out / f"{cfg.name}.model")
    stats = reader.stats
    report = {
        "documents_read": stats.documents_read,
        "documents_used": stats.documents_yielded,
        "documents_skipped": stats.documents_skipped,
        "skipped_examples": stats.skipped_examples,
        "bytes_read": stats.bytes_read,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return out / f"{cfg.name}.model", report


def _settings(cfg: TokenizerConfig) -> dict:
    """What the model depends on (not where it goes, not the thread count), as in the report."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("output", "num_threads")}


def _up_to_date(cfg: TokenizerConfig) -> Path | None:
    """The model, when a finished run of the same settings wrote it (its report names its sha256)."""
    path = Path(cfg.output) / f"{cfg.name}.model"
    try:
        report = json.loads((path.parent / f"{cfg.name}.report.json").read_text())
        same = report.get("config") == _settings(cfg) and report["tokenizer"]["sha256"] == _sha256(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if same else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cfg: TokenizerConfig) -> Path:
    """Train the tokenizer, or say it is up to date (same settings, model unchanged: a rerun,
    e.g. of a pipeline stage, keeps the tokenizer the datasets were made with)."""
    from data.hf_tokenizer import export_hf

    done = _up_to_date(cfg)
    if done is not None:
        print(f"dlm tokenizer: {done} is up to date (same settings); nothing to do")
        return done
    path, report = train_tokenizer(cfg)
    tok = Tokenizer(path)
    export_hf(tok, path.parent)
    report["tokenizer"] = tok.describe()
    report["config"] = _settings(cfg)
    write_atomic(path.parent / f"{cfg.name}.report.json", json.dumps(report, indent=2))  # last: marks it done
    skipped = sum(report["documents_skipped"].values())
    print(
        f"dlm tokenizer: {tok.vocab_size} pieces ({cfg.model_type}) from {report['documents_used']:,} "
        f"documents ({report['bytes_read'] / 1e6:.1f} MB) in {report['seconds']} s -> {path}\n"
        f"  skipped {skipped} of {report['documents_read']:,} documents {report['documents_skipped'] or ''}"
    )
    for example in report["skipped_examples"][:10]:
        print(f"  skipped {example}")
    print(f"  Hugging Face tokenizer files in {path.parent}; sha256 {tok.sha256[:16]}...")
    return path
