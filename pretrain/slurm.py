"""`dlm slurm submit [--dry-run] [overrides]`: a training job for Slurm.

The batch script is rendered from the resolved config (the `cluster.*` keys: nodes, GPUs,
CPUs, memory, partition, account, qos, time, constraint, extra #SBATCH lines) into
`<run.dir>/slurm/train.sbatch`, printed, and submitted with sbatch (`--dry-run`: not
submitted). It runs one process per GPU (per task without GPUs) through slurm/launch.sh:
the rendezvous from the allocation, the time-limit warning (`--signal=B:USR1@S`) forwarded
to the ranks, which stop at one step with a checkpoint, and the requeue that resumes the
run from it. The overrides reach the trainer unchanged, each quoted for the shell.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
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


def sbatch_header(cfg: Config, run_dir: Path) -> list[str]:
    """The #SBATCH lines, every value checked (none may break out of its line)."""
    c = cfg.cluster
    options = {
        "job-name": "dlm-" + re.sub(r"[^\w.-]", "_", run_dir.name),
        "nodes": c.nodes,
        "ntasks-per-node": tasks_per_node(cfg),
        "gpus-per-node": c.gpus_per_node or None,
        "cpus-per-task": c.cpus_per_task,
        "mem": c.mem,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "time": c.time,
        "constraint": c.constraint,
        "output": run_dir / "slurm" / "%j.log",
        "open-mode": "append",
        "signal": f"B:USR1@{c.signal_seconds}",
        "requeue": True,
    }
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


def render(cfg: Config, overrides: list[str], *, python: str, workdir: Path) -> str:
    """The batch script of a training job with these overrides."""
    run_dir = Path(cfg.run.dir).resolve()
    c = cfg.cluster
    args = [python, "-m", "pretrain.train", *[o for o in overrides if not o.startswith("run.dir=")]]
    args.append(f"run.dir={hydra_quote(str(run_dir))}")
    body = [
        "",
        "# Rendered by `dlm slurm submit` from the resolved config (run.dir/config.yaml after the",
        "# first start); render again rather than edit. Runtime: slurm/launch.sh.",
        "set -u",
        f"export DLM_MAX_REQUEUES={c.max_requeues} DLM_MAX_FAILURES={c.max_failures} "
        f"DLM_EXIT_WAIT={c.exit_wait_seconds}",
        f"export DLM_STATE_DIR={shlex.quote(str(run_dir / 'slurm'))}",
    ]
    if c.env_file:
        body.append(f"source {shlex.quote(str(Path(c.env_file).resolve()))}")
    body += [
        f"cd {shlex.quote(str(workdir))}",
        f"source {shlex.quote(str(LAUNCH))}",
        "dlm_launch " + " ".join(shlex.quote(arg) for arg in args),
    ]
    return "\n".join(["#!/bin/bash", *sbatch_header(cfg, run_dir), *body]) + "\n"


def submit(cfg: Config, overrides: list[str], dry_run: bool) -> int:
    from pretrain.train import preflight

    run_dir = Path(cfg.run.dir).resolve()
    preflight(cfg, world_size=cfg.cluster.nodes * tasks_per_node(cfg))  # the job's layout
    if cfg.cluster.env_file and not Path(cfg.cluster.env_file).is_file():
        raise ConfigError(f"cluster.env_file={cfg.cluster.env_file}: no such file")
    script = render(cfg, overrides, python=sys.executable, workdir=Path.cwd())
    path = run_dir / "slurm" / "train.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, script)
    print(script, end="")
    print(f"# written to {path}")
    if dry_run:
        return 0
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"dlm slurm submit: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}: log {run_dir / 'slurm' / f'{job}.log'}, metrics {run_dir / 'metrics.jsonl'}")
    return 0


def main(argv: list[str]) -> int:
    """`dlm slurm submit [--dry-run] [overrides]`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not argv or argv[0] != "submit":
        print("usage: dlm slurm submit [--dry-run] [key=value ...]", file=sys.stderr)
        return 2
    dry_run = "--dry-run" in argv
    overrides = [a for a in argv[1:] if a != "--dry-run"]
    try:
        cfg = load_config(overrides)
        return submit(cfg, overrides, dry_run)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"dlm slurm submit: invalid configuration: {e}", file=sys.stderr)
        return 2
