"""`dlm tokenizer`: sentencepiece training (special ids, byte fallback, split digits,
verbatim whitespace), its Hugging Face twin (same ids as sentencepiece on any text,
loaded offline by AutoTokenizer) and the command line (input accounting, errors,
determinism). Tiny vocabularies trained on local text: no downloads."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb

from data import hf_tokenizer
from data.config import TokenizerConfig
from data.sources import stdlib_files
from data.tokenizer import Tokenizer, run, train_tokenizer
from tests.dist import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODEL_TYPES = ("bpe", "unigram")
VOCAB = 800
RESERVED = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
SPARES = [f"<extra_{i}>" for i in range(8)]
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
UNICODE_TEXT = (
    "Ünïcödé façade naïve café résumé — «quotes» ‘single’ “double”\n"
    "日本語のテキストです。中文文本，한국어 텍스트.\n"
    "emoji 🎉🚀👍🏽 family 👨‍👩‍👧 flags 🇫🇷\n"
    "combining: e\u0301 a\u0308 n\u0303 — precomposed: é ä ñ\n"
) * 20

EDGE_CASES = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    "  leading spaces",
    "trailing spaces   ",
    "   both   ",
    " \t mixed \t whitespace \t ",
    "line one\r\nline two\r\n",
    "lone\rcarriage return",
    "def f(x):\n\tif x:\n\t\treturn  x   +  1\n        # eight spaces\n",
    "        " * 6 + "deeply_indented()",
    "x" * 4000,
    "supercalifragilisticexpialidocious" * 30,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "1234567890" * 40,
    "3.14159265358979323846264338327950288419716939937510",
    "0x7fffffff 0b1010 1e-9 1_000_000 -42",
    "control chars: \x01\x02\x07\x08\x0b\x0c\x1b[31mred\x1b[0m \x7f",
    "separators: \u0085 \u2028 \u2029 \u00a0 \u200b \ufeff",
    "日本語のテキスト",
    "🎉🚀👍🏽👨‍👩‍👧",
    "e\u0301\u0301\u0301 combining pile-up",
    "rare: \ue000 \U00013000 \U0010fffd 龘",
    "<mask> <s></s><pad><unk><extra_0> <0x41><0x0A> <<mask>> </mask> <mask",
    "=" * 50 + "-" * 37 + "#" * 11 + "*" * 9 + "_" * 13,
    "a" * 1 + " " * 33 + "b",
]


def _corpus(root: Path) -> list[str]:
    """Training inputs: ~450 KB of stdlib Python plus a unicode text file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "unicode.txt").write_text(UNICODE_TEXT, encoding="utf-8")
    return [str(STDLIB / "email" / "*.py"), str(STDLIB / "json" / "*.py"), str(root / "unicode.txt")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[Tokenizer, list[str]]]:
    """One tokenizer per model type, trained and exported by `run` (what the CLI calls)."""
    root = tmp_path_factory.mktemp("tok")
    inputs = _corpus(root / "corpus")
    out = {}
    for model_type in MODEL_TYPES:
        cfg = TokenizerConfig(
            input=inputs, output=str(root / model_type), vocab_size=VOCAB, model_type=model_type
        )
        out[model_type] = (Tokenizer(run(cfg)), inputs)
    return out


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    """Hundreds of lines sampled from stdlib files the tokenizers never saw, some whole files,
    and the edge cases."""
    rng = random.Random(1234)
    files = [p for p in stdlib_files() if p.parent.name not in ("email", "json")]
    lines: list[str] = []
    for path in rng.sample(files, 60):
        text = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        lines += rng.sample(text, min(8, len(text)))
    whole = [
        (STDLIB / name).read_text(encoding="utf-8") for name in ("argparse.py", "typing.py", "textwrap.py")
    ]
    assert len(lines) > 300
    indented = [
        " " * n + line for n in range(1, 49) for line in ("return x", "# note", '"""doc"""', "\tpass")
    ]
    return lines + whole + indented + EDGE_CASES


def _hf(tok: Tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok.path.parent), local_files_only=True)


