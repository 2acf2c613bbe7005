"""`dlm slurm` on a real Slurm cluster (tests/slurm_cluster.py): a 2-task job trains to
completion; preempted twice it resumes every step once and ends with the uninterrupted
run's weights; a rank killed with SIGKILL ends the job at once and the requeue resumes;
hostile override values reach the trainer literally; `dlm slurm pipeline` runs every stage
to a Hugging Face model and a failed stage cancels the later ones (`dlm slurm status`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.slurm import render
from tests.dist import QUIET, REPO, read_metrics, spawn

STEPS = 40
CONFIG = [
    "model=tiny",
    "data.max_bytes=200000",
    f"train.steps={STEPS}",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.log_every=5",
    "checkpoint.every=5",
    "seed=3",
    "cluster.tasks_per_node=2",
    "cluster.cpus_per_task=1",
    "cluster.exit_wait_seconds=10",
    *QUIET,
]
HOSTILE = "$(touch {marker}); `touch {marker}`; x' \" ; rm -rf ~"


def submit(cluster, run_dir: Path, *overrides: str) -> int:
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pretrain.cli", "slurm", "submit", *CONFIG, *overrides, f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(re.search(r"submitted job (\d+)", proc.stdout).group(1))


def log(run_dir: Path, job: int) -> str:
    return (run_dir / "slurm" / f"train-{job}.log").read_text()


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        rows = [line for line in path.read_text().splitlines() if '"loss"' in line] if path.exists() else []
        if len(rows) >= step:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{run_dir} did not reach step {step}")


def wait_requeued(cluster, job: int, restarts: int, timeout: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        info = cluster.job_info(job)
        if int(info.get("Restarts", 0)) >= restarts and info["JobState"] == "PENDING":
            return time.monotonic() - start
        assert info["JobState"] not in ("FAILED", "CANCELLED", "COMPLETED"), info
        time.sleep(0.2)
    raise TimeoutError(f"job {job} was not requeued ({cluster.job_info(job)})")


def train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir) if "loss" in row]


def _weights(checkpoint: str, run_dir: str) -> dict:
    from parallel import load_checkpoint, shutdown_distributed
    from pretrain.config import load_config
    from pretrain.train import setup

    run = setup(load_config([*CONFIG, f"run.dir={run_dir}"]))
    load_checkpoint(Path(checkpoint), run.engine, load_optimizer=False)
    state = run.engine.module.state_dict()
    weights = {
        k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
    }
    run.logger.close()
    shutdown_distributed()
    return weights


def final_weights(run_dir: Path, scratch: Path) -> dict:
    return spawn(_weights, 1, str(run_dir / "checkpoints" / f"step_{STEPS}"), str(scratch), timeout=300)[0]


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """An uninterrupted 2-task job, with a hostile string in a config value."""
    root = tmp_path_factory.mktemp("straight")
    marker = root / "pwned"
    run_dir = root / "run"
    job = submit(cluster, run_dir, f"logging.project={hydra_single_quoted(HOSTILE.format(marker=marker))}")
    assert cluster.wait(job, timeout=300) == "COMPLETED", log(run_dir, job)
    return run_dir, job, marker


def hydra_single_quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_render_quotes_every_value_for_the_shell(tmp_path):
    """The rendered script gives the trainer each override exactly as typed (a stub srun
    prints its arguments), and nothing in them runs."""
    from pretrain.config import load_config

    marker = tmp_path / "pwned"
    hostile = f"logging.project={hydra_single_quoted(HOSTILE.format(marker=marker))}"
    overrides = [*CONFIG, hostile, f"run.dir={tmp_path / 'run'}"]
    script = render(load_config(overrides), overrides, python="python", workdir=tmp_path)
    stub = tmp_path / "bin"
    stub.mkdir()
    srun = '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nprintf "%s\\n" "$@"\n'  # srun's own options
    (stub / "srun").write_text(srun)
    (stub / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for tool in ("srun", "scontrol"):
        (stub / tool).chmod(0o755)
    env = {
        "PATH": f"{stub}:/usr/bin:/bin",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
    }
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    args = [line for line in proc.stdout.splitlines() if not line.startswith("dlm: ")]  # launch.sh's own
    assert args[:3] == ["python", "-m", "pretrain.train"]
    assert hostile in args and args[-1] == f"run.dir={tmp_path / 'run'}"
    assert not marker.exists()


def test_sbatch_lines_refuse_values_that_would_break_out():
    from parallel.topology import ConfigError
    from pretrain.config import load_config

    for bad in ("cluster.partition='gpu\n#SBATCH --uid=0'", "cluster.account='a b'", "cluster.qos='$(id)'"):
        cfg = load_config([*CONFIG, bad])
        with pytest.raises(ConfigError, match="cannot go on an #SBATCH line"):
            render(cfg, [], python="python", workdir=Path("."))


@pytest.mark.slow
def test_submit_trains_a_two_task_job_to_completion(cluster, straight):
    run_dir, job, marker = straight
    assert [row["step"] for row in train_rows(run_dir)] == list(range(1, STEPS + 1))
    derived = yaml.safe_load((run_dir / "derived.json").read_text())
    assert derived["world_size"] == 2 and derived["dp"] == 2
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["logging"]["project"] == HOSTILE.format(marker=marker)  # literally
    assert not marker.exists()
    assert (run_dir / "slurm" / "train.sbatch").is_file() and "dlm: done" in log(run_dir, job)


@pytest.mark.slow
def test_preempted_twice_resumes_every_step_once_and_ends_as_the_straight_run(cluster, straight, tmp_path):
    reference, _, _ = straight
    run_dir = tmp_path / "preempted"
    job = submit(cluster, run_dir)
    for restarts, step in enumerate((7, 23), start=1):
        wait_for_step(run_dir, step)
        cluster.run("scancel", "--signal=USR1", "--batch", str(job))
        wait_requeued(cluster, job, restarts)  # it starts again after CRED_EXPIRE seconds
    assert cluster.wait(job, timeout=300) == "COMPLETED", log(run_dir, job)
    text = log(run_dir, job)
    assert len(re.findall(r"stopped at step \d+ of 40 on SIGUSR1", text)) == 2, text
    assert text.count("requeueing") == 2
    rows, want = train_rows(run_dir), train_rows(reference)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [(r["loss"], r["grad_norm"]) for r in want]
    got, expected = final_weights(run_dir, tmp_path / "w1"), final_weights(reference, tmp_path / "w2")
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def rank_pid(job: int, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"pretrain.train" in cmdline and {
            f"SLURM_JOB_ID={job}".encode(),
            f"SLURM_PROCID={rank}".encode(),
        } <= set(environ):
            return int(entry.name)
    raise LookupError(f"no rank {rank} of job {job}")


@pytest.mark.slow
def test_a_rank_killed_ends_the_job_at_once_and_the_requeue_resumes(cluster, straight, tmp_path):
    reference, _, _ = straight
    run_dir = tmp_path / "killed"
    job = submit(cluster, run_dir)
    wait_for_step(run_dir, 12)
    os.kill(rank_pid(job, 1), signal.SIGKILL)  # rank 0 blocks in the next collective
    assert wait_requeued(cluster, job, 1, timeout=60) < 40  # no hang: the other rank was ended
    assert "failed (exit" in log(run_dir, job)
    assert cluster.wait(job, timeout=300) == "COMPLETED", log(run_dir, job)
    rows = train_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in train_rows(reference)]


@pytest.mark.slow
def test_a_submitit_slurm_sweep_of_two_configurations_completes(cluster, tmp_path):
    """`dlm train -m hydra/launcher=submitit_slurm`: each configuration a Slurm job of 2 tasks."""
    sweep_dir = tmp_path / "sweep"
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    launcher = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=10",
    ]
    settings = [o for o in CONFIG if not o.startswith(("cluster.", "train.steps"))]
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "-m", *launcher, *settings]
    cmd += ["train.steps=4", "optim.lr=1e-3,3e-3", f"run.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = yaml.safe_load((sweep_dir / "sweep.json").read_text())["jobs"]
    assert [job["exit_code"] for job in jobs] == [0, 0]
    for number, lr in ((0, 1e-3), (1, 3e-3)):
        saved = yaml.safe_load((sweep_dir / str(number) / "config.yaml").read_text())
        assert saved["optim"]["lr"] == lr
        derived = yaml.safe_load((sweep_dir / str(number) / "derived.json").read_text())
        assert derived["world_size"] == 2
        assert [row["step"] for row in train_rows(sweep_dir / str(number))] == [1, 2, 3, 4]


# -- dlm slurm pipeline ----------------------------------------------------------------------------
PIPELINE = [
    "model=tiny",
    "data.seq_len=64",
    "train.steps=6",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=3",
    "eval.samples=0",
    "cluster.tasks_per_node=2",
    "cluster.cpus_per_task=1",
    "cluster.exit_wait_seconds=10",
    "pipeline.cpus=1",
    "pipeline.vocab_size=512",
    "pipeline.samples_per_shard=16",
    "pipeline.eval_fraction=0.2",
    "pipeline.eval_args=['eval.batches=2']",
    *QUIET,
]


def corpus(directory: Path, files: int = 4) -> tuple[Path, int]:
    """A few standard-library modules (~50 kB) as .jsonl documents of 1500 characters: enough
    documents for every split and partition. Returns the directory and the document count."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    directory.mkdir(parents=True)
    documents = 0
    for name in ("fnmatch", "glob", "heapq", "shlex")[:files]:
        text = (stdlib / f"{name}.py").read_text()
        chunks = [text[i : i + 1500] for i in range(0, len(text), 1500)]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
        documents += len(chunks)
    return directory, documents


