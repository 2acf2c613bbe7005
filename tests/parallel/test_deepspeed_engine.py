"""The DeepSpeed engine (parallel.engine=deepspeed) against the megatron engine in one
process, as users launch the trainer.

Every run starts from one megatron seed checkpoint (so `checkpoint.init_from` of a
megatron checkpoint into DeepSpeed's ZeRO partitions is exercised by every layout) and
trains on the same batches with the curriculum of tests/pretrain/test_train.py (masked
normalization over microbatches and ranks, random lengths, complementary pairs, tied
embeddings: the output layer reads the embedding's weight, which ZeRO-3 must gather).
ZeRO-1/2/3 at DP=2, ZeRO-3 with the optimizer offloaded to the CPU, and ZeRO-2 at
TP=2 x DP=2 must give the one-process losses, gradient norms and LR to fp32 tolerance;
a ZeRO-3 run resumed from its step-3 DeepSpeed checkpoint must continue exactly, and at
DP=1 (DeepSpeed's universal checkpoint) to fp32 tolerance. The weights move between the
engines' formats both ways: megatron -> DeepSpeed at every launch above, DeepSpeed ->
megatron (a converted dist copy) into the megatron engine and into `dlm export-hf`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.dist import launch, read_metrics, spawn
from tests.pretrain.test_train import CONFIG, STEPS, _assert_same_steps, _resume_copy

pytestmark = pytest.mark.slow

DEEPSPEED = ["parallel.engine=deepspeed", "zero.stage3_param_persistence_threshold=0"]
LAYOUTS = {  # name: (processes, overrides)
    "zero1_dp2": (2, ["zero=zero1"]),
    "zero2_dp2": (2, ["zero=zero2"]),
    "zero3_dp2": (2, ["zero=zero3"]),
    "zero3_offload_dp2": (2, ["zero=zero3_offload", "zero.optimizer=torch"]),
    "zero2_tp2_dp2": (4, ["zero=zero2", "parallel.tp=2"]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def seed_checkpoint(root) -> Path:
    launch(1, ["--seed-checkpoint", *CONFIG, f"run.dir={root / 'seed'}"])
    return root / "seed" / "checkpoints" / "step_0"


@pytest.fixture(scope="module")
def reference(root, seed_checkpoint) -> Path:
    """The megatron engine in one process."""
    run_dir = root / "reference"
    launch(1, [*CONFIG, f"run.dir={run_dir}", f"checkpoint.init_from={seed_checkpoint}"])
    return run_dir


@pytest.fixture(scope="module")
def layout_runs(root, seed_checkpoint) -> dict[str, Path]:
    runs = {}
    for name, (nproc, overrides) in LAYOUTS.items():
        run_dir = root / name
        start = [f"run.dir={run_dir}", f"checkpoint.init_from={seed_checkpoint}"]
        launch(nproc, [*CONFIG, *DEEPSPEED, *overrides, *start])
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_deepspeed_layout_matches_the_megatron_engine_in_one_process(layout, reference, layout_runs):
    _assert_same_steps(read_metrics(layout_runs[layout]), read_metrics(reference), layout)


def test_deepspeed_run_records_its_config_and_checkpoints(layout_runs):
    run_dir = layout_runs["zero3_offload_dp2"]
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    zero = ds_config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert ds_config["train_batch_size"] == 8 and ds_config["gradient_accumulation_steps"] == 2
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS}"
    state = json.loads((checkpoint / "state.json").read_text())
    assert (state["format"], state["zero_stage"], state["dp"]) == ("deepspeed", 3, 2)
    assert len(list(checkpoint.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one partition per dp rank
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"


def test_zero3_resume_from_its_checkpoint_is_exact(root, layout_runs):
    """3 + 3 steps == 6 steps: weights, ZeRO-partitioned Adam states, schedule, data, RNG."""
    source = layout_runs["zero3_dp2"]
    resumed = _resume_copy(source, 3, root / "zero3_resumed")
    launch(2, [*CONFIG, *DEEPSPEED, "zero=zero3", f"run.dir={resumed}"])
    rows = read_metrics(resumed)
    assert [r["step"] for r in rows] == [4, 5, 6]
    expected = [r for r in read_metrics(source) if r["step"] > 3]
    for got, want in zip(rows, expected, strict=True):
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"]), got["step"]


@pytest.mark.parametrize(
    ("source", "nproc", "overrides"),
    [
        ("zero3_dp2", 1, ["zero=zero3"]),  # DP 2 -> 1
        ("zero2_tp2_dp2", 2, ["zero=zero1", "parallel.tp=2"]),  # DP 2 -> 1 and ZeRO 2 -> 1 at TP=2
    ],
)
def test_resume_at_another_dp_size_through_the_universal_checkpoint(
    root, layout_runs, source, nproc, overrides
):
    resumed = _resume_copy(layout_runs[source], 3, root / f"{source}_universal")
    launch(nproc, [*CONFIG, *DEEPSPEED, *overrides, f"run.dir={resumed}"])
    expected = [r for r in read_metrics(layout_runs[source]) if r["step"] > 3]
    _assert_same_steps(read_metrics(resumed), expected, f"{source} resumed at dp=1")
    checkpoint = resumed / "checkpoints" / "step_3"
    assert (checkpoint / "universal" / "zero").is_dir()
    assert not list(checkpoint.glob("*.tmp")) and not (checkpoint / "latest_universal").exists()


def test_a_deepspeed_checkpoint_does_not_resume_under_the_megatron_engine(root, layout_runs):
    resumed = _resume_copy(layout_runs["zero2_dp2"], STEPS, root / "refused")
    proc = launch(1, [*CONFIG, f"run.dir={resumed}"], check=False)
    assert proc.returncode == 2
    assert "parallel.engine=deepspeed" in proc.stderr


def test_a_deepspeed_seed_checkpoint_is_a_dist_checkpoint_of_the_same_weights(root, reference):
    """Weights only, the DeepSpeed engine (ZeRO-3: gathered) writes megatron's reshardable
    format: the megatron engine started from it reproduces the megatron seed's run."""
    seed = root / "deepspeed_seed"
    launch(1, ["--seed-checkpoint", *CONFIG, *DEEPSPEED, "zero=zero3", f"run.dir={seed}"])
    checkpoint = seed / "checkpoints" / "step_0"
    assert json.loads((checkpoint / "state.json").read_text())["format"] == "torch_dist"
    run_dir = root / "megatron_from_deepspeed_seed"
    launch(1, [*CONFIG, f"run.dir={run_dir}", f"checkpoint.init_from={checkpoint}"])
    _assert_same_steps(read_metrics(run_dir), read_metrics(reference), "megatron from a DeepSpeed seed")


