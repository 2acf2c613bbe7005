"""Byte tokenizer, corpus loading and the window dataset (CPU, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.corpus import ByteTokenizer, WindowDataset, load_byte_corpus

EOS = ByteTokenizer.EOS


# -- tokenizer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["", "hello, world\n", "héllo wörld — naïve façade", "日本語のテキスト 🎉\tend"]
)
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text.encode("utf-8"))) == text  # bytes in


def test_tokenizer_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260
    assert len({tok.PAD, tok.BOS, tok.EOS, tok.MASK}) == 4
    assert all(256 <= s < tok.vocab_size for s in (tok.PAD, tok.BOS, tok.EOS, tok.MASK))
    assert tok.mask_id == tok.MASK
    ids = [tok.BOS, *b"ab", tok.MASK, *b"c", tok.EOS, *b"d", tok.PAD, tok.PAD]
    assert tok.decode(ids) == "ab\u2592c\nd"
    assert tok.decode(ids, mask_char="_") == "ab_c\nd"
    assert tok.decode(torch.tensor(ids)) == "ab\u2592c\nd"


# -- corpus -------------------------------------------------------------------------------------------
def _doc(text: str) -> list[int]:
    return [*text.encode("utf-8"), EOS]


@pytest.fixture
def corpus_dir(tmp_path):
    files = {
        "a.txt": "first document\n",
        "empty.txt": "",
        "blob.bin": b"\x7fELF\x00\x00\x01binary",
        "dir/a1.txt": "dir doc one é\n",
        "dir/b2_blank.txt": "  \n\t\n",
        "dir/c3/deep.txt": "deep document",
        "glob/g1.md": "# glob one",
        "glob/g2.md": "# glob two ü",
        "glob/g3.txt": "not matched by *.md",
    }
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    (tmp_path / "dangling").symlink_to(tmp_path / "does-not-exist")
    return tmp_path


def _paths(root) -> list[str]:
    return [
        str(root / "a.txt"),
        str(root / "empty.txt"),
        str(root / "blob.bin"),
        str(root / "dangling"),
        str(root / "dir"),
        str(root / "glob" / "*.md"),
    ]


def test_load_text_corpus(corpus_dir):
    tokens, stats = load_byte_corpus("text", _paths(corpus_dir))
    good = ["first document\n", "dir doc one é\n", "deep document", "# glob one", "# glob two ü"]
    expected = [t for doc in good for t in _doc(doc)]
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected  # order kept, one EOS after every document
    assert stats.tokens == len(expected)
    # a.txt, empty.txt, blob.bin, dangling, 3 files under dir/, 2 matches of the glob
    assert stats.documents_read == 9
    assert stats.documents_written == len(good)
    assert stats.documents_read == stats.documents_written + sum(stats.documents_skipped.values())
    assert stats.documents_skipped["empty_document"] == 2  # empty.txt and the whitespace-only file
    assert stats.documents_skipped["binary_file"] == 1
    unreadable = [r for r in stats.documents_skipped if r.startswith("unreadable")]
    assert len(unreadable) == 1 and stats.documents_skipped[unreadable[0]] == 1
    assert any("blob.bin" in ex and "binary_file" in ex for ex in stats.skipped_examples)
    assert any("dangling" in ex and "unreadable" in ex for ex in stats.skipped_examples)
    assert not any("g3.txt" in ex for ex in stats.skipped_examples)


def test_max_bytes_caps_tokens(corpus_dir):
    a, d = "first document\n", "dir doc one é\n"
    paths = [str(corpus_dir / "a.txt"), str(corpus_dir / "dir")]
    full = _doc(a) + _doc(d)
    # the cap falls inside the second document: the stream is cut there
    cap = len(a.encode()) + 5
    tokens, stats = load_byte_corpus("text", paths, max_bytes=cap)
    assert tokens.tolist() == full[:cap]
    assert stats.tokens == cap
    assert stats.documents_read == stats.documents_written + sum(stats.documents_skipped.values())
    # the cap is reached by the first document: nothing after it is read
    tokens, stats = load_byte_corpus("text", paths, max_bytes=4)
    assert tokens.tolist() == list(a.encode())[:4]
    assert stats.documents_read == 1 == stats.documents_written


def test_glob_matching_nothing_names_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-here" / "*.txt")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_byte_corpus("text", [pattern])


def test_text_source_needs_usable_paths(tmp_path):
    with pytest.raises(ValueError, match="data.paths"):
        load_byte_corpus("text", [])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="no usable document"):
        load_byte_corpus("text", [str(tmp_path / "e.txt")])
    with pytest.raises(ValueError, match="data.source"):
        load_byte_corpus("nope")


def test_stdlib_source_small():
    tokens, stats = load_byte_corpus("stdlib", max_bytes=20_000)
    assert stats.tokens == tokens.size == 20_000
    assert stats.documents_written >= 1
    assert stats.documents_read == stats.documents_written + sum(stats.documents_skipped.values())
    assert int(tokens.max()) < ByteTokenizer.vocab_size
    text = ByteTokenizer().decode(tokens)
    assert "import" in text or "def " in text  # Python source


# -- window dataset ------------------------------------------------------------------------------------
SEQ = 8


def _numbered(n_windows: int, extra: int = 3) -> np.ndarray:
    """Window i holds tokens i*SEQ .. i*SEQ+SEQ-1, so a window identifies itself."""
    return np.arange(n_windows * SEQ + extra, dtype=np.uint16)


def _ids(windows: torch.Tensor) -> list[int]:
    rows = windows.tolist()
    for row in rows:
        assert row == list(range(row[0], row[0] + SEQ)) and row[0] % SEQ == 0  # whole, aligned windows
    return [row[0] // SEQ for row in rows]


def test_windows_split_into_train_and_eval():
    n = 40
    ds = WindowDataset(_numbered(n), SEQ, seed=0, eval_fraction=0.25)
    assert ds.num_train + ds.num_eval == n  # the 3 trailing tokens make no window
    assert ds.num_eval == 10
    train = _ids(ds.train_samples(torch.arange(ds.num_train)))
    evals = _ids(ds.eval_samples(torch.arange(ds.num_eval)))
    assert set(evals) == set(range(n - 10, n))  # the last windows are held out
    assert not set(train) & set(evals)
    assert set(train) | set(evals) == set(range(n))
    # eval indices wrap around the held-out set
    assert _ids(ds.eval_samples(torch.arange(ds.num_eval, 2 * ds.num_eval))) == evals


def test_eval_fraction_keeps_at_least_one_eval_window():
    ds = WindowDataset(_numbered(10), SEQ, seed=0, eval_fraction=0.01)
    assert ds.num_eval == 1 and ds.num_train == 9


def test_train_samples_epochs_are_permutations():
    n = 50
    ds = WindowDataset(_numbered(n), SEQ, seed=3, eval_fraction=0.1)
    t = ds.num_train
    epoch0 = _ids(ds.train_samples(torch.arange(t)))
    epoch1 = _ids(ds.train_samples(torch.arange(t, 2 * t)))
    epoch2 = _ids(ds.train_samples(torch.arange(2 * t, 3 * t)))
    for epoch in (epoch0, epoch1, epoch2):
        assert sorted(epoch) == list(range(t))  # every train window exactly once
    assert epoch1 != epoch0 and epoch2 != epoch1
    assert epoch0 != list(range(t))  # shuffled


def test_train_samples_are_a_function_of_global_index():
    n = 50
    a = WindowDataset(_numbered(n), SEQ, seed=7)
    b = WindowDataset(_numbered(n), SEQ, seed=7)
    t = a.num_train
    everything = torch.arange(3 * t)
    reference = a.train_samples(everything)
    # another instance, other batch boundaries, indices out of order and across epochs
    idx = torch.tensor([2 * t + 5, 3, t + 1, 0, 2 * t + 5, t - 1, t])
    assert torch.equal(b.train_samples(idx), reference[idx])
    for start in range(0, 3 * t, 7):
        chunk = torch.arange(start, min(start + 7, 3 * t))
        assert torch.equal(b.train_samples(chunk), reference[chunk])
    other = WindowDataset(_numbered(n), SEQ, seed=8)
    assert not torch.equal(other.train_samples(torch.arange(t)), reference[:t])
    assert sorted(_ids(other.train_samples(torch.arange(t)))) == list(range(t))


def test_too_small_corpus_raises():
    with pytest.raises(ValueError, match="seq_len"):
        WindowDataset(np.arange(2 * SEQ - 1, dtype=np.uint16), SEQ, seed=0)
    WindowDataset(np.arange(2 * SEQ, dtype=np.uint16), SEQ, seed=0)  # two windows: one train, one eval


def test_no_training_windows_raises():
    # BUG: eval_fraction=1.0 holds out every window; the dataset is built with
    # num_train == 0 and the first train_samples() call dies in divmod(g, 0).
    with pytest.raises(ValueError):
        WindowDataset(_numbered(10), SEQ, seed=0, eval_fraction=1.0)