def _proto(tok: Tokenizer):
    proto = spm_pb.ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    return proto


# -- sentencepiece ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_special_ids(trained, model_type):
    tok, _ = trained[model_type]
    sp = tok.sp
    assert [sp.id_to_piece(i) for i in range(13)] == RESERVED + SPARES
    assert (tok.pad_id, tok.bos_id, tok.eos_id, sp.unk_id(), tok.mask_id) == (0, 1, 2, 3, 4)
    assert all(sp.is_control(i) for i in (0, 1, 2, 4, *range(5, 13)))
    assert sp.is_unknown(3)
    assert tok.vocab_size == VOCAB
    assert tok.describe()["mask_id"] == 4 and tok.describe()["vocab_size"] == VOCAB
    # Text never produces a reserved id, not even when it spells one.
    for text in EDGE_CASES + [UNICODE_TEXT]:
        assert not set(tok.encode(text)) & set(range(13)), text
    assert tok.decode(tok.encode("<mask>")) == "<mask>" and len(tok.encode("<mask>")) > 1


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("text", EDGE_CASES + [UNICODE_TEXT], ids=range(len(EDGE_CASES) + 1))
def test_round_trip(trained, model_type, text):
    tok, _ = trained[model_type]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert (ids == []) == (text == "")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_code_keeps_whitespace(trained, model_type):
    tok, _ = trained[model_type]
    code = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    assert tok.decode(tok.encode(code)) == code
    pieces = tok.sp.encode("        return x", out_type=str)
    assert "".join(pieces).replace("\u2581", " ") == "        return x"
    assert any(set(p) == {"\u2581"} and len(p) >= 4 for p in pieces), pieces  # indentation pieces


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_digits_are_split(trained, model_type):
    tok, _ = trained[model_type]
    proto = _proto(tok)
    normal = [p.piece for p in proto.pieces if p.type == hf_tokenizer.NORMAL]
    assert set("0123456789") <= set(normal)
    assert all(len(p) == 1 for p in normal if any(c.isascii() and c.isdigit() for c in p))
    number = "31415926535897932384626433832795"
    assert tok.encode(number) == [tok.sp.piece_to_id(c) for c in number]
    pieces = tok.sp.encode("x = 2048 + 1024", out_type=str)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("20481024")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_byte_fallback(trained, model_type):
    tok, _ = trained[model_type]
    sp = tok.sp
    for char in ["\ue000", "\U00013000", "\U0010fffd", "龘", "\x07"]:
        assert sp.piece_to_id(char) == sp.unk_id(), f"{char!r} should be outside the vocabulary"
        expected = [sp.piece_to_id(f"<0x{b:02X}>") for b in char.encode("utf-8")]
        assert tok.encode(char) == expected
        assert all(sp.is_byte(i) for i in expected)
        assert tok.decode(expected) == char
    text = "ok \ue000 then \U00013000 and 龘."
    ids = tok.encode(text)
    assert sp.unk_id() not in ids
    assert tok.decode(ids) == text


def test_unigram_model_is_finalized(trained):
    """Scores are multiples of 1/16, the characters spelling special pieces are pieces,
    and the model does not record where it was written."""
    tok, _ = trained["unigram"]
    proto = _proto(tok)
    scores = [p.score for p in proto.pieces if p.type == hf_tokenizer.NORMAL]
    assert all(s * 16 == int(s * 16) for s in scores)
    assert len(set(scores)) < len(scores)  # ties exist: exactly what both sides must break alike
    normal = {p.piece for p in proto.pieces if p.type == hf_tokenizer.NORMAL}
    assert set("".join(hf_tokenizer.special_pieces(8))) <= normal
    assert proto.trainer_spec.model_prefix == "tokenizer"
    vocab = tok.path.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t") for line in vocab] == [[p.piece, f"{p.score:g}"] for p in proto.pieces]
    bpe = _proto(trained["bpe"][0])
    assert bpe.trainer_spec.model_prefix == "tokenizer"
    bpe_scores = [p.score for p in bpe.pieces if p.type == hf_tokenizer.NORMAL]
    assert bpe_scores == sorted(bpe_scores, reverse=True) and len(set(bpe_scores)) == len(bpe_scores)


