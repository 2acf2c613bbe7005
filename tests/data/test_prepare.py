"""`dlm prepare`: input accounting, token stream fidelity (read back through data/shards.py
and compared with an independent Tokenizer.encode of every document), segments, worker
independence, chunking, eval split, idempotent re-runs, exact resume after an
interruption (injected faults and a real kill -9), refusal to mix configurations, the CLI.
Tiny tokenizers trained on local text: no downloads."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from data import prepare
from data.config import PrepareConfig, TokenizerConfig
from data.prepare import PrepareError, run, split_text
from data.shards import FORMAT, ShardLocation, load_manifest, read_shard, sha256_file
from data.sources import DocumentReader, resolve_inputs
from data.tokenizer import Tokenizer, train_tokenizer
from tests.dist import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"])
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
NAMES = ["self", "json", "return", "scan", "_once", "decode", "obj", "end", *WORDS]


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "words.txt").write_text(_prose(random.Random(0), 400, newlines=True))
    path, _ = train_tokenizer(
        TokenizerConfig(
            input=[str(STDLIB / "json"), str(root / "words.txt")], output=str(root), vocab_size=400
        )
    )
    return path


@pytest.fixture(scope="module")
def tok(tok_path) -> Tokenizer:
    return Tokenizer(tok_path)


def _prose(rng: random.Random, words: int, newlines: bool = False) -> str:
    out = []
    for i in range(words):
        out.append(rng.choice(WORDS))
        out.append("\n" if newlines and i % 11 == 10 else " " * rng.choice([1, 1, 1, 2, 4]))
    return "".join(out).strip() + f" {rng.randrange(10**6)}"


def _seed_corpus(root: Path) -> dict:
    """Good documents plus every kind of bad input; the expected accounting."""
    root.mkdir(parents=True)
    good_py = sorted((STDLIB / "json").glob("*.py"))
    for path in good_py:
        (root / path.name).write_bytes(path.read_bytes())
    records = [
        json.dumps({"text": "first good record\nwith two lines"}).encode(),
        b'{"text": "unterminated',  # 2: malformed_json
        json.dumps({"text": "second good record"}).encode(),
        json.dumps({"body": "no text field"}).encode(),  # 4: missing_field
        b"",  # 5: empty_document (blank line)
        json.dumps({"text": 42}).encode(),  # 6: invalid_field_type
        json.dumps({"text": "   "}).encode(),  # 7: empty_document
        json.dumps({"text": "third good record: ünïcödé 日本"}, ensure_ascii=False).encode(),
        b'{"text": "bad \xff byte"}',  # 9: invalid_utf8
    ]
    (root / "records.jsonl").write_bytes(b"\n".join(records) + b"\n")
    gz_records = [json.dumps({"text": f"gzipped record {i}: " + "lorem ipsum " * 20}) for i in range(2)]
    (root / "packed.jsonl.gz").write_bytes(gzip.compress(("\n".join(gz_records) + "\n").encode()))
    (root / "notes.txt.gz").write_bytes(gzip.compress(b"a gzipped text document\n" * 30))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # invalid_utf8
    (root / "blob.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00binary")  # binary_file
    (root / "empty.txt").write_bytes(b"")  # empty_document
    (root / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not deflate data")  # unreadable_file
    return {
        "written": len(good_py) + 3 + 2 + 1,
        "skipped": {
            "malformed_json": 1,
            "missing_field": 1,
            "empty_document": 3,
            "invalid_field_type": 1,
            "invalid_utf8": 2,
            "binary_file": 1,
            "unreadable_file": 1,
        },
        "places": [
            ("records.jsonl:2", "malformed_json"),
            ("records.jsonl:4", "missing_field"),
            ("records.jsonl:5", "empty_document"),
            ("records.jsonl:6", "invalid_field_type"),
            ("records.jsonl:7", "empty_document"),
            ("records.jsonl:9", "invalid_utf8"),
            ("latin1.txt", "invalid_utf8"),
            ("blob.bin", "binary_file"),
            ("empty.txt", "empty_document"),
            ("corrupt.txt.gz", "unreadable_file"),
        ],
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus") / "in"
    return root, _seed_corpus(root)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """300 distinct JSONL documents of varied length, and a text file."""
    root = tmp_path_factory.mktemp("many")
    rng = random.Random(1)
    lines = [
        json.dumps({"text": f"doc {i}: " + _prose(rng, rng.randrange(5, 120), newlines=True)})
        for i in range(300)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "decoder.py").write_bytes((STDLIB / "json" / "decoder.py").read_bytes())
    return root


def _cfg(inputs, out, tok_path, **kw) -> PrepareConfig:
    base = dict(seq_len=64, samples_per_shard=8, workers=1, progress=False)
    base.update(kw)
    return PrepareConfig(input=[str(i) for i in inputs], output=str(out), tokenizer=str(tok_path), **base)


def _stream(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split in order (tokens, segments) [n, seq_len], checking keys."""
    manifest = load_manifest(out)
    loc = ShardLocation(str(out))
    toks, segs, keys = [], [], []
    for i, shard in enumerate(manifest["splits"][split]["shards"]):
        assert shard["name"] == f"{split}-{i:05d}.tar"
        assert (
            shard["sha256"] == sha256_file(out / shard["name"])
            and shard["bytes"] == (out / shard["name"]).stat().st_size
        )
        n = 0
        for key, t, s in read_shard(loc, shard["name"], seq_len=manifest["seq_len"], dtype=manifest["dtype"]):
            keys.append(key)
            toks.append(t.astype(np.int64))
            segs.append(s.astype(np.int64))
            n += 1
        assert n == shard["samples"]
    assert keys == list(range(len(keys)))
    assert len(keys) == manifest["splits"][split]["samples"]
    seq_len = manifest["seq_len"]
    empty = np.zeros((0, seq_len), dtype=np.int64)
    return (np.stack(toks), np.stack(segs)) if toks else (empty, empty)


def _expected(tok, inputs) -> list[tuple[str, np.ndarray, int, int]]:
    """(where, ids + EOS, file number, document number in the file) of every document, each
    encoded whole, independently of data/prepare.py."""
    docs = []
    for file_number, path in enumerate(resolve_inputs([str(i) for i in inputs])):
        for number, doc in enumerate(DocumentReader([str(path)])):
            docs.append(
                (
                    doc.where,
                    np.array([*tok.encode(doc.text), tok.eos_id], dtype=np.int64),
                    file_number,
                    number,
                )
            )
    return docs


