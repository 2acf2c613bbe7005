"""The Hugging Face twin of a `dlm tokenizer` sentencepiece model.

`export_hf(tok, out_dir)` writes `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json`; `transformers.AutoTokenizer.from_pretrained(out_dir)` loads
them offline (no remote code) as a fast tokenizer that gives the ids sentencepiece
gives, for any text, and decodes them back:

    hf = AutoTokenizer.from_pretrained(out_dir)
    hf(text, add_special_tokens=False).input_ids == Tokenizer(model).encode(text)
    hf(text).input_ids == the same: add_special_tokens=True adds nothing (no BOS, no
        EOS; `dlm prepare` appends EOS after each document itself)
    hf.decode(ids) == text

Special ids: 0 <pad>, 1 <s> (bos), 2 </s> (eos), 3 <unk>, 4 <mask> (mask_token), 5..
<extra_i> (additional special tokens), all registered as special tokens. As in
sentencepiece, typing them does not produce them: the text "<mask>" is encoded as the
characters it is made of (tokenizer_config sets `split_special_tokens: true`). Known
differences, all outside encoding:

- decode: sentencepiece drops control ids and renders <unk> as " ⁇ "; the HF tokenizer
  renders special ids as their text ("<s>"), or drops all of them, <unk> included, with
  `skip_special_tokens=True`;
- the raw `tokenizers.Tokenizer.from_file("tokenizer.json")` (without transformers) does
  turn special-token text into the special id unless `encode_special_tokens = True` is
  set on it: that flag is not part of the tokenizer.json format;
- "▁" (U+2581) in the text decodes as a space, in both.

How the equality is guaranteed. The backend is a `tokenizers.Tokenizer` built straight
from the model proto (not transformers' SpmConverter, which adds a Metaspace
pre-tokenizer and whitespace stripping meant for other sentencepiece settings):

- normalisation: the model's is identity without dummy prefix or whitespace
  collapsing, i.e. only ' ' -> '▁'; so the HF normalizer is exactly that Replace, and
  there is no pre-tokenizer: sentencepiece segments the whole text at once, so does
  this. Byte fallback on both sides turns characters outside the vocabulary into
  <0xNN> ids.
- BPE: sentencepiece repeatedly merges the adjacent pair whose concatenation is the
  highest-scoring normal piece (leftmost first). The HF merges are every (a, b) with a,
  b and a+b normal pieces, ranked by the score of a+b, so HF merges the same pair at
  each step. The one freedom left is the order of two different splits of the same
  piece (sentencepiece: leftmost; HF: by rank; shorter left part first here); tests
  find no input where it matters, in either order (whole stdlib files, random
  concatenations of multi-split pieces, periodic runs like '▁▁▁▁', '====').
- unigram: both run the same Viterbi (tokenizers' `encode_optimized` is a port of
  sentencepiece's `EncodeOptimized`: same candidate order, same strict `>` ties). Two
  things would still differ, and `training_options` / `finalize_model` (called by
  `dlm tokenizer`) remove them. (1) sentencepiece adds path scores in float32,
  tokenizers in float64, and code is full of exact ties (permutations of the same
  whitespace pieces) that float32 rounding breaks at random. The normal-piece scores
  are therefore rounded to multiples of 1/16 (0.06 nats: no visible change to the
  segmentation), so a path score is exact in both while its magnitude stays below 2**20
  (some 10**5 tokens in one call; `dlm prepare` cuts unigram documents only below that,
  see data.tokenizer.Cuts; one-call inputs of 16M characters were still observed to match).
  (2) tokenizers' lattice also matches the control and byte pieces ("<s>", "<0x41>") that
  sentencepiece never matches in text. They get a score below any spelling of them with
  normal pieces, and every character they are spelled with is forced into the vocabulary
  (sentencepiece's `required_chars`), so such a spelling exists. The unknown-token score then differs
  (tokenizers derives it from the lowest score), which cannot change the result: no
  piece contains an out-of-vocabulary character, so every path pays it equally.

`export_hf` refuses models it cannot reproduce exactly (other normalisation, no byte
fallback, unquantised unigram scores, ...), and checks the tokenizer it built against
sentencepiece on every piece of the vocabulary and a set of probe strings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from sentencepiece import sentencepiece_model_pb2 as spm_pb
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer

# sentencepiece ModelProto enums
UNIGRAM, BPE = 1, 2
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # sentencepiece's escaped ' '
SCORE_QUANTUM = 1 / 16  # unigram scores are multiples of this: exact sums in float32 and float64
NO_MAX_LENGTH = int(1e30)  # transformers' "no limit" (its VERY_LARGE_INTEGER)
RESERVED = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", 4: "<mask>"}
PROBES = (
    "",
    " ",
    "  leading and trailing  ",
    "def f(x):\n\treturn x  # tab\n\n    indented\r\n",
    "                                                                    deep",
    "=" * 40 + "-" * 33 + "#" * 7 + "_" * 12,
    "x = 1234567890123456789012345678901234567890",
    "naïve café — 日本語のテキスト, 中文, 한국어 🎉👍🏽 e\u0301 \u00a0nbsp \u2028 \x07\x1b[0m",
    "<mask> <s></s><pad><unk><extra_0> <0x41><0x0A> <<mask>> </mask>",
    "supercalifragilisticexpialidocious" * 4,
    # whitespace runs: where float32 vs float64 tie-breaking showed up in unigram models
    *(" " * n + "x = f(y)" for n in range(65)),
    *("x" + " " * n + "y" for n in range(65)),
    *("\t" * n + "pass" for n in range(17)),
)


def special_pieces(spare_tokens: int) -> list[str]:
    """The control, unknown and byte pieces of a `dlm tokenizer` model: never produced by text."""
    spares = [f"<extra_{i}>" for i in range(spare_tokens)]
    return [*RESERVED.values(), *spares, *(f"<0x{b:02X}>" for b in range(256))]


def training_options(model_type: str, spare_tokens: int) -> dict:
    """Extra sentencepiece trainer options the exact export needs (see the module doc)."""
    if model_type != "unigram":
        return {}
    return {"required_chars": "".join(sorted(set("".join(special_pieces(spare_tokens)))))}


def finalize_model(path: str | Path) -> None:
    """Rewrite a freshly trained `<name>.model` (and `.vocab`) in place: unigram scores
    rounded to multiples of SCORE_QUANTUM, and no output directory recorded in it, so the
    same inputs and seed give the same bytes wherever the model is written."""
    path = Path(path)
    proto = spm_pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    proto.trainer_spec.model_prefix = path.stem
    if proto.trainer_spec.model_type == UNIGRAM:
        for piece in proto.pieces:
            if piece.type == NORMAL:
                piece.score = round(piece.score / SCORE_QUANTUM) * SCORE_QUANTUM
    path.write_bytes(proto.SerializeToString())
    vocab = path.with_suffix(".vocab")
    if vocab.exists():
        vocab.write_text("".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces), encoding="utf-8")


def _check_supported(proto) -> None:
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization {norm.name!r} (needs identity)")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        problems.append("add_dummy_prefix/remove_extra_whitespaces on or escape_whitespaces off")
    if proto.denormalizer_spec.precompiled_charsmap:
        problems.append("a denormalizer")
    if not trainer.byte_fallback or trainer.treat_whitespace_as_suffix:
        problems.append("no byte_fallback, or treat_whitespace_as_suffix")
    if trainer.model_type not in (UNIGRAM, BPE):
        problems.append(f"model_type {trainer.model_type} (needs bpe or unigram)")
    kinds = {p.type for p in proto.pieces}
    if kinds - {NORMAL, UNKNOWN, CONTROL, BYTE}:
        problems.append("user-defined or unused pieces")
    if [p.piece for p in proto.pieces[: len(RESERVED)]] != list(RESERVED.values()):
        problems.append(f"ids 0-4 are not {list(RESERVED.values())}")
    if {f"<0x{b:02X}>" for b in range(256)} - {p.piece for p in proto.pieces if p.type == BYTE}:
        problems.append("missing byte pieces")
    if problems:
        raise ValueError(f"cannot export this sentencepiece model exactly: {'; '.join(problems)}")


def _bpe(proto):
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    if len({score for score, _ in normal.values()}) != len(normal):
        raise ValueError("cannot export this BPE model exactly: two pieces have the same score")
    ranked = []
    for piece, (score, i) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, k, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    return models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
        byte_fallback=True,
        fuse_unk=False,
        dropout=None,
        ignore_merges=False,
    )


def _unigram(proto):
    normal = {p.piece: p.score for p in proto.pieces if p.type == NORMAL}
    scores = list(normal.values())
    if any(s != round(s / SCORE_QUANTUM) * SCORE_QUANTUM for s in scores):
        raise ValueError(
            "cannot export this unigram model exactly: its scores are not multiples of "
            f"{SCORE_QUANTUM} (models written by `dlm tokenizer` are; see data.hf_tokenizer.finalize_model)"
        )
    others = [p.piece for p in proto.pieces if p.type != NORMAL]
    needed = {c for piece in [*normal, *others] for c in piece} - set(normal)
    if needed:
        raise ValueError(
            "cannot export this unigram model exactly: characters of its pieces are not pieces "
            f"themselves: {''.join(sorted(needed))!r} (`dlm tokenizer` adds them as required_chars)"
        )
    # Below any spelling of a control/byte piece with normal single characters.
    lowest = min(scores)
    never = math.floor(((max(map(len, others)) + 1) * lowest - 1) / SCORE_QUANTUM) * SCORE_QUANTUM
    vocab = [(p.piece, p.score if p.type == NORMAL else never) for p in proto.pieces]
    return models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=True)


def build_hf_tokenizer(model_proto: bytes) -> HFTokenizer:
    """A `tokenizers.Tokenizer` equal to the sentencepiece model (see the module doc)."""
    proto = spm_pb.ModelProto()
    proto.ParseFromString(model_proto)
    _check_supported(proto)
    model = _bpe(proto) if proto.trainer_spec.model_type == BPE else _unigram(proto)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", SPACE)
    hf.pre_tokenizer = None
    hf.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in (CONTROL, UNKNOWN)
        ]
    )
    return hf


def _self_check(hf: HFTokenizer, tok: Tokenizer) -> None:
    """Compare with sentencepiece on the text of every piece (special ones included), runs
    of 100 pieces, and the probes; raise on the first difference."""
    texts = [tok.sp.id_to_piece(i).replace(SPACE, " ") for i in range(tok.vocab_size)]
    texts += [sep.join(texts[i : i + 100]) for i in range(0, len(texts), 100) for sep in ("", " ")]
    texts += PROBES
    hf.encode_special_tokens = True
    try:
        got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=True)]
        want = tok.encode_batch(texts)
        for text, g, w in zip(texts, got, want, strict=True):
            if g != w:
                raise RuntimeError(
                    f"HF tokenizer differs from sentencepiece on {text[:80]!r}: {g[:20]} != {w[:20]}"
                )
            if hf.decode(g, skip_special_tokens=False) != tok.decode(w):
                raise RuntimeError(f"HF decode differs from sentencepiece on {text[:80]!r}")
    finally:
        hf.encode_special_tokens = False


def export_hf(tok: Tokenizer, out_dir: str | Path, *, model_max_length: int | None = None) -> None:
    """Write the Hugging Face fast tokenizer of `tok` into `out_dir`: tokenizer.json,
    tokenizer_config.json, special_tokens_map.json (one HF tokenizer per directory).

    `model_max_length`: the context length of the model the tokenizer ships with; a bare
    tokenizer has none, so by default transformers' "no limit" is written (an exporter
    of a trained model passes its max_seq_len)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = build_hf_tokenizer(tok.sp.serialized_model_proto())
    _self_check(hf, tok)
    pad, bos, eos, unk, mask = RESERVED.values()  # at ids 0-4, checked by build_hf_tokenizer
    extras = [tok.sp.id_to_piece(i) for i in range(len(RESERVED), tok.vocab_size) if tok.sp.is_control(i)]
    special = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "mask_token": mask,
        "additional_special_tokens": extras,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,  # typed "<mask>" is text, as in sentencepiece
        "clean_up_tokenization_spaces": False,  # decode is the exact inverse of encode
        "model_max_length": NO_MAX_LENGTH if model_max_length is None else int(model_max_length),
        "padding_side": "right",
        "truncation_side": "right",
        "dlm_sentencepiece_sha256": tok.sha256,
    }
    hf.save(str(out / "tokenizer.json"), pretty=True)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