def dlm_slurm(cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pretrain.cli", "slurm", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def pipeline_jobs(run_dir: Path) -> dict[str, int]:
    jobs = json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"]
    return {job["stage"]: int(job["job"]) for job in jobs}


def test_pipeline_dry_run_renders_every_stage_and_refuses_bad_keys(tmp_path, capsys, monkeypatch):
    """No cluster needed: the scripts of the chain, an array over the partitions, and the
    pipeline keys checked before anything is written (in-process: nothing is submitted)."""
    from pretrain import cli

    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "sbatch").write_text("#!/bin/sh\ntouch " + str(tmp_path / "submitted") + "\n")
    (tmp_path / "sbatch").chmod(0o755)
    run_dir = tmp_path / "run"
    base = ["slurm", "pipeline", "--dry-run", *PIPELINE, f"run.dir={run_dir}"]
    assert cli.main([*base, "pipeline.partitions=3", "pipeline.input=[stdlib]"]) == 0, capsys.readouterr().err
    names = sorted(p.stem for p in (run_dir / "slurm").glob("*.sbatch"))
    assert names == ["eval", "export", "merge", "prepare", "tokenizer", "train"]
    prepare = (run_dir / "slurm" / "prepare.sbatch").read_text()
    assert "#SBATCH --array=0-2" in prepare and 'partitions=3 partition="$SLURM_ARRAY_TASK_ID"' in prepare
    train = (run_dir / "slurm" / "train.sbatch").read_text()
    assert f"'data.sources=[{{path:{run_dir}/data,weight:1.0}}]'" in train and "--requeue" in train
    assert not (tmp_path / "submitted").exists() and not (run_dir / "slurm" / "jobs.json").exists()
    for bad, key in (
        ("pipeline.stages=[train,tokenizer]", "pipeline.stages"),
        ("pipeline.stages=[tokenizer,prepare,fit]", "pipeline.stages"),
        ("pipeline.partitions=0", "pipeline.partitions"),
        ("pipeline.tokenizer=/x/tok.json", "pipeline.tokenizer"),
        ("pipeline.input=[]", "pipeline.input"),
    ):
        capsys.readouterr()
        assert cli.main([*base, "pipeline.input=[stdlib]", bad]) == 2, bad
        assert key in capsys.readouterr().err, bad