def _assign(docs, streams: dict[str, np.ndarray], seed: int, fraction: float) -> dict[str, list[int]]:
    """Walk the documents in order: each must continue exactly one split's stream. A document
    that runs into a dropped tail matches no stream in full; only there is its split taken
    from prepare.is_eval. Returns the document numbers per split."""
    pos = {s: 0 for s in streams}
    got: dict[str, list[int]] = {s: [] for s in streams}
    for n, (where, ids, file_number, number) in enumerate(docs):
        full = [s for s, st in streams.items() if np.array_equal(st[pos[s] : pos[s] + ids.size], ids)]
        assert len(full) <= 1, (where, full)
        if full:
            split = full[0]
        else:
            split = "eval" if prepare.is_eval(seed, file_number, number, fraction) else "train"
            part = streams[split][pos[split] :]
            assert part.size < ids.size and np.array_equal(part, ids[: part.size]), (where, split)
        got[split].append(n)
        pos[split] += ids.size
    for s, stream in streams.items():
        assert pos[s] >= stream.size, f"{s}: tokens after the last document"
    return got


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in out.iterdir()}


def _contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _dlm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "prepare", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- text cutting ------------------------------------------------------------------------------------------
def _anywhere(left: str, right: str) -> bool:
    return True


def test_split_text_cuts_at_newline_then_space_then_anywhere():
    code = (STDLIB / "json" / "decoder.py").read_text()
    pieces = split_text(code, 500, _anywhere)
    assert "".join(pieces) == code and len(pieces) > 10
    assert all(len(p) <= 500 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])  # lines are < 250 characters: always a newline
    prose = "word  " * 50 + "tail"  # 304 characters, spaces only
    pieces = split_text(prose, 100, _anywhere)
    assert "".join(pieces) == prose and all(len(p) <= 100 for p in pieces)
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert not a.endswith(" ") and b.startswith("  "), (a, b)  # before the whole run of spaces
    solid = "x" * 250
    assert split_text(solid, 100, _anywhere) == ["x" * 100, "x" * 100, "x" * 50]
    assert split_text("short", 100, _anywhere) == ["short"]
    assert split_text("a b c", 1, _anywhere) == ["a", " ", "b", " ", "c"]
    assert split_text("ab\ncd\n", 3, _anywhere) == ["ab\n", "cd\n"]
    # a newline in the first half of the window is too early: cut at the space instead
    assert split_text("a\nbcdefgh ij", 10, _anywhere) == ["a\nbcdefgh", " ij"]


def test_split_text_cuts_only_where_allowed():
    text = "ab\ncd ef\ngh ij\nkl"
    assert split_text(text, 8, lambda a, b: a != "\n") == ["ab\ncd", " ef\ngh", " ij\nkl"]  # spaces instead
    assert split_text(text, 8, lambda a, b: b == "f") == ["ab\ncd e", "f\ngh ij\nkl"]
    assert split_text(text, 8, lambda a, b: a + b == "ij") == ["ab\ncd ef\ngh i", "j\nkl"]  # past the window
    assert split_text(text, 8, lambda a, b: False) == [text]
    digits = "1234567890" * 30
    allowed = split_text(digits, 50, lambda a, b: a == "0")
    assert "".join(allowed) == digits and all(p.endswith("0") for p in allowed[:-1]) and len(allowed) >= 6


# -- accounting --------------------------------------------------------------------------------------------
def test_bad_inputs_reconcile_and_are_named(corpus, tok_path, tmp_path, capsys, monkeypatch):
    inputs, expected = corpus
    manifest = run(_cfg([inputs], tmp_path / "out", tok_path))
    printed = capsys.readouterr().out
    assert manifest["format"] == FORMAT and manifest == load_manifest(tmp_path / "out")
    assert manifest["documents_written"] == expected["written"]
    assert manifest["documents_skipped"] == dict(sorted(expected["skipped"].items()))
    total = expected["written"] + sum(expected["skipped"].values())
    assert manifest["documents_read"] == total
    assert manifest["documents_read"] == manifest["documents_written"] + sum(
        manifest["documents_skipped"].values()
    )
    examples = "\n".join(manifest["skipped_examples"])
    for where, reason in expected["places"]:
        assert f"{inputs}/{where}: {reason}" in examples
    assert len(expected["places"]) == 10  # the console prints the first 10 examples
    for where, reason in expected["places"]:
        assert f"skipped {inputs}/{where}: {reason}" in printed, printed
    for reason, n in expected["skipped"].items():
        assert f"'{reason}': {n}" in printed
    summary = printed.splitlines()[0]
    assert f"{expected['written']} documents -> {manifest['tokens']:,} tokens" in summary
    assert f"{manifest['samples']:,} samples" in summary and "tokens/s" in summary and " s (" in summary
    # per input file
    entries = {Path(e["path"]).name: e for e in manifest["inputs"]}
    assert manifest["inputs_by"] == "file" and len(entries) == len(list(inputs.iterdir()))
    rec = entries["records.jsonl"]
    assert (rec["documents_read"], rec["documents_written"]) == (9, 3)
    assert rec["documents_skipped"] == {
        "empty_document": 2,
        "invalid_field_type": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
    }
    assert rec["bytes"] == rec["size"] == (inputs / "records.jsonl").stat().st_size
    assert entries["packed.jsonl.gz"]["documents_written"] == 2
    assert entries["packed.jsonl.gz"]["bytes"] > entries["packed.jsonl.gz"]["size"]  # decompressed
    assert entries["corrupt.txt.gz"]["documents_skipped"] == {"unreadable_file": 1}
    assert sum(e["documents_read"] for e in entries.values()) == total
    assert sum(e["documents_written"] for e in entries.values()) == expected["written"]
    # above MAX_INPUT_ENTRIES files the list is per input argument
    monkeypatch.setattr(prepare, "MAX_INPUT_ENTRIES", 3)
    extra = tmp_path / "extra.txt"
    extra.write_text("one more document")
    m2 = run(_cfg([inputs, extra], tmp_path / "out2", tok_path))
    assert m2["inputs_by"] == "input"
    assert [(e["input"], e["files"], e["documents_written"]) for e in m2["inputs"]] == [
        (str(inputs), len(entries), expected["written"]),
        (str(extra), 1, 1),
    ]
    assert m2["inputs"][0]["documents_skipped"] == dict(sorted(expected["skipped"].items()))


def test_document_without_ids_is_counted(many, tok_path, tmp_path, monkeypatch):
    """A document the tokenizer turns into no ids (cannot happen after the empty check with
    these tokenizers, simulated here) is skipped under its own reason and reconciles."""
    real = prepare._Encoder.inputs
    monkeypatch.setattr(
        prepare._Encoder, "inputs", lambda self, text: [] if text.startswith("doc 7:") else real(self, text)
    )
    m = run(_cfg([many], tmp_path / "out", tok_path))
    assert m["documents_skipped"] == {"no_tokens": 1}
    assert f"{many}/docs.jsonl:8: no_tokens" in m["skipped_examples"][0]
    assert m["documents_read"] == 301 and m["documents_written"] == 300
    entry = {Path(e["path"]).name: e for e in m["inputs"]}["docs.jsonl"]
    assert entry["documents_written"] == 299 and entry["documents_skipped"] == {"no_tokens": 1}