def test_a_deepspeed_checkpoint_starts_the_megatron_engine_through_its_dist_copy(root, layout_runs):
    """The same trained weights, read by DeepSpeed itself (DP 2 -> 1: universal) and by the
    megatron engine (the converted dist copy), train identically from a new optimizer."""
    checkpoint = layout_runs["zero3_dp2"] / "checkpoints" / f"step_{STEPS}"
    runs = {}
    for engine, extra in (("deepspeed", [*DEEPSPEED, "zero=zero3"]), ("megatron", [])):
        runs[engine] = root / f"{engine}_from_zero3"
        launch(1, [*CONFIG, *extra, f"run.dir={runs[engine]}", f"checkpoint.init_from={checkpoint}"])
    assert json.loads((checkpoint / "dist" / "state.json").read_text())["format"] == "torch_dist"
    rows, expected = read_metrics(runs["megatron"]), read_metrics(runs["deepspeed"])
    _assert_same_steps(rows, expected, "megatron vs deepspeed from a DeepSpeed checkpoint")
    assert rows[0]["loss"] < read_metrics(layout_runs["zero3_dp2"])[0]["loss"]  # trained weights


def _live_logits(run_dir: str, overrides: list[str], ids):
    """The DeepSpeed engine's logits after resuming `run_dir` (every rank's; rank 0's kept)."""
    from parallel import shutdown_distributed
    from pretrain.config import load_config
    from pretrain.train import setup

    run = setup(load_config([*CONFIG, *DEEPSPEED, *overrides, f"run.dir={run_dir}"]))
    logits = run.engine.forward_logits(ids, run.derived.vocab_size)
    run.data.close()
    if run.logger:
        run.logger.close()
    shutdown_distributed()
    return logits


