"""`dlm slurm pipeline [--dry-run] [overrides]`: the whole chain as dependent Slurm jobs.

    tokenizer -> prepare (an array job over pipeline.partitions input partitions) -> merge
              -> train -> eval -> export

The overrides are the training run's (model, optim, cluster, ... and run.dir), plus the
`pipeline.*` keys: the corpus (`pipeline.input`), which stages to submit, where the
tokenizer, dataset and Hugging Face export go (by default under run.dir), and per-stage
extra overrides. The train stage reads the prepared dataset (data.source=shards,
data.sources, data.tokenizer are set to it) with data.seq_len, which prepare packs to.

Each stage is a batch script in `<run.dir>/slurm/<stage>.sbatch` (rendered like `dlm slurm
submit`'s, through slurm/launch.sh), submitted with `--dependency=afterok:<previous>
--kill-on-invalid-dep=yes`: a stage starts once the one before it succeeded, and when a
stage fails Slurm cancels every later one instead of leaving it pending. Every stage is
idempotent, so one can be submitted again alone (`sbatch <run.dir>/slurm/<stage>.sbatch`) or
the whole pipeline again: the tokenizer and a prepared dataset say 'up to date', training
resumes from its last checkpoint (and stops at once when finished), eval and export redo
their output. `dlm slurm status RUN_DIR` shows each stage's state and names a failed one.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from parallel.topology import ConfigError
from pretrain.confdoc import hydra_quote
from pretrain.config import PIPELINE_STAGES, Config, load_config, validate
from pretrain.slurm import (
    batch_script,
    check_env_file,
    log_path,
    record_jobs,
    sbatch,
    tasks_per_node,
    train_command,
    write_script,
)

ARRAY_TASK = 'partition="$SLURM_ARRAY_TASK_ID"'  # expanded by the job's shell, not quoted


@dataclass
class Stage:
    name: str  # tokenizer | prepare | merge | train | eval | export
    command: list[str]  # quoted word by word in the script
    tasks: int = 1  # array tasks (prepare over partitions), else 1
    shell_tail: str = ""  # appended unquoted (the array task's partition)

    @property
    def array(self) -> str | None:
        return f"0-{self.tasks - 1}" if self.tasks > 1 else None


def hydra_list(values: list[str]) -> str:
    return "[" + ",".join(hydra_quote(v) for v in values) + "]"


def data_overrides(cfg: Config) -> list[str]:
    """What points the train (and eval) stage at the pipeline's dataset."""
    p = cfg.pipeline
    data = hydra_quote(str(Path(p.data).resolve()))
    return [
        "data.source=shards",
        f"data.sources=[{{path:{data},weight:1.0}}]",
        f"data.tokenizer={hydra_quote(str(Path(p.tokenizer).resolve()))}",
    ]


def cli(python: str, command: str) -> list[str]:
    return [python, "-m", "pretrain.cli", command]


def tokenizer_stage(cfg: Config, python: str) -> Stage:
    p, model = cfg.pipeline, Path(cfg.pipeline.tokenizer).resolve()
    args = [f"input={hydra_list(p.input)}", f"output={hydra_quote(str(model.parent))}"]
    args += [f"name={hydra_quote(model.stem)}", f"vocab_size={p.vocab_size}", f"num_threads={p.cpus}"]
    return Stage("tokenizer", cli(python, "tokenizer") + args + list(p.tokenizer_args))


def prepare_stages(cfg: Config, python: str) -> list[Stage]:
    """One prepare job, or an array over the partitions followed by the merge."""
    p = cfg.pipeline
    args = [
        f"input={hydra_list(p.input)}",
        f"output={hydra_quote(str(Path(p.data).resolve()))}",
        f"tokenizer={hydra_quote(str(Path(p.tokenizer).resolve()))}",
        f"seq_len={cfg.data.seq_len}",
        f"eval_fraction={p.eval_fraction}",
        f"samples_per_shard={p.samples_per_shard}",
        f"workers={p.cpus}",
        "progress=false",
        *p.prepare_args,
    ]
    command = cli(python, "prepare") + args
    if p.partitions == 1:
        return [Stage("prepare", command)]
    command.append(f"partitions={p.partitions}")
    merge = cli(python, "prepare") + ["merge", *args, f"partitions={p.partitions}"]
    return [Stage("prepare", command, p.partitions, ARRAY_TASK), Stage("merge", merge)]


def train_stage(cfg: Config, overrides: list[str], python: str) -> Stage:
    return Stage("train", train_command(cfg, [*overrides, *data_overrides(cfg)], python))