# -- token stream --------------------------------------------------------------------------------------------
def test_token_stream_segments_and_eval_split(many, corpus, tok, tok_path, tmp_path):
    inputs = [corpus[0], many]
    out = tmp_path / "out"
    m = run(_cfg(inputs, out, tok_path, eval_fraction=0.25, seed=3))
    seq_len = m["seq_len"]
    assert m["dtype"] == "uint16" and m["tokenizer"] == tok.describe()
    streams, segments = {}, {}
    for split in ("train", "eval"):
        t, s = _stream(out, split)
        assert t.shape[1] == seq_len and len(m["splits"][split]["shards"]) >= 2
        assert all(sh["samples"] == 8 for sh in m["splits"][split]["shards"][:-1])
        streams[split], segments[split] = t.reshape(-1), s
        # segments: 0 for the first (partial) document, +1 after every EOS, per sample
        for row, seg in zip(t, s, strict=True):
            eos_before = np.concatenate([[0], np.cumsum(row[:-1] == tok.eos_id)])
            assert np.array_equal(seg, eos_before)
    docs = _expected(tok, inputs)
    assigned = _assign(docs, streams, 3, 0.25)
    # eval: whole documents, disjoint from train, about eval_fraction of them
    assert not set(assigned["train"]) & set(assigned["eval"])
    assert len(assigned["train"]) + len(assigned["eval"]) == len(docs) == m["documents_written"]
    assert 0.15 < len(assigned["eval"]) / len(docs) < 0.35
    for split in ("train", "eval"):
        expect = np.concatenate([docs[n][1] for n in assigned[split]])
        n = streams[split].size
        assert np.array_equal(streams[split], expect[:n])  # the stream is every document + EOS, in order
        assert expect.size - n < seq_len  # only a tail shorter than seq_len is dropped
        assert m["splits"][split]["documents"] == len(assigned[split])
        assert m["splits"][split]["tokens"] == n and m["splits"][split]["samples"] == n // seq_len
    dropped = sum(sum(docs[i][1].size for i in assigned[s]) - streams[s].size for s in streams)
    assert m["tokens_dropped"] == dropped and m["tokens"] == m["samples"] * seq_len
    # segment numbers change exactly at document boundaries
    train_docs = [docs[i][1] for i in assigned["train"]]
    starts = np.cumsum([0] + [d.size for d in train_docs])[:-1]
    boundary = np.zeros(streams["train"].size + seq_len, dtype=bool)
    boundary[starts] = True
    seg = segments["train"]
    changes = np.concatenate([[True], seg.reshape(-1)[1:] != seg.reshape(-1)[:-1]])
    changes[::seq_len] = True  # every sample starts a numbering
    expected_changes = boundary[: streams["train"].size].copy()
    expected_changes[::seq_len] = True
    assert np.array_equal(changes, expected_changes)
    # the assignment comes from (seed, document number): another seed holds out other documents
    other = run(_cfg(inputs, tmp_path / "seed4", tok_path, eval_fraction=0.25, seed=4))
    streams4 = {s: _stream(tmp_path / "seed4", s)[0].reshape(-1) for s in ("train", "eval")}
    assert _assign(docs, streams4, 4, 0.25)["eval"] != assigned["eval"]
    assert other["documents_written"] == m["documents_written"]


def test_workers_1_and_2_write_identical_datasets(many, corpus, tok_path, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_DOCS", 7)  # many small tasks in flight, returned in order
    inputs = [corpus[0], many]
    one = run(_cfg(inputs, tmp_path / "w1", tok_path, eval_fraction=0.2, workers=1))
    two = run(_cfg(inputs, tmp_path / "w2", tok_path, eval_fraction=0.2, workers=2))
    assert one == two and one["samples"] > 40
    a, b = _contents(tmp_path / "w1"), _contents(tmp_path / "w2")
    assert list(a) == list(b) and len(a) > 5
    for name in a:
        assert a[name] == b[name], name


def test_long_documents_are_cut_before_encoding(tok, tok_path, tmp_path):
    code = (STDLIB / "json" / "decoder.py").read_text()
    rng = random.Random(5)
    prose = _prose(rng, 900)  # no newlines
    solid = "".join(rng.choice(NAMES) for _ in range(260))[:1300]  # no whitespace
    # cuts every 500 characters (as before there was tok.cuts) would change the ids of `solid`
    assert any(tok.encode(solid) != tok.encode(solid[:i]) + tok.encode(solid[i:]) for i in (500, 1000))
    root = tmp_path / "in"
    root.mkdir()
    for name, text in (("a_code.txt", code), ("b_prose.txt", prose), ("c_solid.txt", solid)):
        (root / name).write_text(text)
    out = tmp_path / "out"
    m = run(_cfg([root], out, tok_path, chunk_chars=500, seq_len=32))
    stream = _stream(out, "train")[0].reshape(-1)
    expect = np.concatenate([ids for _, ids, _, _ in _expected(tok, [root])])  # each document encoded whole
    assert np.array_equal(stream, expect[: stream.size]) and expect.size - stream.size < 32
    assert m["tokens_dropped"] == expect.size - stream.size
    # and the documents were cut: code after newlines, prose before spaces, the solid run
    # wherever no token of the vocabulary spans the cut
    encoder = prepare._Encoder(tok, "uint16", 500)
    code_pieces = [piece for _, piece in encoder.inputs(code)]
    assert len(code_pieces) > 20 and all(p.endswith("\n") for p in code_pieces[:-1])
    prose_pieces = [piece for _, piece in encoder.inputs(prose)]
    assert len(prose_pieces) > 5 and all(p.startswith(" ") for p in prose_pieces[1:])
    solid_pieces = [piece for _, piece in encoder.inputs(solid)]
    assert "".join(solid_pieces) == solid
    for a, b in zip(solid_pieces, solid_pieces[1:], strict=False):
        assert tok.cuts.allows(a[-1], b[0]) and not any(a[-1] + b[0] in piece for piece in _pieces(tok))


def _pieces(tok: Tokenizer) -> list[str]:
    return [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]


# -- chunking never changes the ids, for every kind of tokenizer ---------------------------------------------
def _long_document() -> str:
    """~6k characters: leading spaces, code (newlines, indentation), a ~1k-character line
    without newline, unicode (accents, combining marks, CJK, emoji), special-token text, a
    ~1600-character run without whitespace."""
    rng = random.Random(13)
    code = (STDLIB / "json" / "decoder.py").read_text()[:2500]
    prose = _prose(rng, 170)
    unicode = "naïve café — 日本語のテキストです。中文文本，한국어 텍스트 🎉👍🏽 e\u0301 ΑΣ ▁x\n" * 6
    solid = "".join(rng.choice(NAMES) for _ in range(300))
    return f"   {code}\n{prose}\n{unicode}\n中文 </s> <s>x</s>\n\n    {solid}\n  tail  "


def _hf_variant(sp_model: Path, out: Path, normalizer, pre_tokenizer) -> Path:
    """A tokenizer.json with the vocabulary of a `dlm tokenizer` model and another pipeline
    (Llama-2 style: a Prepend normaliser or a Metaspace pre-tokenizer), built locally."""
    from data.hf_tokenizer import build_hf_tokenizer

    hf = build_hf_tokenizer(sp_model.read_bytes())
    hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    out.mkdir(parents=True)
    hf.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return out


def _sp_with_dummy_prefix(out: Path) -> Path:
    """A sentencepiece BPE model trained as Llama-2's was (add_dummy_prefix), identity
    normalisation, with the special pieces `dlm prepare` needs."""
    import sentencepiece as spm

    out.mkdir(parents=True)
    lines = [line for p in sorted((STDLIB / "json").glob("*.py")) for line in p.read_text().splitlines()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()]),
        model_prefix=str(out / "llama"),
        vocab_size=400,
        model_type="bpe",
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        control_symbols=["<mask>"],
        minloglevel=2,
    )
    return out / "llama.model"