@pytest.mark.slow
def test_pipeline_runs_every_stage_to_a_model_transformers_loads(cluster, tmp_path):
    import transformers

    run_dir = tmp_path / "run"
    text, documents = corpus(tmp_path / "corpus")
    proc = dlm_slurm(
        cluster,
        "pipeline",
        *PIPELINE,
        "pipeline.partitions=2",
        f"pipeline.input=[{text}]",
        f"run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = pipeline_jobs(run_dir)
    assert list(jobs) == ["tokenizer", "prepare", "merge", "train", "eval", "export"]
    state = cluster.wait(jobs["export"], timeout=420)
    status = dlm_slurm(cluster, "status", str(run_dir))
    assert state == "COMPLETED", status.stdout + cluster.logs()
    assert status.returncode == 0 and "all stages completed" in status.stdout, status.stdout
    assert "2 completed" in status.stdout  # the prepare array's tasks

    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    parts = sorted((run_dir / "data" / "parts").iterdir())
    assert [p.name for p in parts] == ["00000", "00001"] and manifest["splits"]["eval"]["samples"] > 0
    assert manifest["documents_read"] == documents == manifest["documents_written"]
    assert [row["step"] for row in train_rows(run_dir)] == list(range(1, 7))
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["eval_nll"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tokenizer("def heappush(heap, item):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()

    # a stage again, alone: idempotent
    again = cluster.sbatch(run_dir / "slurm" / "merge.sbatch")
    assert cluster.wait(again, timeout=120) == "COMPLETED"
    assert "up to date" in (run_dir / "slurm" / f"merge-{again}.log").read_text()


@pytest.mark.slow
def test_a_failed_stage_cancels_the_later_ones_and_status_names_it(cluster, tmp_path):
    run_dir = tmp_path / "run"
    text, _ = corpus(tmp_path / "corpus")
    (text / "zz-broken.jsonl").write_bytes(b'{"text": "fine"}\n{"text": \n')  # the last partition's file
    args = ["pipeline.partitions=2", f"pipeline.input=[{text}]", "pipeline.prepare_args=['on_error=fail']"]
    proc = dlm_slurm(cluster, "pipeline", *PIPELINE, *args, f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = pipeline_jobs(run_dir)
    for stage in ("merge", "train", "eval", "export"):
        assert cluster.wait(jobs[stage], timeout=240) == "CANCELLED", stage  # not left pending
    assert cluster.job_info(jobs["tokenizer"])["JobState"] == "COMPLETED"
    status = dlm_slurm(cluster, "status", str(run_dir))
    assert status.returncode == 1, status.stdout
    assert "FAILED at stage prepare" in status.stdout and "1 completed, 1 failed" in status.stdout, (
        status.stdout
    )
    assert not (run_dir / "checkpoints").exists()


def test_status_falls_back_to_the_outcomes_the_jobs_recorded(tmp_path):
    """Once slurmctld has forgotten the jobs and there is no accounting (scontrol and sacct
    fail), the status comes from the records slurm/launch.sh wrote."""
    from pretrain.slurm import record_jobs

    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    record_jobs(
        run_dir,
        [
            {"stage": "tokenizer", "job": "11", "script": "t.sbatch", "log": "tokenizer-11.log", "tasks": 1},
            {
                "stage": "prepare",
                "job": "12",
                "script": "p.sbatch",
                "log": "prepare-12_<task>.log",
                "tasks": 2,
            },
            {"stage": "merge", "job": "15", "script": "m.sbatch", "log": "merge-15.log", "tasks": 1},
        ],
    )
    records = {
        "tokenizer": {"job": "11", "array_job": "", "outcome": "done", "exit": 0},
        "tokenizer-0": {"job": "7", "array_job": "", "outcome": "failed", "exit": 1},  # an older submission
        "prepare-0": {"job": "13", "array_job": "12", "outcome": "done", "exit": 0},
        "prepare-1": {"job": "14", "array_job": "12", "outcome": "failed", "exit": 1},
    }
    for name, record in records.items():
        (run_dir / "slurm" / f"status-{name}.json").write_text(json.dumps(record))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("scontrol", "sacct"):
        (bin_dir / tool).write_text(
            "#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n"
        )
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "pretrain.cli", "slurm", "status", str(run_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines()[2:5]}
    assert rows == {"tokenizer": "COMPLETED", "prepare": "FAILED", "merge": "UNKNOWN"}, proc.stdout
    assert "1 completed, 1 failed" in proc.stdout and "FAILED at stage prepare (job 12" in proc.stdout
    nothing = subprocess.run([*cmd[:-1], str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert nothing.returncode == 2 and "no submission recorded" in nothing.stdout