def eval_stage(cfg: Config, python: str) -> Stage:
    run_dir = Path(cfg.run.dir).resolve()
    args = [f"checkpoint={hydra_quote(str(run_dir))}", f"output={hydra_quote(str(run_dir / 'eval'))}"]
    return Stage("eval", [python, "-m", "pretrain.evaluate", *args, *cfg.pipeline.eval_args])


def export_stage(cfg: Config, python: str) -> Stage:
    run_dir, out = Path(cfg.run.dir).resolve(), Path(cfg.pipeline.export).resolve()
    args = [f"checkpoint={hydra_quote(str(run_dir))}", f"output={hydra_quote(str(out))}", "overwrite=true"]
    return Stage("export", cli(python, "export-hf") + args + ["progress=false", *cfg.pipeline.export_args])


def stages(cfg: Config, overrides: list[str], python: str) -> list[Stage]:
    """The jobs of pipeline.stages, in order."""
    build = {
        "tokenizer": lambda: [tokenizer_stage(cfg, python)],
        "prepare": lambda: prepare_stages(cfg, python),
        "train": lambda: [train_stage(cfg, overrides, python)],
        "eval": lambda: [eval_stage(cfg, python)],
        "export": lambda: [export_stage(cfg, python)],
    }
    return [stage for name in cfg.pipeline.stages for stage in build[name]()]


def check_pipeline(cfg: Config, overrides: list[str]) -> None:
    """The pipeline keys, and the train config as the train stage will compose it."""
    p = cfg.pipeline
    if not p.stages or any(s not in PIPELINE_STAGES for s in p.stages):
        raise ConfigError(f"pipeline.stages={list(p.stages)}: a non-empty subset of {list(PIPELINE_STAGES)}")
    if list(p.stages) != [s for s in PIPELINE_STAGES if s in p.stages]:
        raise ConfigError(f"pipeline.stages={list(p.stages)}: in the order {list(PIPELINE_STAGES)}")
    if {"tokenizer", "prepare"} & set(p.stages) and not p.input:
        raise ConfigError("pipeline.input=[...] is empty: the corpus the tokenizer and prepare stages read")
    if "tokenizer" in p.stages and not p.tokenizer.endswith(".model"):
        raise ConfigError(f"pipeline.tokenizer={p.tokenizer}: the tokenizer stage writes a .model file")
    for key in ("vocab_size", "partitions", "samples_per_shard", "cpus"):
        if getattr(p, key) < 1:
            raise ConfigError(f"pipeline.{key}={getattr(p, key)} must be positive")
    check_env_file(cfg)
    train_cfg = load_config([*overrides, *data_overrides(cfg)])
    if "prepare" in p.stages:
        validate(train_cfg)  # the dataset does not exist yet
    elif "train" in p.stages:
        from pretrain.train import preflight

        preflight(train_cfg, world_size=cfg.cluster.nodes * tasks_per_node(cfg))


def submit_pipeline(cfg: Config, overrides: list[str], dry_run: bool) -> int:
    check_pipeline(cfg, overrides)
    run_dir = Path(cfg.run.dir).resolve()
    scripts = []
    for stage in stages(cfg, overrides, sys.executable):
        text = batch_script(
            cfg, stage.name, stage.command, workdir=Path.cwd(), array=stage.array, shell_tail=stage.shell_tail
        )
        scripts.append((stage, write_script(run_dir, stage.name, text)))
        print(f"# {stage.name}: {scripts[-1][1]}\n{text}")
    if dry_run:
        return 0
    jobs = submit_chain(run_dir, scripts)
    for job in jobs:
        print(f"{job['stage']:<10} job {job['job']:<8} log {job['log']}")
    print(f"submitted {len(jobs)} jobs; `dlm slurm status {run_dir}` shows their state")
    return 0


def submit_chain(run_dir: Path, scripts: list[tuple[Stage, Path]]) -> list[dict]:
    """sbatch each script after the previous one; if sbatch refuses one, the jobs already
    submitted are cancelled (no half-submitted chain)."""
    jobs: list[dict] = []
    try:
        for stage, path in scripts:
            job = sbatch(path, [jobs[-1]["job"]] if jobs else [])
            log = log_path(run_dir, stage.name, job, array=stage.tasks > 1)
            jobs.append(
                {"stage": stage.name, "job": job, "script": str(path), "log": log, "tasks": stage.tasks}
            )
    except Exception:
        if jobs:
            subprocess.run(["scancel", *[j["job"] for j in jobs]], capture_output=True)
        raise
    record_jobs(run_dir, jobs)
    return jobs