@pytest.fixture(scope="module")
def tokenizer_kinds(tmp_path_factory, tok_path) -> dict[str, Path]:
    from tokenizers import normalizers, pre_tokenizers

    from tests.data.test_tokenizer import build_hf_tokenizer

    root = tmp_path_factory.mktemp("kinds")
    unigram, _ = train_tokenizer(
        TokenizerConfig(
            input=[str(STDLIB / "json")], output=str(root / "uni"), vocab_size=400, model_type="unigram"
        )
    )
    legacy = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    kinds = {
        "sp-bpe": tok_path,
        "sp-unigram": unigram,
        "sp-dummy-prefix": _sp_with_dummy_prefix(root / "llama"),
        "hf-byte-level": build_hf_tokenizer(root / "bytelevel"),
    }
    for name, model in (("bpe", tok_path), ("unigram", unigram)):
        variants = {
            "twin": (normalizers.Replace(" ", "\u2581"), None),
            "legacy": (legacy, None),
            "metaspace-first": (None, pre_tokenizers.Metaspace(prepend_scheme="first", split=False)),
            "metaspace-always": (None, pre_tokenizers.Metaspace(prepend_scheme="always", split=False)),
            "nfc-metaspace-first": (
                normalizers.NFC(),
                pre_tokenizers.Metaspace(prepend_scheme="first", split=False),
            ),
            "metaspace-split": (None, pre_tokenizers.Metaspace(prepend_scheme="first", split=True)),
        }
        for variant, (norm, pre) in variants.items():
            kinds[f"hf-{variant}-{name}"] = _hf_variant(model, root / f"{variant}-{name}", norm, pre)
    return kinds


KINDS = [
    "sp-bpe",
    "sp-unigram",
    "sp-dummy-prefix",
    "hf-byte-level",
    *(
        f"hf-{v}-{m}"
        for m in ("bpe", "unigram")
        for v in (
            "twin",
            "legacy",
            "metaspace-first",
            "metaspace-always",
            "nfc-metaspace-first",
            "metaspace-split",
        )
    ),
]


@pytest.mark.parametrize("kind", KINDS)
def test_chunking_never_changes_the_ids(tokenizer_kinds, kind, tmp_path, monkeypatch):
    """A long document through `dlm prepare` with chunk_chars=200 gives exactly the ids of
    encoding it whole, for every kind of tokenizer; and where the tokenizer allows cuts, it
    was cut, at newlines and before spaces. Read in pieces (a whole-file document longer
    than TEXT_PIECE_BYTES), it gives the same shards, and the same Megatron document."""
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_kinds[kind])
    doc = _long_document()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "doc.txt").write_text(doc)
    out = tmp_path / "out"
    workers = 2 if kind == "hf-legacy-bpe" else 1
    m = run(_cfg([tmp_path / "in"], out, tokenizer_kinds[kind], chunk_chars=200, seq_len=8, workers=workers))
    stream = _stream(out, "train")[0].reshape(-1)
    whole = np.array([*tok.encode(doc), tok.eos_id])
    assert np.array_equal(stream, whole[: stream.size]) and m["tokens_dropped"] == whole.size - stream.size
    inputs = prepare._Encoder(tok, m["dtype"], 200).inputs(doc)
    assert "".join(piece for _, piece in inputs) == doc
    if tok.cuts is None:  # a model that sees pre-tokenized words: documents are encoded whole
        assert len(inputs) == 1
        return
    pieces = [piece for _, piece in inputs]
    assert len(pieces) > len(doc) // 400
    assert any(p.endswith("\n") for p in pieces[:-1]) and any(p[0] == " " and p[1] != " " for p in pieces[1:])
    assert all(
        before == (a[-1] if tok.cuts.context else "")
        for (before, _), a in zip(inputs[1:], pieces[:-1], strict=True)
    )
    _same_in_pieces(tok, tokenizer_kinds[kind], tmp_path, monkeypatch, whole, kind == "sp-dummy-prefix")


def _same_in_pieces(tok, tok_path, tmp_path, monkeypatch, whole, megatron: bool) -> None:
    from data.sources import DocumentReader, TextPieces

    monkeypatch.setattr(prepare, "TEXT_PIECE_BYTES", 1500)
    reader = DocumentReader(
        [str(tmp_path / "in")], pieces=TextPieces(1500, tok.cuts.allows, tok.cuts.max_chars)
    )
    assert len(list(reader)) > 2  # read in pieces
    run(_cfg([tmp_path / "in"], tmp_path / "pieces", tok_path, chunk_chars=200, seq_len=8))
    for path in (tmp_path / "out").iterdir():
        assert (tmp_path / "pieces" / path.name).read_bytes() == path.read_bytes(), path.name
    if megatron:  # one document, written piece by piece
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        run(_cfg([tmp_path / "in"], tmp_path / "mg", tok_path, chunk_chars=200, format="megatron"))
        dataset = IndexedDataset(str(tmp_path / "mg" / "train"))
        assert len(dataset) == 1 and np.array_equal(dataset[0], whole)


