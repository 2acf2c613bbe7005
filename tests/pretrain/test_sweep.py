"""`dlm <command> -m`: sweeps through Hydra's launcher plug-ins, one run dir per job."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from tests.dist import QUIET, launch, read_metrics

TINY = ["model=tiny", "data.max_bytes=200000", "train.global_batch_size=4", "train.log_every=1", *QUIET]


def sweep_json(sweep_dir) -> list[dict]:
    return json.loads((sweep_dir / "sweep.json").read_text())["jobs"]


@pytest.mark.slow
def test_basic_launcher_2x2_sweep_has_a_run_dir_per_combination(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = launch(
        1,
        [
            "train",
            "-m",
            *TINY,
            "optim.lr=1e-3,3e-3",
            "train.micro_batch_size=2,4",
            "train.steps=3",
            f"run.dir={sweep_dir}",
        ],
        module="pretrain.cli",
    )
    jobs = sweep_json(sweep_dir)
    combinations = list(itertools.product([1e-3, 3e-3], [2, 4]))  # Hydra's order: the last key varies fastest
    assert [job["number"] for job in jobs] == [0, 1, 2, 3]
    for job, (lr, micro) in zip(jobs, combinations, strict=True):
        run_dir = sweep_dir / str(job["number"])
        assert job["output"] == str(run_dir) and job["exit_code"] == 0
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (saved["optim"]["lr"], saved["train"]["micro_batch_size"]) == (lr, micro)
        assert saved["run"]["dir"] == str(run_dir) and saved["train"]["steps"] == 3
        losses = [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
        assert len(losses) == 3 and job["final_loss"] == losses[-1]
        assert (run_dir / "checkpoints" / "latest").is_file()
    assert "sweep: 4 jobs of dlm train" in proc.stdout and "0 failed" in proc.stdout
    assert (sweep_dir / "multirun.yaml").is_file()  # Hydra's record of the sweep

    # dlm eval sweeps over checkpoints: each job's eval.json in its own directory
    evals = tmp_path / "evals"
    checkpoints = f"checkpoint={sweep_dir / '0'},{sweep_dir / '3'}"
    launch(
        1,
        ["eval", "-m", checkpoints, "eval.draws=1", "eval.samples=0", f"output={evals}"],
        module="pretrain.cli",
    )
    for job, run in zip(sweep_json(evals), ("0", "3"), strict=True):
        result = json.loads((evals / str(job["number"]) / "eval.json").read_text())
        assert result["checkpoint"] == str(sweep_dir / run / "checkpoints" / "step_3")
        assert job["eval_nll"] == result["eval_nll"] and result["draws"] == 1


@pytest.mark.slow
def test_a_failed_job_is_reported_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = launch(
        1,
        ["train", "--multirun", *TINY, "train.micro_batch_size=3,2", "train.steps=1", f"run.dir={sweep_dir}"],
        module="pretrain.cli",
        check=False,
    )
    assert proc.returncode == 1
    failed, done = sweep_json(sweep_dir)
    assert failed["exit_code"] == 2 and failed["final_loss"] is None
    assert done["exit_code"] == 0 and done["final_loss"] is not None
    assert "must be even" in proc.stderr or "not a multiple" in proc.stderr
    assert "1 failed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_other_launcher_plugins_run_the_jobs(tmp_path, launcher):
    """joblib: parallel local processes; submitit_local: submitit's job machinery (the
    Slurm launcher is the same plug-in with the Slurm executor), here with two tasks per
    job that form its process group."""
    sweep_dir = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"]
    if launcher == "submitit_local":
        extra = [
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10",
            "train.micro_batch_size=2",
        ]
    launch(
        1,
        [
            "train",
            "-m",
            f"hydra/launcher={launcher}",
            *extra,
            *TINY,
            "seed=0,1",
            "train.steps=2",
            f"run.dir={sweep_dir}",
        ],
        module="pretrain.cli",
    )
    jobs = sweep_json(sweep_dir)
    assert [job["exit_code"] for job in jobs] == [0, 0]
    seeds = [yaml.safe_load((sweep_dir / str(n) / "config.yaml").read_text())["seed"] for n in (0, 1)]
    assert seeds == [0, 1]
    assert jobs[0]["final_loss"] != jobs[1]["final_loss"]  # different seeds, different runs
    world = json.loads((sweep_dir / "0" / "derived.json").read_text())["world_size"]
    assert world == (2 if launcher == "submitit_local" else 1)


@pytest.mark.slow
def test_a_sweep_under_torchrun_is_refused_with_the_way_to_do_it(tmp_path):
    proc = launch(2, ["train", "-m", "seed=0,1", f"run.dir={tmp_path}"], module="pretrain.cli", check=False)
    assert proc.returncode != 0 and "hydra.launcher.tasks_per_node=N" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_sweeping_the_output_is_refused(tmp_path):
    proc = launch(1, ["train", "-m", "run.dir=a,b"], module="pretrain.cli", check=False)
    assert proc.returncode == 2 and "do not sweep it" in proc.stderr
