"""The shards of `dlm prepare` are plain webdataset: webdataset's own reader
(`webdataset.WebDataset`, no code of ours) yields exactly the samples and keys that
data.shards.read_shard yields, for train and eval shards; write_shard (webdataset's TarWriter)
is deterministic and atomic. A tiny tokenizer trained on local text: no downloads."""

from __future__ import annotations

import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data.config import PrepareConfig, TokenizerConfig
from data.prepare import run
from data.shards import ShardLocation, load_manifest, read_shard, segment_ids, write_shard
from data.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    tok, _ = train_tokenizer(
        TokenizerConfig(input=[str(STDLIB / "json")], output=str(root / "tok"), vocab_size=400)
    )
    out = root / "out"
    cfg = PrepareConfig(
        input=[str(STDLIB / "json"), str(STDLIB / "email" / "mime")],
        output=str(out),
        tokenizer=str(tok),
        seq_len=64,
        samples_per_shard=16,
        eval_fraction=0.3,
        workers=1,
        progress=False,
    )
    run(cfg)
    return out


def _ours(out: Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(key, tokens, segments, shard) of every sample of a split, by data.shards.read_shard."""
    manifest = load_manifest(out)
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        for key, tokens, segments in read_shard(
            ShardLocation(str(out)), shard["name"], seq_len=manifest["seq_len"], dtype=manifest["dtype"]
        ):
            samples.append((f"{key:09d}", tokens, segments, shard["name"]))
    return samples


def _webdataset(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_webdataset_reads_exactly_our_samples(dataset, split):
    manifest = load_manifest(dataset)
    shards = manifest["splits"][split]["shards"]
    assert len(shards) >= 2 and manifest["splits"][split]["samples"] > 16
    ours = _ours(dataset, split)
    theirs = _webdataset([str(dataset / s["name"]) for s in shards])
    assert [s["__key__"] for s in theirs] == [key for key, *_ in ours]  # same keys, same order
    assert [key for key, *_ in ours] == [f"{i:09d}" for i in range(manifest["splits"][split]["samples"])]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    for sample, (key, tokens, segments, shard) in zip(theirs, ours, strict=True):
        assert {k for k in sample if not k.startswith("__")} == {"tokens", "segments"}, key
        assert Path(sample["__url__"]).name == shard
        assert np.array_equal(np.frombuffer(sample["tokens"], dtype=dtype), tokens), key
        assert np.array_equal(np.frombuffer(sample["segments"], dtype="<u2"), segments), key


def _samples(dtype: str, n: int = 40, seq_len: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    high = 70_000 if dtype == "uint32" else 500
    rows = rng.integers(0, high, size=(n, seq_len)).astype(dtype)
    rows[rng.random((n, seq_len)) < 0.1] = 2  # EOS
    return [(row, segment_ids(row, 2)) for row in rows]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_write_shard_is_deterministic_atomic_and_webdataset(tmp_path, dtype):
    samples = _samples(dtype)
    a, b = (tmp_path / d / "train-00000.tar" for d in "ab")
    a.parent.mkdir()
    b.parent.mkdir()
    first, again = (write_shard(path, samples, 1000, dtype) for path in (a, b))
    assert a.read_bytes() == b.read_bytes() and first == again  # same samples, same bytes and entry
    assert first["bytes"] == a.stat().st_size and first["samples"] == 40 and first["tokens"] == 40 * 32
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "train-00000.tar", "train-00000.tar"]
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert len(members) == 80 and {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {
        (0, "dlm", "dlm", 0o444)
    }
    theirs = _webdataset([str(a)])
    assert [s["__key__"] for s in theirs] == [f"{1000 + i:09d}" for i in range(40)]
    little = np.dtype(dtype).newbyteorder("<")
    for sample, (tokens, segments) in zip(theirs, samples, strict=True):
        assert np.array_equal(np.frombuffer(sample["tokens"], dtype=little), tokens)
        assert np.array_equal(np.frombuffer(sample["segments"], dtype="<u2"), segments)


def test_interrupted_write_leaves_no_shard(tmp_path):
    samples = _samples("uint16")

    def interrupted():
        yield from samples[:5]
        raise KeyboardInterrupt

    class Failing(list):
        def __iter__(self):
            return interrupted()

    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "train-00000.tar", Failing(samples), 0, "uint16")
    assert not (tmp_path / "train-00000.tar").exists()  # only the .tmp, which prepare deletes on resume