# -- Hugging Face twin -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hf_files_and_special_tokens(trained, model_type):
    tok, _ = trained[model_type]
    out = tok.path.parent
    for name in HF_FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and not (out / "chat_template.jinja").exists()
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["model_max_length"] == hf_tokenizer.NO_MAX_LENGTH
    assert config["dlm_sentencepiece_sha256"] == tok.sha256
    special_map = json.loads((out / "special_tokens_map.json").read_text())
    assert special_map["mask_token"] == "<mask>" and special_map["additional_special_tokens"] == SPARES

    hf = _hf(tok)
    assert hf.is_fast
    assert (hf.pad_token, hf.bos_token, hf.eos_token, hf.unk_token, hf.mask_token) == tuple(RESERVED)
    special_ids = (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id)
    assert special_ids == (0, 1, 2, 3, 4)
    assert sorted(hf.all_special_ids) == list(range(13))
    assert len(hf) == tok.vocab_size
    assert hf.convert_ids_to_tokens(list(range(tok.vocab_size))) == [
        tok.sp.id_to_piece(i) for i in range(tok.vocab_size)
    ]
    assert hf.chat_template is None
    # Typed special-token text is text, as in sentencepiece.
    for text in ["<mask>", "a <mask> b", "<s>hello</s>", "<pad><unk><extra_3>", "<0x41>"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text) and not set(ids) & set(range(13)), text
    # add_special_tokens=True adds nothing; decode drops special ids only on request.
    assert hf("hello world")["input_ids"] == tok.encode("hello world")
    ids = [tok.bos_id, *tok.encode("hello world"), tok.mask_id, tok.eos_id, tok.pad_id]
    assert hf.decode(ids, skip_special_tokens=True) == "hello world"
    assert hf.decode(ids) == "<s>hello world<mask></s><pad>"
    assert tok.decode(ids) == "hello world"  # sentencepiece drops control ids


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hf_ids_equal_sentencepiece(trained, held_out, model_type):
    tok, _ = trained[model_type]
    hf = _hf(tok)
    want = tok.encode_batch(held_out)
    got = hf(held_out, add_special_tokens=False)["input_ids"]
    mismatches = [
        (text[:60], g[:12], w[:12]) for text, g, w in zip(held_out, got, want, strict=True) if g != w
    ]
    assert not mismatches, mismatches[:5]
    assert hf(held_out)["input_ids"] == want  # add_special_tokens=True: the same ids
    for text, ids in zip(held_out, want, strict=True):
        decoded = hf.decode(ids)
        assert decoded == tok.decode(ids)
        assert decoded == text or "\u2581" in text  # a literal '▁' comes back as ' ', in both
    some = held_out[:50] + EDGE_CASES
    assert [hf.tokenize(t) for t in some] == [tok.sp.encode(t, out_type=str) for t in some]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hf_ids_equal_sentencepiece_adversarial(trained, model_type):
    """Random concatenations of vocabulary pieces (those with several splits into two
    pieces first: where BPE merge order could matter) and runs over tiny alphabets."""
    tok, _ = trained[model_type]
    hf = _hf(tok)
    proto = _proto(tok)
    normal = [p.piece for p in proto.pieces if p.type == hf_tokenizer.NORMAL]
    pset = set(normal)
    multi = [p for p in normal if sum(p[:k] in pset and p[k:] in pset for k in range(1, len(p))) > 1]
    assert multi
    rng = random.Random(7)
    texts = []
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.4:
            text = "".join(rng.choice(multi) for _ in range(rng.randint(1, 10)))
        elif kind < 0.7:
            text = "".join(rng.choice(normal) for _ in range(rng.randint(1, 10)))
        else:
            alphabet = rng.choice(
                [" =", " -", "ab", "aab", " \t", "<>s/", "e\u0301", "0x", "▁ "]
            ) + rng.choice(normal)
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        texts.append(text.replace("\u2581", " "))
    got = hf(texts, add_special_tokens=False)["input_ids"]
    want = tok.encode_batch(texts)
    mismatches = [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if g != w]
    assert not mismatches, mismatches[:3]


