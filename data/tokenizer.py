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
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data.config import TokenizerConfig
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

    describe = Tokenizer.describe


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
    reader = DocumentReader(cfg.input, jsonl_field=cfg.jsonl_field, on_error=cfg.on_error)
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


def run(cfg: TokenizerConfig) -> Path:
    from data.hf_tokenizer import export_hf

    path, report = train_tokenizer(cfg)
    tok = Tokenizer(path)
    export_hf(tok, path.parent)
    report["tokenizer"] = tok.describe()
    (path.parent / f"{cfg.name}.report.json").write_text(json.dumps(report, indent=2))
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