@pytest.mark.parametrize(
    ("source", "overrides"),
    [("zero3_dp2", ["zero=zero3"]), ("zero2_tp2_dp2", ["zero=zero2", "parallel.tp=2"])],  # live: 2 ranks
)
def test_a_deepspeed_checkpoint_exports_to_hugging_face_with_the_live_models_logits(
    root, layout_runs, source, overrides
):
    import torch
    from transformers import AutoModelForCausalLM

    live_dir = _resume_copy(layout_runs[source], STEPS, root / f"live_{source}")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    want = spawn(_live_logits, 2, str(live_dir), overrides, ids, timeout=600)[0]
    out = root / f"exported_{source}"
    checkpoint = layout_runs[source] / "checkpoints" / f"step_{STEPS}"
    launch(1, ["export-hf", f"checkpoint={checkpoint}", f"output={out}"], module="pretrain.cli")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def _memory_after_one_step(overrides: list[str]) -> dict[str, int]:
    from parallel import shutdown_distributed
    from pretrain.config import load_config
    from pretrain.train import setup, train_step

    run = setup(load_config(overrides))
    train_step(run)
    report = run.engine.memory_report()
    run.data.close()
    if run.logger:
        run.logger.close()
    shutdown_distributed()
    return report


def test_zero3_shards_weights_and_optimizer_states_over_data_parallel_ranks(root):
    """Per-rank bytes measured from the engine's partitions: about half at DP=2."""
    overrides = [*CONFIG, *DEEPSPEED, "zero=zero3", "train.steps=1"]
    (one,) = spawn(_memory_after_one_step, 1, [*overrides, f"run.dir={root / 'mem1'}"], timeout=600)
    two = spawn(_memory_after_one_step, 2, [*overrides, f"run.dir={root / 'mem2'}"], timeout=600)
    for key in ("weights", "optimizer"):
        assert one[key] > 0
        for rank in two:
            assert 0.45 < rank[key] / one[key] < 0.55, (key, rank[key], one[key])


def _assert_tracks(rows: list[dict], expected: list[dict], rel_tol: float) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        assert math.isclose(got["loss"], want["loss"], rel_tol=rel_tol), (got["step"], got, want)


def test_bf16_zero3_tracks_the_fp32_megatron_reference(root, seed_checkpoint, reference):
    """bf16 (Float16Module around the denoiser, as the megatron engine; DeepSpeed's bf16
    partitions and gradients) from the same seed checkpoint, within bf16 noise."""
    run_dir = root / "bf16_zero3"
    overrides = [*CONFIG, *DEEPSPEED, "zero=zero3", "train.precision=bf16"]
    launch(1, [*overrides, f"run.dir={run_dir}", f"checkpoint.init_from={seed_checkpoint}"])
    _assert_tracks(read_metrics(run_dir), read_metrics(reference), rel_tol=1e-2)


@pytest.mark.gpu
def test_gpu_deepspeed_zero3_bf16_run_tracks_the_cpu_reference(root, seed_checkpoint, reference):
    """On a GPU: DeepSpeed's CUDA accelerator, NCCL, bf16 (the GPU default), Transformer
    Engine layers when installed, ZeRO-3 gathering them, from the CPU reference's seed."""
    run_dir = root / "gpu_zero3"
    overrides = [
        *CONFIG,
        *DEEPSPEED,
        "zero=zero3",
        f"run.dir={run_dir}",
        f"checkpoint.init_from={seed_checkpoint}",
    ]
    proc = launch(1, overrides, gpu=True)
    assert "nccl" in proc.stdout and "bf16" in proc.stdout, proc.stdout[-2000:]
    _assert_tracks(read_metrics(run_dir), read_metrics(reference), rel_tol=1e-2)
