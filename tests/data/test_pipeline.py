"""The data pipeline inside the trainer: tokenizer -> prepare -> streamed shards ->
`dlm train`, under data and tensor parallelism, with an exact resume of the stream."""

from __future__ import annotations

import math
import shutil
import sysconfig
from pathlib import Path

import pytest

from data.config import PrepareConfig, TokenizerConfig
from tests.dist import QUIET, launch, read_metrics

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    from data.prepare import run as prepare
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pipeline")
    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    tokenizer, _ = train_tokenizer(TokenizerConfig(input=[corpus], output=str(root / "tok"), vocab_size=512))
    prepare(
        PrepareConfig(
            input=[corpus, str(Path(sysconfig.get_paths()["stdlib"]) / "email")],
            output=str(root / "shards"),
            tokenizer=str(tokenizer),
            seq_len=64,
            samples_per_shard=48,
            eval_fraction=0.05,
            workers=1,
            progress=False,
        )
    )
    return root / "shards", tokenizer


def _config(dataset, run_dir: Path) -> list[str]:
    shards, tokenizer = dataset
    return [
        "model=tiny",
        "data.source=shards",
        "data.name=stdlib-json",
        f"data.sources=[{{path:{shards},weight:1.0}}]",
        f"data.tokenizer={tokenizer}",
        "data.seq_len=64",
        "data.num_workers=1",
        f"train.steps={STEPS}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.eval_every=3",
        "train.eval_batches=1",
        "checkpoint.every=3",
        "checkpoint.keep=0",
        "seed=5",
        f"run.dir={run_dir}",
        *QUIET,
    ]


def _same(rows, expected, keys=("loss", "grad_norm", "masked_acc")):
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        for key in keys:
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-7), (got["step"], key)