def test_hf_export_is_deterministic_and_self_checked(trained, tmp_path, monkeypatch):
    tok, _ = trained["bpe"]
    hf_tokenizer.export_hf(tok, tmp_path / "again")
    for name in HF_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tok.path.parent / name).read_bytes(), name
    hf_tokenizer.export_hf(tok, tmp_path / "short", model_max_length=2048)
    assert json.loads((tmp_path / "short" / "tokenizer_config.json").read_text())["model_max_length"] == 2048

    # The export compares itself with sentencepiece: a broken twin is refused, not written.
    build = hf_tokenizer.build_hf_tokenizer

    def broken(proto: bytes):
        hf = build(proto)
        hf.normalizer = None  # spaces no longer become '▁'
        return hf

    monkeypatch.setattr(hf_tokenizer, "build_hf_tokenizer", broken)
    with pytest.raises(RuntimeError, match="differs from sentencepiece"):
        hf_tokenizer.export_hf(tok, tmp_path / "broken")
    assert not (tmp_path / "broken" / "tokenizer.json").exists()


def _train_raw(tmp_path: Path, name: str, lines: list[str], **options) -> Tokenizer:
    kwargs = dict(
        model_type="unigram",
        vocab_size=350,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        control_symbols=["<mask>", *SPARES],
        minloglevel=2,
        num_threads=1,
    )
    kwargs.update(options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / name), **kwargs)
    return Tokenizer(tmp_path / f"{name}.model")


def test_export_refuses_models_it_cannot_reproduce(tmp_path):
    rng = random.Random(0)
    lines = [
        " ".join("".join(rng.choice("ghijlo") for _ in range(rng.randint(1, 8))) for _ in range(8))
        for _ in range(1000)
    ]
    # Default sentencepiece normalisation (NFKC, dummy prefix, collapsed spaces).
    nfkc = _train_raw(
        tmp_path,
        "nfkc",
        lines,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
    )
    with pytest.raises(ValueError, match="nmt_nfkc"):
        hf_tokenizer.export_hf(nfkc, tmp_path / "nfkc_hf")
    # Unigram scores as trained (float32 ties broken differently by sentencepiece and tokenizers).
    raw = _train_raw(tmp_path, "raw", lines, **hf_tokenizer.training_options("unigram", 8))
    with pytest.raises(ValueError, match="multiples of"):
        hf_tokenizer.export_hf(raw, tmp_path / "raw_hf")
    # Quantised, but '<', '>', 'x', digits... are not pieces: "<s>" would match the control piece.
    hf_tokenizer.finalize_model(tmp_path / "raw.model")
    bare = _train_raw(tmp_path, "bare", lines)
    hf_tokenizer.finalize_model(tmp_path / "bare.model")
    with pytest.raises(ValueError, match="not pieces"):
        hf_tokenizer.export_hf(Tokenizer(tmp_path / "bare.model"), tmp_path / "bare_hf")
    assert bare.sp.piece_to_id("<") == bare.sp.unk_id()
    # With the required characters (what `dlm tokenizer` trains with) the same corpus exports.
    fixed = Tokenizer(tmp_path / "raw.model")
    hf_tokenizer.export_hf(fixed, tmp_path / "fixed_hf")
    hf = hf_tokenizer.build_hf_tokenizer(fixed.sp.serialized_model_proto())
    hf.encode_special_tokens = True
    for text in ["<s>", "<mask> gh <0x41>", "ghi<extra_7>jl", "hij </s>\n"]:
        assert hf.encode(text).ids == fixed.encode(text), text
        assert 4 not in fixed.encode(text) and 1 not in fixed.encode(text)


