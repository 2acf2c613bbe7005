"""Megatron indexed datasets (parallel/datasets.py): `dlm prepare format=megatron` writes what
megatron-core reads, partitioned or not; the samples megatron-core cuts carry document
segments that match the documents; the checks before start; and (slow) training on them
at TP=2 x DP=2 equals one process, resumes exactly, and equals the same samples read from
webdataset shards."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data import pipeline
from data.config import PrepareConfig, TokenizerConfig
from data.pipeline import DataConfigError, eos_segments
from data.shards import ShardLocation, read_shard
from parallel.datasets import build_samples, describe, resolve, sample
from tests.dist import QUIET, launch, read_metrics

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megatron")


@pytest.fixture(scope="module")
def tokenizer(root) -> Path:
    from data.tokenizer import train_tokenizer

    path, _ = train_tokenizer(
        TokenizerConfig(input=[str(STDLIB / "json")], output=str(root / "tok"), vocab_size=512)
    )
    return Path(path)


def prepare(root: Path, tokenizer: Path, name: str, **overrides) -> dict:
    from data.prepare import run

    config = dict(
        input=[str(STDLIB / "json"), str(STDLIB / "email")],
        output=str(root / name),
        tokenizer=str(tokenizer),
        seq_len=SEQ,
        samples_per_shard=48,
        eval_fraction=0.1,
        workers=1,
        progress=False,
    )
    return run(PrepareConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def prepared(root, tokenizer) -> Path:
    prepare(root, tokenizer, "megatron", format="megatron")
    return root / "megatron"


def documents(prefix: Path | str) -> list[np.ndarray]:
    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]


# -- dlm prepare format=megatron ------------------------------------------------------------
def test_prepare_writes_the_documents_of_the_shards_and_accounts_for_them(root, tokenizer, prepared):
    """The same corpus prepared as shards: the shards' train stream is the megatron train
    documents one after another (each ending in EOS), cut to whole samples."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    shards = prepare(root, tokenizer, "shards")
    assert manifest["format"] == "dlm-megatron/1"
    for key in ("documents_read", "documents_written", "documents_skipped", "bytes_read"):
        assert manifest[key] == shards[key], key
    assert manifest["documents_read"] == manifest["documents_written"] + sum(
        manifest["documents_skipped"].values()
    )
    eos = manifest["tokenizer"]["eos_id"]
    for split in ("train", "eval"):
        docs = documents(prepared / split)
        assert len(docs) == manifest["splits"][split]["documents"] == shards["splits"][split]["documents"] > 0
        assert all(doc[-1] == eos and (doc[:-1] != eos).all() for doc in docs)
        stream = np.concatenate(docs)
        assert manifest["splits"][split]["tokens"] == stream.size
        location = ShardLocation(str(root / "shards"))
        packed = [
            tokens
            for entry in shards["splits"][split]["shards"]
            for _, tokens, _ in read_shard(location, entry["name"], seq_len=SEQ, dtype=shards["dtype"])
        ]
        packed = np.concatenate(packed)
        assert np.array_equal(stream[: packed.size], packed), split
        assert stream.size - packed.size < SEQ  # only the tail the shards drop


def test_partitioned_prepare_is_byte_identical_and_reruns_are_up_to_date(root, tokenizer, prepared, capsys):
    merged = prepare(root, tokenizer, "megatron3", format="megatron", partitions=3)
    for name in ("train.bin", "train.idx", "eval.bin", "eval.idx", "manifest.json"):
        assert (root / "megatron3" / name).read_bytes() == (prepared / name).read_bytes(), name
    capsys.readouterr()
    again = prepare(root, tokenizer, "megatron3", format="megatron", partitions=3)
    assert again == merged and "up to date" in capsys.readouterr().out
    (root / "megatron3" / "train.bin").write_bytes(b"")  # a damaged file is prepared again
    prepare(root, tokenizer, "megatron3", format="megatron", partitions=3)
    assert (root / "megatron3" / "train.bin").read_bytes() == (prepared / "train.bin").read_bytes()


