"""Stopping on a signal: every rank stops after the same step with a checkpoint, and
resuming from it continues the run exactly (pretrain/stop.py)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.dist import QUIET, read_metrics, spawn

pytestmark = pytest.mark.slow

STEPS = 6
CONFIG = [
    "model=tiny",
    "data.max_bytes=200000",
    f"train.steps={STEPS}",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "checkpoint.every=0",
    "seed=5",
    *QUIET,
]


def _train(run_dir: str, signal_at: dict[int, int]) -> dict:
    """Train in this rank; after step signal_at[rank], this rank alone gets SIGUSR1."""
    import pretrain.train as train_module
    from pretrain.config import load_config

    rank, original = int(os.environ["RANK"]), train_module.train_step

    def step_then_signal(run):
        metrics = original(run)
        if signal_at.get(rank) == run.step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return metrics

    train_module.train_step = step_then_signal
    run = train_module.train(load_config([*CONFIG, f"run.dir={run_dir}"]))
    weights = {k: v.detach().clone() for k, v in run.engine.module.state_dict().items() if torch.is_tensor(v)}
    from parallel import shutdown_distributed

    shutdown_distributed()
    return {"step": run.step, "weights": weights}


def test_a_signal_on_one_rank_stops_all_at_one_step_and_the_resume_is_exact(tmp_path):
    straight = spawn(_train, 2, str(tmp_path / "straight"), {})
    stopped = tmp_path / "stopped"
    first = spawn(_train, 2, str(stopped), {1: 2})  # rank 1 only, after step 2
    assert [r["step"] for r in first] == [2, 2]
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step_2"
    second = spawn(_train, 2, str(stopped), {0: 4})  # resumed; now rank 0, after step 4
    assert [r["step"] for r in second] == [4, 4]
    last = spawn(_train, 2, str(stopped), {})
    assert [r["step"] for r in last] == [STEPS, STEPS]

    rows = [row for row in read_metrics(stopped) if "loss" in row]
    want = [row for row in read_metrics(tmp_path / "straight") if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # every step exactly once
    for got, expected in zip(rows, want, strict=True):
        assert (got["loss"], got["grad_norm"]) == (expected["loss"], expected["grad_norm"]), got["step"]
    for name, tensor in straight[0]["weights"].items():
        assert torch.equal(last[0]["weights"][name], tensor), name