# -- the command ------------------------------------------------------------------------------------------
def _dlm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "tokenizer", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _seed_inputs(root: Path) -> dict:
    """Good documents plus one of every kind of bad input; returns the expected counts."""
    root.mkdir(parents=True)
    good_files = sorted((STDLIB / "json").glob("*.py"))
    for path in good_files:
        (root / path.name).write_bytes(path.read_bytes())
    records = [
        json.dumps({"text": "first good record\nwith two lines"}),
        '{"text": "unterminated',  # 2: malformed_json
        json.dumps({"text": "second good record"}),
        json.dumps({"body": "no text field"}),  # 4: missing_field
        "",  # 5: empty_document (blank line)
        json.dumps({"text": 42}),  # 6: invalid_field_type
        json.dumps({"text": "   "}),  # 7: empty_document
        json.dumps({"text": "third good record: ünïcödé 日本"}),
    ]
    (root / "records.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # invalid_utf8
    (root / "blob.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00binary")  # binary_file
    (root / "empty.txt").write_bytes(b"")  # empty_document
    return {
        "documents_used": len(good_files) + 3,
        "documents_skipped": {
            "malformed_json": 1,
            "missing_field": 1,
            "empty_document": 3,
            "invalid_field_type": 1,
            "invalid_utf8": 1,
            "binary_file": 1,
        },
    }


def test_cli_end_to_end_accounts_for_bad_inputs(tmp_path):
    inputs = tmp_path / "in"
    expected = _seed_inputs(inputs)
    out = tmp_path / "out"
    proc = _dlm(f"input=[{inputs}]", f"output={out}", "vocab_size=400", "name=code")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "code.model").is_file()
    for name in HF_FILES:
        assert (out / name).is_file(), name
    report = json.loads((out / "code.report.json").read_text())
    assert report["documents_used"] == expected["documents_used"]
    assert report["documents_skipped"] == expected["documents_skipped"]
    total = expected["documents_used"] + sum(expected["documents_skipped"].values())
    assert (
        report["documents_read"]
        == total
        == report["documents_used"] + sum(report["documents_skipped"].values())
    )
    examples = "\n".join(report["skipped_examples"])
    for where, reason in [
        (f"{inputs}/records.jsonl:2", "malformed_json"),
        (f"{inputs}/records.jsonl:4", "missing_field"),
        (f"{inputs}/records.jsonl:5", "empty_document"),
        (f"{inputs}/records.jsonl:6", "invalid_field_type"),
        (f"{inputs}/records.jsonl:7", "empty_document"),
        (f"{inputs}/latin1.txt", "invalid_utf8"),
        (f"{inputs}/blob.bin", "binary_file"),
        (f"{inputs}/empty.txt", "empty_document"),
    ]:
        assert f"{where}: {reason}" in examples
        assert f"{where}: {reason}" in proc.stdout, proc.stdout
    assert report["tokenizer"]["vocab_size"] == 400 and report["tokenizer"]["mask_id"] == 4
    tok = Tokenizer(out / "code.model")
    assert report["tokenizer"]["sha256"] == tok.sha256
    hf = _hf(tok)
    text = "def decode(self, s):\n    return  json.loads(s)  # ünïcödé 日本 <mask>\n"
    assert hf(text)["input_ids"] == tok.encode(text) and tok.decode(tok.encode(text)) == text

    # a rerun with the same settings (another thread count) keeps the model; other settings retrain
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _dlm(f"input=[{inputs}]", f"output={out}", "vocab_size=400", "name=code", "num_threads=1")
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "code.model").write_bytes((out / "code.model").read_bytes() + b"x")  # not what the report names
    redo = _dlm(f"input=[{inputs}]", f"output={out}", "vocab_size=400", "name=code")
    assert redo.returncode == 0 and "up to date" not in redo.stdout
    recorded = json.loads((out / "code.report.json").read_text())["tokenizer"]["sha256"]
    assert Tokenizer(out / "code.model").sha256 == recorded


def test_cli_on_error_fail_names_file_and_line(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("a good document " * 200)
    (inputs / "b.jsonl").write_text(
        '{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n{"text": "never read"}\n'
    )
    out = tmp_path / "out"
    proc = _dlm(f"input=[{inputs}]", f"output={out}", "vocab_size=300", "on_error=fail")
    assert proc.returncode == 1
    assert f"{inputs}/b.jsonl:3: malformed_json" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "tokenizer.model").exists()


