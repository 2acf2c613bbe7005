"""`dlm slurm submit [--dry-run] [overrides]`: a training job for Slurm (and the script
rendering shared by `dlm slurm pipeline`, pretrain/slurm_pipeline.py; `dlm slurm status`,
pretrain/slurm_status.py).

The batch script is rendered from the resolved config (the `cluster.*` keys: nodes, GPUs,
CPUs, memory, partition, account, qos, time, constraint, extra #SBATCH lines) into
`<run.dir>/slurm/train.sbatch`, printed, and submitted with sbatch (`--dry-run`: not
submitted). It runs one process per GPU (per task without GPUs) through slurm/launch.sh:
the rendezvous from the allocation, the time-limit warning (`--signal=B:USR1@S`) forwarded
to the ranks, which stop at one step with a checkpoint, and the requeue that resumes the
run from it. The overrides reach the trainer unchanged, each quoted for the shell. The
job ids go to `<run.dir>/slurm/jobs.json` for `dlm slurm status`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from data.files import write_atomic
from parallel.topology import ConfigError
from pretrain.confdoc import hydra_quote
from pretrain.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "slurm" / "launch.sh"
SAFE_SBATCH_VALUE = re.compile(r"[^\s'\"\\`$;]+")  # #SBATCH lines are read by sbatch, not a shell


def tasks_per_node(cfg: Config) -> int:
    c = cfg.cluster
    return c.tasks_per_node or c.gpus_per_node or 1


def train_resources(cfg: Config) -> dict:
    """The training job's allocation (also the eval stage's: the same layout fits)."""
    c = cfg.cluster
    return {
        "nodes": c.nodes,
        "ntasks-per-node": tasks_per_node(cfg),
        "gpus-per-node": c.gpus_per_node or None,
        "cpus-per-task": c.cpus_per_task,
        "mem": c.mem,
        "time": c.time,
    }


def single_task_resources(cfg: Config) -> dict:
    """One process with pipeline.cpus cores: tokenizer, prepare (per array task), merge, export."""
    return {"nodes": 1, "ntasks": 1, "cpus-per-task": cfg.pipeline.cpus, "time": cfg.pipeline.time}


def sbatch_header(cfg: Config, run_dir: Path, stage: str = "train", array: str | None = None) -> list[str]:
    """The #SBATCH lines of one stage's job, every value checked (none may break out of its line)."""
    c = cfg.cluster
    resources = train_resources(cfg) if stage in ("train", "eval") else single_task_resources(cfg)
    if stage == "eval":
        resources["time"] = cfg.pipeline.time
    log = f"{stage}-%A_%a.log" if array else f"{stage}-%j.log"
    options = {
        "job-name": f"dlm-{stage}-" + re.sub(r"[^\w.-]", "_", run_dir.name),
        **resources,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "array": array,
        "output": run_dir / "slurm" / log,
        "open-mode": "append",
    }
    if stage == "train":
        options |= {"signal": f"B:USR1@{c.signal_seconds}", "requeue": True}
    lines = []
    for key, value in options.items():
        if value is None:
            continue
        text = f"--{key}" if value is True else f"--{key}={value}"
        lines.append(f"#SBATCH {_checked(text, f'cluster.{key}')}")
    return lines + [f"#SBATCH {_checked(extra, 'cluster.sbatch_extra')}" for extra in c.sbatch_extra]


def _checked(text: str, key: str) -> str:
    if not SAFE_SBATCH_VALUE.fullmatch(text):
        raise ConfigError(
            f"{key}: {text!r} cannot go on an #SBATCH line (whitespace, quotes or shell characters)"
        )
    return text


def train_command(cfg: Config, overrides: list[str], python: str) -> list[str]:
    """The trainer's command line: the overrides unchanged, run.dir pinned absolute."""
    run_dir = Path(cfg.run.dir).resolve()
    args = [python, "-m", "pretrain.train", *[o for o in overrides if not o.startswith("run.dir=")]]
    return args + [f"run.dir={hydra_quote(str(run_dir))}"]


def render(cfg: Config, overrides: list[str], *, python: str, workdir: Path) -> str:
    """The batch script of a training job with these overrides."""
    return batch_script(cfg, "train", train_command(cfg, overrides, python), workdir=workdir)