def test_a_shards_directory_refuses_format_megatron(root, tokenizer):
    from data.prepare import PrepareError

    prepare(root, tokenizer, "shards_only")
    with pytest.raises(PrepareError, match="output_format 'shards' -> 'megatron'"):
        prepare(root, tokenizer, "shards_only", format="megatron")


# -- the samples megatron-core cuts ------------------------------------------------------------
class Vocab:
    vocab_size, eos_id = 512, 2


def builder_corpus(path: Path, lengths: list[int], *, eos: bool, seed: int = 0) -> list[np.ndarray]:
    """A corpus written with megatron-core's own IndexedDatasetBuilder (as preprocess_data.py)."""
    rng = np.random.default_rng(seed)
    docs = []
    builder = IndexedDatasetBuilder(f"{path}.bin", dtype=np.uint16)
    for length in lengths:
        doc = rng.integers(4, 500, length)
        if eos:
            doc[-1] = Vocab.eos_id
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        docs.append(doc)
    builder.finalize(f"{path}.idx")
    return docs


def _inside(piece: np.ndarray, doc: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(doc, len(piece)) if len(doc) >= len(piece) else []
    return any(np.array_equal(w, piece) for w in windows)


def parts_are_documents(tokens: np.ndarray, segments: np.ndarray, docs: list[np.ndarray]) -> None:
    """Each run of one segment number is a piece of one document: a suffix of one (the
    first), a prefix (the last), a whole document (in between), or, alone, any slice."""
    cuts = np.flatnonzero(np.diff(segments)) + 1
    pieces = np.split(tokens, cuts)
    assert np.array_equal(np.unique(segments), np.arange(len(pieces)))
    for number, piece in enumerate(pieces):
        first, last = number == 0, number == len(pieces) - 1
        assert any(
            (len(pieces) == 1 and _inside(piece, doc))
            or (
                len(doc) >= len(piece)
                and (
                    (first and np.array_equal(doc[len(doc) - len(piece) :], piece))
                    or (last and np.array_equal(doc[: len(piece)], piece))
                    or np.array_equal(doc, piece)
                )
            )
            for doc in docs
        ), (number, len(pieces))


@pytest.mark.parametrize("eos", [True, False], ids=["eos", "no-eos"])
def test_segments_are_the_documents_of_each_sample(tmp_path, eos):
    docs = builder_corpus(tmp_path / "corpus", [5, 90, 17, 64, 3, 140, 33, 1, 64, 70], eos=eos)
    source = resolve(0, str(tmp_path / "corpus"))
    train, _ = build_samples(
        [source], [1.0], seq_len=SEQ, seed=3, eval_fraction=0.0, vocab=Vocab, cache_dir=None,
        train_samples=40, reads=True,
    )  # fmt: skip
    assert len(train) >= 40  # whole epochs (several) of this small corpus
    for index in range(len(train)):
        _, tokens, segments = sample(train, index)
        assert tokens.shape == segments.shape == (SEQ,)
        parts_are_documents(tokens.numpy(), segments.numpy(), docs)
        if eos:
            assert torch.equal(segments, eos_segments(tokens[None], Vocab.eos_id)[0])
    with pytest.raises(IndexError, match="built for fewer"):
        sample(train, len(train))


def test_a_blend_follows_its_weights_and_is_the_same_when_rebuilt(tmp_path):
    a = builder_corpus(tmp_path / "a", [50] * 40, eos=True, seed=1)
    b = builder_corpus(tmp_path / "b", [70] * 40, eos=True, seed=2)
    sources = [resolve(0, str(tmp_path / "a")), resolve(1, str(tmp_path / "b"))]

    def build(seed):
        return build_samples(
            sources, [0.25, 0.75], seq_len=SEQ, seed=seed, eval_fraction=0.0, vocab=Vocab, cache_dir=None,
            train_samples=200, reads=True,
        )[0]  # fmt: skip

    first, again, other_seed = build(5), build(5), build(6)
    drawn = [sample(first, i) for i in range(200)]
    assert np.bincount([d[0] for d in drawn]).tolist() == [50, 150]
    for index, (source, tokens, segments) in enumerate(drawn):
        parts_are_documents(tokens.numpy(), segments.numpy(), (a, b)[source])
        assert torch.equal(sample(again, index)[1], tokens)
    assert any(not torch.equal(sample(other_seed, i)[1], drawn[i][1]) for i in range(200))


@pytest.mark.parametrize("documents", [10, 37])
def test_split_documents_is_megatrons_split(tmp_path, documents):
    from parallel.datasets import split_documents

    builder_corpus(tmp_path / "c", [30] * documents, eos=True)
    train, evaluation = build_samples(
        [resolve(0, str(tmp_path / "c"))], [1.0], seq_len=SEQ, seed=0, eval_fraction=0.25, vocab=Vocab,
        cache_dir=None, train_samples=8, reads=True,
    )  # fmt: skip
    expected = split_documents(documents, 0.25)
    assert [list(train.indices), list(evaluation.indices)] == [list(expected[0]), list(expected[1])]
    assert len(expected[1]) > 0 and len(expected[0]) + len(expected[1]) == documents


def test_a_truncated_index_cache_is_dropped_and_rebuilt(tmp_path):
    """A job killed while megatron-core wrote its index leaves a truncated .npy that megatron
    would load as a cache hit; drop_broken_cache removes it and the rebuild is the same."""
    from parallel.datasets import drop_broken_cache

    builder_corpus(tmp_path / "c", [50] * 20, eos=True)
    sources = [resolve(0, str(tmp_path / "c"))]

    def build():
        return build_samples(
            sources, [1.0], seq_len=SEQ, seed=1, eval_fraction=0.0, vocab=Vocab, cache_dir=None,
            train_samples=30, reads=True,
        )[0]  # fmt: skip

    first = [sample(build(), i)[1] for i in range(30)]
    cache = tmp_path / "c" / "cache" / "GPTDataset_indices"  # megatron's place without path_to_cache
    (shuffle,) = cache.glob("*train-shuffle_index.npy")
    shuffle.write_bytes(shuffle.read_bytes()[:-16])
    with pytest.raises(ValueError):
        build()
    assert len(drop_broken_cache(cache)) == 4 and not list(cache.glob("*train*"))
    assert drop_broken_cache(cache) == []
    again = build()
    assert all(torch.equal(sample(again, i)[1], tokens) for i, tokens in enumerate(first))


# -- checks before start ------------------------------------------------------------------------
def data_config(paths: list[str], tokenizer: Path | None = None):
    from pretrain.config import DataConfig, SourceConfig

    sources = [SourceConfig(path=p) for p in paths]
    return DataConfig(source="megatron", sources=sources, tokenizer=str(tokenizer) if tokenizer else None)


def test_describe_names_what_is_wrong(tmp_path, tokenizer, prepared):
    builder_corpus(tmp_path / "plain", [30] * 4, eos=True)
    cases = [
        (
            data_config([str(tmp_path / "missing")], tokenizer),
            r"data.sources\[0\].path=.*missing.*no .*\.bin",
        ),
        (data_config([str(tmp_path / "plain")]), "needs data.tokenizer"),
        (data_config([str(prepared), str(tmp_path / "plain")], tokenizer), "not both"),
        (
            data_config([str(tmp_path / "plain")], tokenizer),
            "eval_fraction=0.01 holds out none of its 4 documents",
        ),
    ]
    big = tmp_path / "big"
    builder = IndexedDatasetBuilder(f"{big}.bin", dtype=np.uint16)
    builder.add_item(torch.tensor([5, 900, 2]))
    builder.end_document()
    builder.finalize(f"{big}.idx")
    cases.append((data_config([str(big)], tokenizer), r"data.sources\[0\].path=.*id 900.*512 ids"))
    for cfg, message in cases:
        with pytest.raises(DataConfigError, match=message):
            pipeline.check_layout(
                cfg, pipeline.describe(cfg), seed=0, micro_batch_size=2, dp_size=1, run_samples=64
            )
    tokenizer_record, summary = describe(data_config([str(prepared)]))  # the manifest names its tokenizer
    assert tokenizer_record["vocab_size"] == 512 and "documents" in summary


def test_a_prepared_directory_from_another_tokenizer_is_refused(tmp_path, prepared):
    from data.tokenizer import train_tokenizer

    other, _ = train_tokenizer(
        TokenizerConfig(input=[str(STDLIB / "email")], output=str(tmp_path / "tok"), vocab_size=512)
    )
    with pytest.raises(DataConfigError, match="was prepared with"):
        describe(data_config([str(prepared)], other))


def test_max_epochs_is_checked_before_start(prepared):
    cfg = data_config([str(prepared)])
    cfg.sources[0].max_epochs = 1.0
    cfg.seq_len = SEQ
    vocab = pipeline.describe(cfg)
    pipeline.check_layout(cfg, vocab, seed=0, micro_batch_size=2, dp_size=1, run_samples=100)
    with pytest.raises(DataConfigError, match="max_epochs"):
        pipeline.check_layout(cfg, vocab, seed=0, micro_batch_size=2, dp_size=1, run_samples=100_000)


# -- training on them (slow: real launches) -------------------------------------------------------
STEPS = 6


@pytest.fixture(scope="module")
def corpus(root, prepared) -> dict:
    """Two plain prefixes: the train split `dlm prepare format=megatron` wrote, and a
    corpus written with megatron-core's own builder."""
    builder_corpus(root / "builder", [40 + (7 * i) % 90 for i in range(300)], eos=True, seed=9)
    return {"prepared": prepared / "train", "builder": root / "builder"}


def megatron_config(corpus: dict, tokenizer: Path, run_dir: Path) -> list[str]:
    sources = ",".join(
        f"{{name:{name},path:{path},weight:{weight}}}"
        for (name, path), weight in zip(corpus.items(), (0.6, 0.4), strict=True)
    )
    return [
        "model=tiny",
        "model.attention=document",
        "data.source=megatron",
        f"data.sources=[{sources}]",
        f"data.tokenizer={tokenizer}",
        f"data.seq_len={SEQ}",
        "data.eval_fraction=0.1",
        f"train.steps={STEPS}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "checkpoint.every=3",
        "checkpoint.keep=0",
        "seed=5",
        f"run.dir={run_dir}",
        *QUIET,
    ]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def same_rows(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm", "masked_acc"):
            assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-7), (
                what,
                g["step"],
                key,
                g[key],
                w[key],
            )


@pytest.fixture(scope="module")
def one_process(root, corpus, tokenizer) -> Path:
    run_dir = root / "one"
    launch(1, [*megatron_config(corpus, tokenizer, run_dir), "train.eval_every=3", "train.eval_batches=1"])
    return run_dir


@pytest.mark.slow
def test_tp2_dp2_equals_one_process_and_resumes_exactly_at_another_layout(
    root, corpus, tokenizer, one_process
):
    """TP=2 x DP=2 (4 ranks; one rank per tensor-parallel group reads, megatron's index
    built by rank 0 and loaded by rank 2) gives the losses of one process; its step-3
    checkpoint resumed in one process continues with the same steps 4-6."""
    want = train_rows(one_process)
    assert len(want) == STEPS
    tp2dp2 = root / "tp2dp2"
    extra = ["parallel.tp=2", "train.eval_every=3", "train.eval_batches=1"]
    proc = launch(4, [*megatron_config(corpus, tokenizer, tp2dp2), *extra])
    assert "dp=2" in proc.stdout and "megatron [" in proc.stdout
    same_rows(train_rows(tp2dp2), want, "tp2 x dp2")
    evals = [[r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r] for run in (one_process, tp2dp2)]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-5)
    last = want[-1]
    drawn = {name: last[f"data/tokens/{name}"] for name in corpus}
    assert sum(drawn.values()) == STEPS * 8 * SEQ and drawn["prepared"] > drawn["builder"] > 0

    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tp2dp2 / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    (resumed / "checkpoints" / "latest").write_text("step_3")
    proc = launch(1, megatron_config(corpus, tokenizer, resumed))
    assert "resumed from" in proc.stdout
    same_rows(train_rows(resumed), want[3:], "resumed at tp1 dp1 from tp2 x dp2")