def test_training_errors_are_reported_not_crashes(tmp_path):
    """sentencepiece wraps errors of the sentence iterator in RuntimeError; the trainer
    re-raises the InputError (file:line), and reports other failures as ValueError."""
    from data.sources import InputError

    (tmp_path / "a.txt").write_text("tiny corpus " * 50)
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    cfg = TokenizerConfig(input=[str(tmp_path / "a.txt")], output=str(tmp_path / "o1"), vocab_size=8000)
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_tokenizer(cfg)
    cfg = TokenizerConfig(input=[str(tmp_path)], output=str(tmp_path / "o2"), vocab_size=300, on_error="fail")
    with pytest.raises(InputError, match=f"^{tmp_path}/b.jsonl:2: missing_field"):
        train_tokenizer(cfg)


def test_cli_missing_output_exits_2(tmp_path):
    proc = _dlm(f"input=[{tmp_path}]")
    assert proc.returncode == 2
    assert "output" in proc.stderr and "invalid configuration" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_training_is_deterministic(trained, tmp_path, model_type):
    """Same inputs and seed, another output directory: the same bytes (model and HF files)."""
    tok, inputs = trained[model_type]
    cfg = TokenizerConfig(input=inputs, output=str(tmp_path), vocab_size=VOCAB, model_type=model_type)
    path, report = train_tokenizer(cfg)
    assert path.read_bytes() == tok.path.read_bytes()
    assert report["documents_read"] == report["documents_used"] > 0
    hf_tokenizer.export_hf(Tokenizer(path), tmp_path)
    for name in HF_FILES:
        assert (tmp_path / name).read_bytes() == (tok.path.parent / name).read_bytes(), name