def test_no_cuts_in_documents_longer_than_exact_unigram_sums(tokenizer_kinds):
    """sentencepiece adds unigram path scores in float32: beyond `max_chars` a whole document's
    Viterbi may round differently than its pieces', so such documents are not cut."""
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_kinds["sp-unigram"])
    limit = tok.cuts.max_chars
    assert 1000 < limit < 10**6
    encoder = prepare._Encoder(tok, "uint16", 200)
    lines = (_long_document() * (limit // 5000 + 2)).splitlines(keepends=True)
    short = "".join(lines)[:limit]
    assert len(encoder.inputs(short)) > 10
    assert len(encoder.inputs(short + "x")) == 1


# -- re-runs -----------------------------------------------------------------------------------------------
def test_rerun_is_up_to_date_and_touches_nothing(many, tok_path, tmp_path, capsys):
    cfg = _cfg([many], tmp_path / "out", tok_path, eval_fraction=0.1)
    first = run(cfg)
    before = _files(tmp_path / "out")
    capsys.readouterr()
    time.sleep(0.01)
    again = run(cfg)
    assert "up to date" in capsys.readouterr().out
    assert again == first and _files(tmp_path / "out") == before
    assert not (tmp_path / "out" / prepare.STATE).exists()
    # a different worker count or progress setting is the same dataset
    assert run(_cfg([many], tmp_path / "out", tok_path, eval_fraction=0.1, workers=2, progress=True)) == first
    assert _files(tmp_path / "out") == before
    # a shard gone missing: the directory is prepared again, to the same bytes
    contents = _contents(tmp_path / "out")
    (tmp_path / "out" / "train-00003.tar").unlink()
    capsys.readouterr()
    assert run(cfg) == first
    assert "train-00003.tar is missing" in capsys.readouterr().out
    assert _contents(tmp_path / "out") == contents


def test_changed_config_or_inputs_with_existing_output_fail(many, tok_path, tmp_path):
    out = tmp_path / "out"
    run(_cfg([many], out, tok_path))
    before = _files(out)
    with pytest.raises(PrepareError, match="seq_len 64 -> 128") as e:
        run(_cfg([many], out, tok_path, seq_len=128))
    assert str(out) in str(e.value) and "delete" in str(e.value)
    with pytest.raises(PrepareError, match="eval_fraction"):
        run(_cfg([many], out, tok_path, eval_fraction=0.5))
    changed = tmp_path / "in"
    changed.mkdir()
    for p in many.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    with pytest.raises(PrepareError, match="input files"):
        run(_cfg([changed], out, tok_path))
    assert _files(out) == before
    # an unfinished run of another configuration is not continued with this one
    unfinished = tmp_path / "unfinished"
    with pytest.raises(_Interrupt):
        _with_fault(lambda: run(_cfg([many], unfinished, tok_path)), "state_saved", 2)
    with pytest.raises(PrepareError, match="unfinished run.*seq_len"):
        run(_cfg([many], unfinished, tok_path, seq_len=32))
    # shards of an unknown run; an empty directory or unrelated files are fine
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-00000.tar").write_bytes(b"")
    with pytest.raises(PrepareError, match="no manifest.json"):
        run(_cfg([many], foreign, tok_path))
    with pytest.raises(PrepareError, match="eval_fraction=1.0 must be in"):
        run(_cfg([many], tmp_path / "bad", tok_path, eval_fraction=1.0))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("mine")
    assert run(_cfg([many], empty, tok_path))["samples"] > 0 and (empty / "README").read_text() == "mine"
    # an input file modified after preparing changes the hash too
    (changed / "decoder.py").write_text("# changed\n")
    run(_cfg([changed], tmp_path / "c1", tok_path))
    (changed / "decoder.py").write_text("# changed again\n")
    with pytest.raises(PrepareError, match="input files"):
        run(_cfg([changed], tmp_path / "c1", tok_path))


class _Interrupt(Exception):
    pass


def _with_fault(fn, point: str, nth: int):
    calls = []

    def fault(where: str) -> None:
        if where == point:
            calls.append(where)
            if len(calls) == nth:
                raise _Interrupt(f"{point} #{nth}")

    prepare._FAULT = fault
    try:
        return fn()
    finally:
        prepare._FAULT = None


@pytest.mark.parametrize(
    "point,nth",
    [
        ("shard_written", 1),
        ("shard_written", 200),
        ("state_saved", 3),
        ("state_saved", 7),
        ("manifest_written", 1),
    ],
)
def test_resume_after_interruption_is_byte_identical(
    many, corpus, tok_path, tmp_path, monkeypatch, point, nth
):
    monkeypatch.setattr(prepare, "BATCH_DOCS", 16)
    inputs = [corpus[0], many]
    reference = run(_cfg(inputs, tmp_path / "ref", tok_path, eval_fraction=0.3))
    out = tmp_path / "out"
    cfg = _cfg(inputs, out, tok_path, eval_fraction=0.3)
    with pytest.raises(_Interrupt):
        _with_fault(lambda: run(cfg), point, nth)
    state_file = out / prepare.STATE
    assert state_file.exists()
    consumed = json.loads(state_file.read_text())["documents_consumed"]
    (out / "train-00042.tar.tmp").write_bytes(b"half a shard")  # as a kill during write_shard leaves
    encoded = []
    real = prepare._Encoder.encode

    def counting(self, texts):
        encoded.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(prepare._Encoder, "encode", counting)
    resumed = run(cfg)
    assert resumed == reference
    assert _contents(out) == _contents(tmp_path / "ref")  # no state, carry or .tmp files left
    if point != "manifest_written":
        assert consumed > 0 or (point, nth) == ("shard_written", 1)  # (mid-run: state saved after shards)
        assert len(encoded) == reference["documents_written"] - consumed  # consumed ones are not re-tokenized
    else:
        assert encoded == []


def test_kill_9_during_cli_run_then_resume(tmp_path, tok_path):
    inputs = [str(STDLIB / "json"), str(STDLIB / "email"), str(STDLIB / "asyncio")]
    args = [f"input=[{','.join(inputs)}]", f"tokenizer={tok_path}", "seq_len=128", "samples_per_shard=32"]
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pretrain.cli",
            "prepare",
            *args,
            f"output={out}",
            "workers=2",
            "progress=false",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the tokenizer workers too
    )
    try:
        deadline = time.time() + 120
        while not (out / "train-00000.tar").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "finished before it could be interrupted"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had finished
            pass
        proc.wait()
    assert not (out / "manifest.json").exists() and (out / prepare.STATE).exists()
    resumed = _dlm(*args, f"output={out}", "workers=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    ref = tmp_path / "ref"
    straight = _dlm(*args, f"output={ref}", "workers=1", "progress=false")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _contents(out) == _contents(ref)
    assert load_manifest(ref)["samples"] > 32 * 4


# -- the command -------------------------------------------------------------------------------------------
def test_cli_end_to_end(corpus, tok_path, tmp_path):
    inputs, expected = corpus
    out = tmp_path / "out"
    proc = _dlm(
        f"input=[{inputs}]", f"output={out}", f"tokenizer={tok_path}", "seq_len=48", "eval_fraction=0.2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out)
    assert m["seq_len"] == 48 and m["documents_written"] == expected["written"]
    assert m["config"]["eval_fraction"] == 0.2 and m["splits"]["eval"]["samples"] > 0
    assert proc.stdout.startswith(f"dlm prepare: {expected['written']} documents -> {m['tokens']:,} tokens")
    assert f"skipped {inputs}/records.jsonl:2: malformed_json" in proc.stdout
    assert "docs/s" not in proc.stderr  # the progress bar shows only on a terminal
    again = _dlm(
        f"input=[{inputs}]", f"output={out}", f"tokenizer={tok_path}", "seq_len=48", "eval_fraction=0.2"
    )
    assert again.returncode == 0 and "up to date" in again.stdout
    changed = _dlm(f"input=[{inputs}]", f"output={out}", f"tokenizer={tok_path}", "seq_len=64")
    assert changed.returncode == 1 and f"{out}" in changed.stderr and "seq_len 48 -> 64" in changed.stderr
    missing = _dlm(f"input=[{inputs}]", f"output={tmp_path / 'o2'}", f"tokenizer={tmp_path / 'nope.model'}")
    assert missing.returncode == 1
    assert f"tokenizer {tmp_path / 'nope.model'} does not exist" in missing.stderr
    fail = _dlm(f"input=[{inputs}]", f"output={tmp_path / 'o3'}", f"tokenizer={tok_path}", "on_error=fail")
    assert fail.returncode == 1 and f"{inputs}/blob.bin: binary_file" in fail.stderr


# -- Hugging Face tokenizers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tests.data.test_tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tokenizer")


def test_hf_tokenizer_shards_reproduce_the_documents(many, corpus, hf_dir, tmp_path):
    from data.tokenizer import HFTokenizer

    tok = HFTokenizer(hf_dir)
    inputs = [corpus[0], many]
    out = tmp_path / "out"
    m = run(_cfg(inputs, out, hf_dir, eval_fraction=0.2, seed=1, workers=2))
    assert m["dtype"] == "uint16" and m["tokenizer"] == tok.describe()
    assert m["tokenizer"]["sha256"] == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert m["tokenizer"]["mask_id"] is None and m["tokenizer"]["eos_id"] == 0
    assert m["documents_read"] == m["documents_written"] + sum(m["documents_skipped"].values())
    assert m["documents_written"] == corpus[1]["written"] + 301
    streams = {s: _stream(out, s)[0].reshape(-1) for s in ("train", "eval")}
    docs = _expected(tok, inputs)
    assigned = _assign(docs, streams, 1, 0.2)
    texts = [doc.text for doc in DocumentReader([str(i) for i in inputs])]
    for split, stream in streams.items():
        assert m["splits"][split]["tokens"] == stream.size and m["splits"][split]["documents"] == len(
            assigned[split]
        )
        # decoding the stream gives the split's documents, each followed by EOS
        ends = np.flatnonzero(stream == tok.eos_id)
        assert len(ends) >= len(assigned[split]) - 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
            assert tok.decode(stream[a:b]) == texts[assigned[split][k]]
    assert m["tokens"] == m["samples"] * 64 == sum(s.size for s in streams.values())
    # the same tokenizer named by its tokenizer.json, in one process: identical bytes
    same = run(_cfg(inputs, tmp_path / "json", hf_dir / "tokenizer.json", eval_fraction=0.2, seed=1))
    assert same["config_hash"] == m["config_hash"]
    assert {**same, "config": None} == {**m, "config": None}  # config.tokenizer: the path as given
    shards, again = _contents(out), _contents(tmp_path / "json")
    assert again.pop("manifest.json") != shards.pop("manifest.json") and again == shards


def test_hf_tokenizer_cli_and_errors(many, hf_dir, tmp_path):
    from tests.data.test_tokenizer import build_hf_tokenizer

    proc = _dlm(f"input=[{many}]", f"output={tmp_path / 'out'}", f"tokenizer={hf_dir}", "seq_len=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_manifest(tmp_path / "out")["tokenizer"]["path"] == str(hf_dir / "tokenizer.json")
    no_eos = build_hf_tokenizer(tmp_path / "noeos", eos=None)
    proc = _dlm(f"input=[{many}]", f"output={tmp_path / 'o2'}", f"tokenizer={no_eos}")
    assert proc.returncode == 1 and "no eos_token" in proc.stderr
    assert str(no_eos / "tokenizer_config.json") in proc.stderr


def test_large_vocabulary_hf_tokenizer_writes_uint32(many, tmp_path):
    from data.tokenizer import HFTokenizer
    from tests.data.test_tokenizer import build_hf_tokenizer

    big = build_hf_tokenizer(tmp_path / "big", extra_tokens=66_000)
    doc = "top \u260365999\u2603 and \u26030\u2603 end"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(doc)
    m = run(_cfg([tmp_path / "in", many], tmp_path / "out", big, seq_len=16))
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 66_500
    stream = _stream(tmp_path / "out", "train")[0].reshape(-1)
    tok = HFTokenizer(big)
    first = stream[: int(np.argmax(stream == tok.eos_id))]
    assert 66_499 in first.tolist() and tok.decode(first) == doc


# -- partitions and merging ------------------------------------------------------------------------------
BAD_LINE = b'{"text": "bad \xff byte"}'


@pytest.fixture(scope="module")
def parted(tmp_path_factory) -> Path:
    """5 JSONL files of different sizes (~250 documents); one line of b.jsonl is invalid UTF-8."""
    root = tmp_path_factory.mktemp("parted") / "in"
    root.mkdir()
    rng = random.Random(7)
    for name, count in (("a", 70), ("b", 40), ("c", 55), ("d", 25), ("e", 60)):
        lines = [
            json.dumps({"text": f"{name}{i}: " + _prose(rng, rng.randrange(5, 60))}).encode()
            for i in range(count)
        ]
        if name == "b":
            lines.insert(10, BAD_LINE)  # line 11
        (root / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def _pcfg(inputs, out, tok_path, **kw) -> PrepareConfig:
    return _cfg(inputs, out, tok_path, **{"seq_len": 32, "samples_per_shard": 32, "eval_fraction": 0.3, **kw})


def _tree(out: Path) -> dict[str, bytes]:
    """Every file under `out` (parts/ included), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _stamps(out: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def partitioned(parted, tok_path, tmp_path_factory) -> dict:
    """partitions=3 prepared as an array job (tasks 2, 0, 1, then the merge) and by one run;
    partitions=2 and 1 for comparison."""
    root = tmp_path_factory.mktemp("partitioned")
    array, sequential = root / "array", root / "sequential"
    printed = {}
    with _capture() as out:
        for task in (2, 0, 1):
            run(_pcfg([parted], array, tok_path, partitions=3, partition=task))
        printed["tasks"] = out.getvalue()
    with _capture() as out:
        run(_pcfg([parted], array, tok_path, partitions=3))
        printed["merge"] = out.getvalue()
    with _capture() as out:
        run(_pcfg([parted], sequential, tok_path, partitions=3))
        printed["sequential"] = out.getvalue()
        run(_pcfg([parted], root / "two", tok_path, partitions=2))
        run(_pcfg([parted], root / "one", tok_path))
    return {
        "array": array,
        "sequential": sequential,
        "two": root / "two",
        "one": root / "one",
        "printed": printed,
    }


def _dataset(out: Path) -> dict[str, bytes]:
    """The dataset's own files (manifest and shards; not parts/)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@contextlib.contextmanager
def _capture():
    """What run() prints (capsys is function-scoped; the fixtures using this are not)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def _parts(out: Path, count: int = 3) -> list[dict]:
    return [load_manifest(out / "parts" / f"{i:05d}") for i in range(count)]


def test_partition_files_are_contiguous_balanced_and_never_empty():
    def inputs(sizes):
        return [prepare._Input(0, Path(f"f{i}"), size, 0) for i, size in enumerate(sizes)]

    files = inputs([100] * 12)
    assert [len(p) for p in prepare.partition_files(files, 4)] == [3, 3, 3, 3]
    skewed = inputs([1000, 10, 10, 10, 10, 10, 10, 10, 10, 10, 990])
    parts = prepare.partition_files(skewed, 3)
    assert [f for p in parts for f in p] == skewed and [len(p) for p in parts] == [1, 9, 1]
    for count in range(1, 12):  # every part holds at least one file, even for one huge file
        parts = prepare.partition_files(inputs([10**6] + [0] * 10), count)
        assert len(parts) == count and all(parts) and sum(len(p) for p in parts) == 11


def test_array_tasks_and_one_run_write_identical_datasets(partitioned):
    array, sequential, printed = partitioned["array"], partitioned["sequential"], partitioned["printed"]
    assert _tree(array) == _tree(sequential)
    assert sorted(p.name for p in (array / "parts").iterdir()) == ["00000", "00001", "00002"]
    assert printed["tasks"].count("dlm prepare: ") >= 3 and "merged" not in printed["tasks"]
    assert "preparing it in this process" not in printed["merge"]
    assert printed["sequential"].count("is not prepared: preparing it in this process") == 3
    merge_line = printed["merge"].splitlines()[-1]
    m = load_manifest(array)
    assert merge_line.startswith(f"dlm prepare: merged 3 parts -> {m['tokens']:,} tokens in {m['samples']:,}")
    assert " s -> " in merge_line and not (array / prepare.MERGE_STATE).exists()


def test_the_dataset_is_the_same_whatever_the_number_of_partitions(partitioned):
    """partitions=1, 2, 3: byte-identical shards and manifest (same config hash): the parts
    hold out the same documents and the merge packs their tails on as one run does."""
    one = _dataset(partitioned["one"])
    assert {name for name in one} >= {"manifest.json", "train-00000.tar", "eval-00000.tar"}
    assert _dataset(partitioned["two"]) == one
    assert _dataset(partitioned["sequential"]) == one
    assert not (partitioned["one"] / "parts").exists()


def test_merged_dataset_keys_counts_and_accounting(partitioned, parted):
    out = partitioned["sequential"]
    m, parts = load_manifest(out), _parts(out)
    assert all(len(p["splits"][s]["shards"]) >= 2 for p in parts for s in ("train", "eval"))
    for split in ("train", "eval"):
        tokens, _ = _stream(out, split)  # names in order, sha256 and bytes, keys 0..samples-1
        part_streams = []
        for i, part in enumerate(parts):  # each part's samples, then its tail
            tail = part["tail"]
            data = np.fromfile(out / "parts" / f"{i:05d}" / tail["file"], dtype=part["dtype"]).astype(
                np.int64
            )
            ends = {"train": data[: tail["train"]], "eval": data[tail["train"] :]}
            part_streams += [_stream(out / "parts" / f"{i:05d}", split)[0].reshape(-1), ends[split]]
        stream = np.concatenate(part_streams)
        assert np.array_equal(tokens.reshape(-1), stream[: tokens.size])
        assert stream.size - tokens.size < m["seq_len"]
        assert m["splits"][split]["documents"] == sum(p["splits"][split]["documents"] for p in parts)
    for key in ("documents_read", "documents_written", "bytes_read"):
        assert m[key] == sum(p[key] for p in parts), key
    assert m["documents_read"] == m["documents_written"] + sum(m["documents_skipped"].values())
    assert m["tokens"] == m["samples"] * m["seq_len"]
    # the bad line is in one part, and its count and example survive the merge
    assert m["documents_skipped"] == {"invalid_utf8": 1}
    assert [p["documents_skipped"] for p in parts].count({"invalid_utf8": 1}) == 1
    assert m["skipped_examples"] == [f"{parted}/b.jsonl:11: invalid_utf8 (byte 14)"]
    assert "partitions" not in m["config"] and "parts" not in m
    assert [(p["config"]["partitions"], p["config"]["partition"]) for p in parts] == [(3, 0), (3, 1), (3, 2)]
    assert m["config"]["input_files"] == 5 == sum(p["config"]["input_files"] for p in parts)


def test_trainer_loader_reads_the_merged_dataset(partitioned):
    from data.loader import build_train_loader

    out = partitioned["sequential"]
    m = load_manifest(out)
    tokens, _ = _stream(out, "train")
    ld = build_train_loader(
        [(str(out), 1.0)],
        seq_len=32,
        micro_batch_size=1,
        dp_rank=0,
        dp_size=1,
        seed=0,
        num_workers=0,
        tokenizer_sha256=m["tokenizer"]["sha256"],
        epochs=1,
    )
    try:
        batches = list(ld)
    finally:
        ld.close()
    keys = [int(b["keys"][0]) for b in batches]
    assert sorted(keys) == list(range(m["splits"]["train"]["samples"]))
    for batch, key in zip(batches, keys, strict=True):
        assert np.array_equal(batch["tokens"][0].numpy(), tokens[key])


def test_interrupted_merge_resumes_to_the_same_bytes(partitioned, parted, tok_path, tmp_path):
    reference = _tree(partitioned["sequential"])
    out = tmp_path / "out"
    shutil.copytree(partitioned["sequential"] / "parts", out / "parts")
    cfg = _pcfg([parted], out, tok_path, partitions=3)
    with pytest.raises(_Interrupt):
        _with_fault(lambda: run(cfg), "shard_written", 2)
    assert (out / prepare.MERGE_STATE).exists() and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-00000.tar", "train-00001.tar"]
    (out / "train-00002.tar.tmp").write_bytes(b"half a shard")
    run(cfg)
    assert _tree(out) == reference
    # killed after writing the manifest: the rerun is up to date and removes the state file
    again = tmp_path / "again"
    shutil.copytree(out / "parts", again / "parts")
    cfg = _pcfg([parted], again, tok_path, partitions=3)
    with pytest.raises(_Interrupt):
        _with_fault(lambda: run(cfg), "merge_manifest_written", 1)
    assert (again / prepare.MERGE_STATE).exists()
    run(cfg)
    assert _tree(again) == reference


def test_merged_rerun_is_up_to_date_without_the_parts(partitioned, parted, tok_path, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(partitioned["sequential"], out)
    before = _stamps(out)
    time.sleep(0.01)
    merged = load_manifest(out)
    assert run(_pcfg([parted], out, tok_path, partitions=3)) == merged
    assert run(_pcfg([parted], out, tok_path, partitions=3, partition=1)) == merged
    printed = capsys.readouterr().out
    assert printed.count("is up to date") == 2 and "nothing to do for partition=1" in printed
    assert _stamps(out) == before
    shutil.rmtree(out / "parts")  # not needed any more
    assert run(_pcfg([parted], out, tok_path, partitions=3)) == merged
    # a lost shard: the merge prepares the parts again and rewrites the same bytes
    (out / "eval-00001.tar").unlink()
    run(_pcfg([parted], out, tok_path, partitions=3))
    assert "eval-00001.tar is missing" in capsys.readouterr().out
    assert _tree(out) == _tree(partitioned["sequential"])


def test_parts_and_outputs_of_another_configuration_are_refused(partitioned, parted, tok_path, tmp_path):
    out = tmp_path / "out"
    run(_pcfg([parted], out, tok_path, partitions=3, partition=1, seq_len=16))
    with pytest.raises(PrepareError, match="seq_len 16 -> 32") as e:
        run(_pcfg([parted], out, tok_path, partitions=3))
    assert f"part {out / 'parts' / '00001'}" in str(e.value) and "partitions=3 partition=1" in str(e.value)
    # a dataset of partitions=1 is the merged dataset: up to date; shards of an unknown run refused
    single = tmp_path / "single"
    run(_pcfg([parted], single, tok_path))
    assert run(_pcfg([parted], single, tok_path, partitions=3, partition=0)) == load_manifest(single)
    assert not (single / "parts").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-00000.tar").write_bytes(b"")
    with pytest.raises(PrepareError, match="no manifest.json or merge.state.json"):
        run(_pcfg([parted], foreign, tok_path, partitions=3))
    # an unfinished merge is not continued by a partitions=1 run, nor by another merge
    merging = tmp_path / "merging"
    shutil.copytree(partitioned["sequential"] / "parts", merging / "parts")
    with pytest.raises(_Interrupt):
        _with_fault(lambda: run(_pcfg([parted], merging, tok_path, partitions=3)), "shard_written", 1)
    with pytest.raises(PrepareError, match="unfinished merge of this dataset.*partitions=3"):
        run(_pcfg([parted], merging, tok_path))
    with pytest.raises(PrepareError, match="unfinished merge.*eval_fraction"):
        run(_pcfg([parted], merging, tok_path, partitions=3, eval_fraction=0.1))


def test_partition_arguments_are_checked(parted, tok_path, tmp_path):
    three = [parted / "a.jsonl", parted / "b.jsonl", parted / "c.jsonl"]
    with pytest.raises(PrepareError, match="partitions=5 but the input resolves to 3 files"):
        run(_pcfg(three, tmp_path / "o", tok_path, partitions=5))
    with pytest.raises(PrepareError, match=r"partition=3 must be in \[0, partitions=3\)"):
        run(_pcfg(three, tmp_path / "o", tok_path, partitions=3, partition=3))
    with pytest.raises(PrepareError, match="partition=0 needs partitions > 1"):
        run(_pcfg(three, tmp_path / "o", tok_path, partition=0))
    with pytest.raises(PrepareError, match="partitions=0 must be positive"):
        run(_pcfg(three, tmp_path / "o", tok_path, partitions=0))
    assert not (tmp_path / "o").exists()


def test_merge_sums_inputs_per_argument_as_one_run(parted, tok_path, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_INPUT_ENTRIES", 2)  # 5 files: per input argument, parts included
    inputs = [parted / "a.jsonl", parted / "[bc].jsonl", parted / "[de].jsonl"]
    merged = run(_pcfg(inputs, tmp_path / "merged", tok_path, partitions=4))
    single = run(_pcfg(inputs, tmp_path / "single", tok_path))
    assert merged["inputs_by"] == single["inputs_by"] == "input"
    assert all(p["inputs_by"] == "input" for p in _parts(tmp_path / "merged", 4))
    assert merged["inputs"] == single["inputs"] and [e["files"] for e in merged["inputs"]] == [1, 2, 2]
    assert _dataset(tmp_path / "merged") == _dataset(tmp_path / "single")


def test_parquet_and_zst_inputs_filters_and_duplicate_paths(parted, tok_path, tmp_path):
    """Records from Parquet and .jsonl.zst are prepared like JSONL; the quality filter is part
    of the configuration; a file reached twice is read once and reported, and the merged
    dataset of 2 partitions still equals one run's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    inputs = tmp_path / "in"
    inputs.mkdir()
    rows = [json.loads(line) for line in (parted / "a.jsonl").read_text().splitlines()]
    scores = [i / len(rows) for i in range(len(rows))]
    pq.write_table(
        pa.table({"text": [r["text"] for r in rows], "score": scores}),
        inputs / "a.parquet",
        row_group_size=16,
    )
    (inputs / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((parted / "c.jsonl").read_bytes())
    )
    given = [str(inputs), str(inputs / "a.parquet")]  # a.parquet twice
    single = run(_pcfg(given, tmp_path / "one", tok_path, filter_field="score", filter_min=0.5))
    assert single["duplicate_inputs"] == {"count": 1, "examples": [str(inputs / "a.parquet")]}
    assert [Path(e["path"]).name for e in single["inputs"]] == ["a.parquet", "c.jsonl.zst"]
    kept = sum(score >= 0.5 for score in scores)
    # the filter applies to every record format with the field; c's records have no score
    assert single["documents_skipped"] == {"filtered": len(rows) - kept + 55}
    assert single["documents_written"] == kept and single["config"]["filter_min"] == 0.5
    merged = run(_pcfg(given, tmp_path / "two", tok_path, filter_field="score", filter_min=0.5, partitions=2))
    assert _dataset(tmp_path / "two") == _dataset(tmp_path / "one") and merged == single
    unfiltered = run(_pcfg(given, tmp_path / "all", tok_path))
    assert (
        unfiltered["documents_written"] == len(rows) + 55
        and unfiltered["config_hash"] != single["config_hash"]
    )


def test_dlm_prepare_merge_merges_the_parts_and_refuses_without_partitions(
    partitioned, parted, tok_path, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(partitioned["array"] / "parts", out / "parts")
    common = [
        f"input=[{parted}]",
        f"output={out}",
        f"tokenizer={tok_path}",
        "seq_len=32",
        "samples_per_shard=32",
    ]
    common += ["eval_fraction=0.3", "workers=1", "progress=false"]
    for wrong in (["partitions=1"], ["partitions=3", "partition=0"]):
        proc = _dlm("merge", *common, *wrong)
        assert proc.returncode == 2 and "dlm prepare merge combines the parts" in proc.stderr, proc.stderr
    assert not (out / "manifest.json").exists()
    proc = _dlm("merge", *common, "partitions=3")
    assert proc.returncode == 0 and "merged 3 parts" in proc.stdout, proc.stderr[-2000:]
    assert _tree(out) == _tree(partitioned["array"])