def test_dp2_stream_resumes_exactly(dataset, tmp_path):
    """Two data-parallel ranks stream disjoint shards; 3 steps + checkpoint (with the
    loader state) + resume + 3 steps == 6 steps, eval included."""
    straight = tmp_path / "straight"
    launch(2, _config(dataset, straight))
    rows = [r for r in read_metrics(straight) if "loss" in r]
    assert len(rows) == STEPS and rows[-1]["loss"] < rows[0]["loss"] + 1.0
    evals = [r for r in read_metrics(straight) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    (resumed / "checkpoints" / "latest").write_text("step_3")
    proc = launch(2, _config(dataset, resumed))
    assert "resumed from" in proc.stdout
    _same([r for r in read_metrics(resumed) if "loss" in r], rows[3:])
    again = [r for r in read_metrics(resumed) if "eval_loss" in r]
    assert again[-1]["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)


def _logged_source(shards: Path, log: Path) -> str:
    """The dataset as a `pipe:` source that appends "<RANK> <shard>" to `log` at every open."""
    command = f'echo "$RANK {{name}}" >> {log} && cat {shards}/{{name}}'
    return f"data.sources=[{{path:'pipe:{command}',weight:1.0}}]"


def _shard_opens(log: Path) -> dict[str, set[str]]:
    """Rank -> shards it opened (manifest reads left out)."""
    opens: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        rank, name = line.split()
        if name.endswith(".tar"):
            opens.setdefault(rank, set()).add(name)
    return opens


@pytest.fixture(scope="module")
def single_process(dataset, tmp_path_factory):
    """(init_from override, metrics) of a 3-step single-process run from a seed checkpoint,
    per model override list (made once each)."""
    runs = {}

    def run(model: tuple[str, ...]):
        if model not in runs:
            root = tmp_path_factory.mktemp("single")
            launch(1, ["--seed-checkpoint", *_config(dataset, root / "seed"), *model])
            init = f"checkpoint.init_from={root / 'seed' / 'checkpoints' / 'step_0'}"
            launch(1, [*_config(dataset, root / "run"), "train.steps=3", init, *model])
            runs[model] = init, [r for r in read_metrics(root / "run") if "loss" in r]
        return runs[model]

    return run


@pytest.mark.parametrize(
    ("name", "nproc", "layout", "readers"),
    [
        ("tp2", 2, ["parallel.tp=2"], {"0"}),
        ("tp2pp2", 4, ["parallel.tp=2", "parallel.pp=2"], {"0", "2"}),
        ("pp4", 4, ["parallel.pp=4", "model.num_layers=4"], {"0", "3"}),
    ],
)
def test_one_rank_per_tensor_parallel_group_reads(
    dataset, single_process, tmp_path, name, nproc, layout, readers
):
    """Shards are opened by the first rank of each tensor-parallel group, on the pipeline
    stages that need tokens only (first: input, last: targets; a middle stage reads
    nothing), counted through a `pipe:` source that logs $RANK; the peers get the batches
    by broadcast, so the losses are the single-process run's."""
    init, expected = single_process(tuple(a for a in layout if a.startswith("model.")))
    log = tmp_path / "opens.log"
    config = [a for a in _config(dataset, tmp_path / "run") if not a.startswith("data.sources=")]
    launch(nproc, [*config, _logged_source(dataset[0], log), "train.steps=3", init, *layout])
    opens = _shard_opens(log)
    assert set(opens) == readers, opens
    for rank in readers:  # every reader streamed train shards and read the eval split
        assert {n.split("-")[0] for n in opens[rank]} == {"train", "eval"}, (rank, opens[rank])
    _same([r for r in read_metrics(tmp_path / "run") if "loss" in r], expected)


def test_shards_from_another_tokenizer_are_refused(dataset, tmp_path):
    from data.tokenizer import train_tokenizer

    other, _ = train_tokenizer(
        TokenizerConfig(
            input=[sysconfig.get_paths()["stdlib"] + "/json"], output=str(tmp_path), vocab_size=400
        )
    )
    overrides = [a for a in _config(dataset, tmp_path / "run") if not a.startswith("data.tokenizer=")]
    proc = launch(1, [*overrides, f"data.tokenizer={other}"], check=False)
    assert proc.returncode == 2
    assert "data.tokenizer" in proc.stderr and "dlm prepare" in proc.stderr


def test_a_stream_too_small_for_its_reader_slots_fails_fast(dataset, tmp_path):
    # a few thousand samples cannot give each of 2 ranks x 1 worker one micro batch of 4096
    overrides = ["train.micro_batch_size=4096", "train.global_batch_size=8192"]
    proc = launch(2, [*_config(dataset, tmp_path / "run"), *overrides], check=False)
    assert proc.returncode != 0  # each rank exits 2; torchrun reports 1
    assert "data.num_workers" in proc.stderr and "train.micro_batch_size=4096" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def _prepare_more(dataset, out: Path, package: str, eval_fraction: float) -> Path:
    from data.prepare import run as prepare

    prepare(
        PrepareConfig(
            input=[str(Path(sysconfig.get_paths()["stdlib"]) / package)],
            output=str(out),
            tokenizer=str(dataset[1]),
            seq_len=64,
            samples_per_shard=48,
            eval_fraction=eval_fraction,
            workers=1,
            progress=False,
        )
    )
    return out


def _stream(sources: list[tuple[Path, float]], tokenizer: Path):
    from data import pipeline
    from pretrain.config import DataConfig, SourceConfig

    cfg = DataConfig(
        name="mix",
        source="shards",
        seq_len=64,
        sources=[SourceConfig(path=str(p), weight=w) for p, w in sources],
        tokenizer=str(tokenizer),
        num_workers=0,
    )
    vocab = pipeline.describe(cfg)
    stream = pipeline.build(cfg, vocab, seed=0, micro_batch_size=4, dp_rank=0, dp_size=1, state=None)
    return stream, vocab


def test_batches_carry_document_segments_and_eval_mixes_every_source(dataset, tmp_path):
    """Train and eval batches hold the shards' segments (EOS-delimited documents, as the
    byte sources derive them); eval draws on every source's eval split by weight."""
    import torch

    from data import pipeline

    shards, tokenizer = dataset
    other = _prepare_more(dataset, tmp_path / "unittest", "unittest", eval_fraction=0.2)
    stream, vocab = _stream([(shards, 1.0), (other, 1.0)], tokenizer)
    try:
        batch = stream.train(torch.arange(4))
        seg = batch["segments"]
        assert batch["tokens"].shape == seg.shape == (4, 64)
        derived = pipeline.eos_segments(batch["tokens"], vocab.eos_id)
        assert torch.equal(seg - seg[:, :1], derived)  # stored numbers start at the running document
        splits = [pipeline.read_split(str(p), "eval") for p in (shards, other)]
        sizes = [s["tokens"].shape[0] for s in splits]
        mixed = stream.eval(torch.arange(sum(sizes)))
        # both fit their half of 4096 samples: every eval sample of both, once
        assert sorted(map(tuple, mixed["tokens"].tolist())) == sorted(
            map(tuple, torch.cat([s["tokens"] for s in splits]).tolist())
        )
        mixed_seg = mixed["segments"] - mixed["segments"][:, :1]
        assert torch.equal(mixed_seg, pipeline.eos_segments(mixed["tokens"], vocab.eos_id))
    finally:
        stream.close()
    small = pipeline.eval_mixture([(str(shards), 3.0), (str(other), 1.0)], limit=8)["tokens"]
    from_first = sum(any(torch.equal(r, s) for s in splits[0]["tokens"]) for r in small)
    assert (len(small), from_first) == (8, 6)  # 3:1
    empty = _prepare_more(dataset, tmp_path / "no_eval", "html", eval_fraction=0.0)
    with pytest.raises(pipeline.DataConfigError, match=f"{empty}.* has none"):
        pipeline.eval_mixture([(str(shards), 1.0), (str(empty), 1.0)])


def test_hugging_face_tokenizer_prepare_and_train(tmp_path):
    """A tokenizer.json without a mask token (as an imported AR model's): `dlm prepare`
    with it, then `dlm train` with model.mask_token_id an appended row; without it, exit 2."""
    from data.prepare import run as prepare
    from data.tokenizer import HFTokenizer
    from tests.data.test_tokenizer import build_hf_tokenizer

    hf_dir = build_hf_tokenizer(tmp_path / "tokenizer")
    vocab = HFTokenizer(hf_dir).vocab_size
    manifest = prepare(
        PrepareConfig(
            input=[str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
            output=str(tmp_path / "shards"),
            tokenizer=str(hf_dir),
            seq_len=64,
            samples_per_shard=16,
            workers=1,
            progress=False,
        )
    )
    assert manifest["tokenizer"]["mask_id"] is None
    overrides = [
        "model=tiny",
        "data.source=shards",
        f"data.sources=[{{path:{tmp_path / 'shards'},weight:1.0}}]",
        f"data.tokenizer={hf_dir}",
        "data.seq_len=64",
        "data.num_workers=1",
        "train.steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_every=0",
        f"model.vocab_size={vocab + 1}",
        *QUIET,
    ]
    run_dir = tmp_path / "run"
    launch(1, [*overrides, f"model.mask_token_id={vocab}", f"run.dir={run_dir}"])
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    proc = launch(1, [*overrides, f"run.dir={tmp_path / 'nomask'}"], check=False)
    assert proc.returncode == 2
    assert "declares no mask token" in proc.stderr and "model.mask_token_id" in proc.stderr
    assert not (tmp_path / "nomask" / "checkpoints").exists()