# -- Hugging Face tokenizers (tokenizer.json) for `dlm prepare` / `dlm train` -------------------------------
def build_hf_tokenizer(
    out: Path,
    *,
    vocab_size: int = 500,
    eos: str | None = "</s>",
    mask: str | None = None,
    extra_tokens: int = 0,
    config: str = "tokenizer_config.json",
) -> Path:
    """A tiny byte-level BPE trained on stdlib/json, saved as `out/tokenizer.json` with the
    special tokens named in `out/<config>` (tokenizer_config.json or special_tokens_map.json)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    hf = Backend(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = [t for t in ("</s>", mask) if t]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(p) for p in sorted((STDLIB / "json").glob("*.py"))], trainer)
    if extra_tokens:
        hf.add_tokens([f"\u2603{i}\u2603" for i in range(extra_tokens)])
    hf.save(str(out / "tokenizer.json"))
    values = {"eos_token": eos}
    if mask:  # special_tokens_map.json: the dict form
        values["mask_token"] = {"content": mask, "special": True} if config.startswith("special") else mask
    (out / config).write_text(json.dumps(values))
    return out


def test_load_tokenizer_dispatches_on_the_path(trained, tmp_path):
    from data.tokenizer import HFTokenizer, load_tokenizer

    sp = trained["bpe"][0]
    assert type(load_tokenizer(sp.path)) is Tokenizer
    hf_dir = build_hf_tokenizer(tmp_path / "hf")
    for path in (hf_dir, hf_dir / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert isinstance(tok, HFTokenizer) and tok.path == hf_dir / "tokenizer.json" and tok.name == "hf"
    with pytest.raises(FileNotFoundError, match="without a tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")


@pytest.mark.parametrize("mask", [None, "<mask>"])
def test_hf_tokenizer_ids_equal_tokenizers_and_auto_tokenizer(tmp_path, held_out, mask):
    import hashlib

    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    from data.tokenizer import HFTokenizer

    out = build_hf_tokenizer(tmp_path / "hf", mask=mask)
    tok = HFTokenizer(out)
    backend = Backend.from_file(str(out / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(out))
    d = tok.describe()
    assert d["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert d["vocab_size"] == backend.get_vocab_size(with_added_tokens=True) == len(auto) == 500
    assert d["eos_id"] == backend.token_to_id("</s>") == auto.eos_token_id == 0
    assert d["pad_id"] is None and d["bos_id"] is None
    assert d["mask_id"] == (backend.token_to_id(mask) if mask else None) == auto.mask_token_id
    texts = [*held_out[:20], UNICODE_TEXT, "", " ", "a </s> b", *EDGE_CASES]
    batch = tok.encode_batch(texts)
    arrays = tok.encode_batch_numpy(texts)
    for text, ids, arr in zip(texts, batch, arrays, strict=True):
        assert ids == tok.encode(text) == backend.encode(text, add_special_tokens=False).ids
        assert ids == auto(text, add_special_tokens=False).input_ids
        assert arr.tolist() == ids
        assert tok.decode(ids) == text


def test_hf_tokenizer_special_tokens_map_and_errors(tmp_path):
    from data.tokenizer import HFTokenizer

    mapped = build_hf_tokenizer(tmp_path / "map", mask="[MASK]", config="special_tokens_map.json")
    tok = HFTokenizer(mapped)
    assert tok.eos_id == 0 and tok.mask_id == 1
    none = build_hf_tokenizer(tmp_path / "noeos", eos=None)
    with pytest.raises(ValueError, match="no eos_token") as e:
        HFTokenizer(none)
    assert str(none / "tokenizer_config.json") in str(e.value)
    (none / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="no eos_token") as e:
        HFTokenizer(none / "tokenizer.json")
    assert str(none / "tokenizer_config.json") in str(e.value)
    (none / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not-there|>"}))
    with pytest.raises(ValueError, match="not in its vocabulary"):
        HFTokenizer(none)


def test_token_dtype_widens_past_uint16(tmp_path):
    from data.shards import token_dtype
    from data.tokenizer import HFTokenizer

    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    big = HFTokenizer(build_hf_tokenizer(tmp_path / "big", extra_tokens=66_000))
    assert big.vocab_size == 66_500 and token_dtype(big.vocab_size) == "uint32"
    assert big.encode("\u260365999\u2603") == [66_499]


def test_hf_tokenizer_ignores_truncation_and_padding_of_tokenizer_json(tmp_path):
    """A tokenizer.json may carry truncation/padding for model inputs: documents stay whole."""
    from tokenizers import Tokenizer as Backend

    from data.tokenizer import HFTokenizer

    out = build_hf_tokenizer(tmp_path / "hf")
    backend = Backend.from_file(str(out / "tokenizer.json"))
    text = (STDLIB / "json" / "decoder.py").read_text()
    whole, short = (backend.encode(t, add_special_tokens=False).ids for t in (text, "x"))
    backend.enable_truncation(16)
    backend.enable_padding(length=8)
    backend.save(str(out / "tokenizer.json"))
    assert len(Backend.from_file(str(out / "tokenizer.json")).encode(text).ids) == 16  # as saved
    tok = HFTokenizer(out)
    assert len(whole) > 100 and tok.encode(text) == whole
    assert [a.tolist() for a in tok.encode_batch_numpy([text, "x"])] == [whole, short]


def test_exact_sum_chars_bounds_exact_float32_path_scores():
    """Sums of up to exact_sum_chars scores, accumulated in float32 as sentencepiece's unigram
    does, are exact; well past the bound they are not; a non-dyadic score shrinks the bound."""
    import numpy as np

    from data.tokenizer import exact_sum_chars

    rng = np.random.default_rng(0)
    sixteenths = np.arange(1, 400)  # scores -k/16, as `dlm tokenizer` quantizes them
    n = exact_sum_chars((-sixteenths / 16).tolist(), 24, prefix_chars=0)
    for path in (np.full(n, sixteenths.max()), rng.choice(sixteenths, n)):
        assert np.cumsum(-path / 16, dtype=np.float32)[-1] * 16 == -path.sum()
    far = rng.choice(sixteenths, 8 * n)
    assert np.cumsum(-far / 16, dtype=np.float32)[-1] * 16 != -far.sum()
    assert exact_sum_chars([-0.1, -5.0], 24) < exact_sum_chars([-0.125, -5.0], 24) // 1000