def shards_in_loader_order(
    out: Path, samples: list[tuple[torch.Tensor, torch.Tensor]], tokenizer: dict, seed: int
):
    """A dlm-shards/1 dataset that the shard loader (one rank, no workers) reads in the order
    of `samples`: the loader's order is found by reading a dataset of the same shape first."""
    from data.loader import build_train_loader
    from data.shards import FORMAT, MANIFEST, write_shard

    per_shard, count = 8, len(samples)

    def write(rows):
        out.mkdir(parents=True, exist_ok=True)
        shards = [
            write_shard(out / f"train-{i:05d}.tar", rows[start : start + per_shard], start, "uint16")
            for i, start in enumerate(range(0, count, per_shard))
        ]
        train = {"shards": shards, "samples": count, "tokens": count * SEQ, "documents": 0}
        empty = {"shards": [], "samples": 0, "tokens": 0, "documents": 0}
        manifest = {"format": FORMAT, "seq_len": SEQ, "dtype": "uint16", "tokenizer": tokenizer}
        (out / MANIFEST).write_text(json.dumps({**manifest, "splits": {"train": train, "eval": empty}}))

    blank = np.zeros(SEQ, dtype=np.int64)
    write([(blank, blank)] * count)
    loader = build_train_loader(
        [(str(out), 1.0)], seq_len=SEQ, micro_batch_size=2, dp_rank=0, dp_size=1, seed=seed,
        num_workers=0, shuffle_shards=2, tokenizer_sha256=tokenizer["sha256"],
    )  # fmt: skip
    order = [
        key for _, batch in zip(range(count // 2), loader, strict=False) for key in batch["keys"].tolist()
    ]
    loader.close()
    assert sorted(order) == list(range(count))
    rows = [None] * count
    for index, key in enumerate(order):
        tokens, segments = samples[index]
        rows[key] = (tokens.numpy(), segments.numpy())
    write(rows)


@pytest.mark.slow
def test_the_same_samples_from_webdataset_shards_give_the_same_losses(root, corpus, tokenizer, one_process):
    """The samples the megatron run read (sample i = megatron's item i), written as shards
    that the shard loader reads in that order: the shards run has the megatron run's losses."""
    from pretrain.config import derive, load_config

    cfg = load_config(megatron_config(corpus, tokenizer, root / "unused"))
    vocab = pipeline.describe(cfg.data)
    run_samples = derive(cfg, 1, vocab_size=vocab.vocab_size, mask_id=vocab.mask_id).run_samples
    data = pipeline.build(
        cfg.data,
        vocab,
        seed=cfg.seed,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        state=None,
        run_samples=run_samples,
    )
    batches = [data.train(torch.tensor([index])) for index in range(run_samples)]
    samples = [(b["tokens"][0], b["segments"][0]) for b in batches]
    from data.tokenizer import load_tokenizer

    shards = root / "equivalent"
    shards_in_loader_order(shards, samples, load_tokenizer(tokenizer).describe(), cfg.seed)
    run_dir = root / "from_shards"
    overrides = [a for a in megatron_config(corpus, tokenizer, run_dir) if not a.startswith("data.sources=")]
    overrides = [a.replace("data.source=megatron", "data.source=shards") for a in overrides]
    launch(
        1, [*overrides, f"data.sources=[{{path:{shards}}}]", "data.num_workers=0", "data.shuffle_shards=2"]
    )
    same_rows(train_rows(run_dir), train_rows(one_process), "shards holding the megatron samples")