def batch_script(
    cfg: Config,
    stage: str,
    command: list[str],
    *,
    workdir: Path,
    array: str | None = None,
    shell_tail: str = "",
) -> str:
    """One stage's batch script: `command` quoted word by word for the shell, then
    `shell_tail` as written (the array task's `partition="$SLURM_ARRAY_TASK_ID"`)."""
    run_dir = Path(cfg.run.dir).resolve()
    c = cfg.cluster
    failures = c.max_failures if stage == "train" else 0  # data and export errors would recur
    body = [
        "",
        f"# Rendered by `dlm slurm` from the resolved config ({stage} stage); render again rather",
        "# than edit. Runtime: slurm/launch.sh.",
        "set -u",
        f"export DLM_MAX_REQUEUES={c.max_requeues} DLM_MAX_FAILURES={failures} "
        f"DLM_EXIT_WAIT={c.exit_wait_seconds} DLM_STAGE={stage}",
        f"export DLM_STATE_DIR={shlex.quote(str(run_dir / 'slurm'))}",
    ]
    if c.env_file:
        body.append(f"source {shlex.quote(str(Path(c.env_file).resolve()))}")
    launch = "dlm_launch " + " ".join(shlex.quote(arg) for arg in command)
    body += [
        f"cd {shlex.quote(str(workdir))}",
        f"source {shlex.quote(str(LAUNCH))}",
        launch + (f" {shell_tail}" if shell_tail else ""),
    ]
    return "\n".join(["#!/bin/bash", *sbatch_header(cfg, run_dir, stage, array), *body]) + "\n"


def write_script(run_dir: Path, name: str, text: str) -> Path:
    path = run_dir / "slurm" / f"{name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path


def sbatch(path: Path, depends_on: list[str] = ()) -> str:
    """Submit a script; with depends_on, it starts once they all succeeded and is cancelled
    (not left pending) when one of them fails."""
    cmd = ["sbatch", "--parsable"]
    if depends_on:
        cmd += [f"--dependency=afterok:{':'.join(depends_on)}", "--kill-on-invalid-dep=yes"]
    proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


class SubmitError(RuntimeError):
    """sbatch refused a job (the message holds its error)."""


JOBS = "jobs.json"  # <run.dir>/slurm/jobs.json: the jobs of the last submission, for `dlm slurm status`


def record_jobs(run_dir: Path, jobs: list[dict]) -> None:
    """[{stage, job, script, log, tasks}] of one submission (`dlm slurm status` reads it)."""
    record = {"format": "dlm-slurm-jobs/1", "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": jobs}
    write_atomic(run_dir / "slurm" / JOBS, json.dumps(record, indent=2) + "\n")


def log_path(run_dir: Path, stage: str, job: str, array: bool = False) -> str:
    return str(run_dir / "slurm" / (f"{stage}-{job}_<task>.log" if array else f"{stage}-{job}.log"))


def submit(cfg: Config, overrides: list[str], dry_run: bool) -> int:
    from pretrain.train import preflight

    run_dir = Path(cfg.run.dir).resolve()
    preflight(cfg, world_size=cfg.cluster.nodes * tasks_per_node(cfg))  # the job's layout
    check_env_file(cfg)
    path = write_script(run_dir, "train", render(cfg, overrides, python=sys.executable, workdir=Path.cwd()))
    print(path.read_text(), end="")
    print(f"# written to {path}")
    if dry_run:
        return 0
    job = sbatch(path)
    log = log_path(run_dir, "train", job)
    record_jobs(run_dir, [{"stage": "train", "job": job, "script": str(path), "log": log, "tasks": 1}])
    print(f"submitted job {job}: log {log}, metrics {run_dir / 'metrics.jsonl'}")
    return 0


def check_env_file(cfg: Config) -> None:
    if cfg.cluster.env_file and not Path(cfg.cluster.env_file).is_file():
        raise ConfigError(f"cluster.env_file={cfg.cluster.env_file}: no such file")


USAGE = """usage: dlm slurm submit [--dry-run] [key=value ...]     a training job
       dlm slurm pipeline [--dry-run] [key=value ...]   tokenizer -> prepare -> train -> eval -> export
       dlm slurm status RUN_DIR                        the state of each job of the last submission"""


def main(argv: list[str]) -> int:
    """`dlm slurm submit|pipeline [--dry-run] [overrides]`, `dlm slurm status RUN_DIR`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not argv or argv[0] not in ("submit", "pipeline", "status"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "status":
        from pretrain.slurm_status import main as status_main

        return status_main(argv[1:])
    dry_run = "--dry-run" in argv
    overrides = [a for a in argv[1:] if a != "--dry-run"]
    try:
        cfg = load_config(overrides)
        if argv[0] == "pipeline":
            from pretrain.slurm_pipeline import submit_pipeline

            return submit_pipeline(cfg, overrides, dry_run)
        return submit(cfg, overrides, dry_run)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"dlm slurm {argv[0]}: invalid configuration: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"dlm slurm {argv[0]}: {e}", file=sys.stderr)
        return 1
