"""`dlm <command> -m key=a,b group=x,y ...`: a sweep through Hydra's multirun, one job
per combination of the comma lists, launched by a Hydra launcher plug-in:

    hydra/launcher=basic           (default) one job after another, in this process
    hydra/launcher=joblib          parallel local processes (hydra.launcher.n_jobs=N)
    hydra/launcher=submitit_local  each job a local subprocess, through submitit
    hydra/launcher=submitit_slurm  each job a Slurm job (hydra.launcher.partition=...,
                                   nodes, tasks_per_node, gpus_per_node, timeout_min)

Each job runs the command exactly as `dlm <command> <its overrides>` would (the same
validation, the same code), with its output (train: run.dir) in <sweep dir>/<job number>.
The sweep dir is the output given on the command line (run.dir=DIR for train, output=DIR
for the data and conversion commands), else runs/multirun/<command>-<time>. At the end:
a summary (run dirs, status, final loss or NLL bound), printed and written to
<sweep dir>/sweep.json. `dlm eval` sweeps too (checkpoints, eval.* settings): each job's
eval.json lands in its job directory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from data.files import write_atomic
from parallel.topology import ConfigError, LaunchEnv
from pretrain.cli import COMMANDS, Command, function
from pretrain.confdoc import hydra_quote


@dataclass
class JobResult:
    """What a job returns to the launcher (pickled back by submitit and joblib)."""

    number: int
    overrides: list[str]
    output: str | None
    exit_code: int
    final_loss: float | None = None  # train: the last training loss
    eval_nll: float | None = None  # eval: the NLL bound
    error: str | None = None


def multirun(command: Command, overrides: list[str], flags: list[str]) -> int:
    from hydra.core.global_hydra import GlobalHydra

    from pretrain.app import hydra_app

    if LaunchEnv.detect().world_size > 1:
        raise ConfigError(
            "a sweep is started from one process: these ranks would run every job in turn and cannot "
            "re-form their process group between jobs. Give each job its ranks instead: "
            "hydra/launcher=submitit_local (or submitit_slurm) hydra.launcher.tasks_per_node=N"
        )
    sweep_dir, overrides = split_sweep_dir(command, overrides)
    if command.config is None:  # eval: Hydra composes no config of its own, it expands the sweep
        overrides = [o if o.startswith(("+", "~", "hydra")) else f"+{o}" for o in overrides]
    hydra_overrides = [f"hydra.sweep.dir={hydra_quote(sweep_dir)}"]
    for group in ("hydra/job_logging", "hydra/hydra_logging"):  # logging as in a single run
        if not any(o.startswith(f"{group}=") for o in overrides):
            hydra_overrides.append(f"{group}=none")
    task = partial(run_job, command.name, flags)
    with hydra_app(command) as config_name:
        batches = GlobalHydra.instance().hydra.multirun(config_name, task, overrides + hydra_overrides)
    results = [job.return_value for batch in batches for job in batch]
    print(summary(command, sweep_dir, results), flush=True)
    payload = {"command": command.name, "jobs": [asdict(result) for result in results]}
    write_atomic(Path(sweep_dir) / "sweep.json", json.dumps(payload, indent=2) + "\n")
    return 0 if all(result.exit_code == 0 for result in results) else 1


def split_sweep_dir(command: Command, overrides: list[str]) -> tuple[str, list[str]]:
    """(the sweep directory, the overrides without the output key that named it)."""
    key = command.output_key
    given = [o for o in overrides if key and o.split("=", 1)[0] == key]
    if not given:
        if LaunchEnv.detect().world_size > 1:
            raise ConfigError(
                f"a sweep under torchrun needs {key or 'hydra.sweep.dir'}=DIR: every rank must agree"
            )
        return f"runs/multirun/{command.name}-{time.strftime('%Y%m%d-%H%M%S')}", overrides
    value = given[-1].split("=", 1)[1]
    if "," in value:
        raise ConfigError(f"{key}={value}: the output is set per job (<{key}>/<job number>); do not sweep it")
    return value, [o for o in overrides if o not in given]


def run_job(name: str, flags: list[str], cfg) -> JobResult:
    """The task function: run `dlm <name>` with this job's overrides, writing into the
    job's directory. Failures come back as results so that the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig

    hydra, command = HydraConfig.get(), COMMANDS[name]
    overrides = list(hydra.overrides.task)
    if command.config is None:
        overrides = [o.removeprefix("+") for o in overrides]  # added by multirun
    output = hydra.runtime.output_dir if command.output_key else None
    result = JobResult(int(hydra.job.num), overrides, output, exit_code=1)
    if output:  # Hydra's grammar parses the value, except for eval (pretrain/evaluate.py)
        overrides = [*overrides, f"{command.output_key}={hydra_quote(output) if command.config else output}"]
    print(f"sweep job #{result.number}: dlm {name} {' '.join(overrides)}", flush=True)
    reset_loky_start_method()
    export_submitit_ranks()
    try:
        result.exit_code = function(command.main)(overrides + flags)
    except Exception as error:  # reported in the summary; the next job still runs
        traceback.print_exc()
        result.error = f"{type(error).__name__}: {error}"
    result.final_loss, result.eval_nll = final_loss(output), eval_nll(output)
    return result


def reset_loky_start_method() -> None:
    """In a joblib worker, loky makes itself the global start method, and a process that
    megatron's checkpoint saving spawns (a multiprocessing Manager) then fails with
    "cannot find context for 'loky'": back to the platform's default."""
    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method(None, force=True)


def export_submitit_ranks() -> None:
    """In a submitit job of several tasks (hydra.launcher.tasks_per_node=N), the rank
    variables torch.distributed reads (RANK, WORLD_SIZE, MASTER_ADDR/PORT), as submitit's
    helper sets them; each task keeps every GPU (parallel.topology picks local_rank's)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def final_loss(output: str | None) -> float | None:
    """The last training loss in <output>/metrics.jsonl, if there is one."""
    path = Path(output or "") / "metrics.jsonl"
    if not output or not path.is_file():
        return None
    loss = None
    for line in path.read_text().splitlines():
        try:
            loss = json.loads(line).get("loss", loss)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return loss


def eval_nll(output: str | None) -> float | None:
    """The NLL bound in <output>/eval.json (`dlm eval output=...`), if there is one."""
    path = Path(output or "") / "eval.json"
    if not output or not path.is_file():
        return None
    return json.loads(path.read_text()).get("eval_nll")


def figure(result: JobResult) -> float | None:
    return result.final_loss if result.final_loss is not None else result.eval_nll


def summary(command: Command, sweep_dir: str, results: list[JobResult]) -> str:
    failed = sum(result.exit_code != 0 for result in results)
    name = "NLL bound" if command.name == "eval" else "final loss"
    lines = [f"sweep: {len(results)} jobs of dlm {command.name} in {sweep_dir}, {failed} failed"]
    lines.append(f"  {'#':>3}  {'status':<8}  {name:>10}  {'output':<28}  overrides")
    for result in results:
        status = "ok" if result.exit_code == 0 else f"exit {result.exit_code}"
        loss = "" if figure(result) is None else f"{figure(result):.4f}"
        output, overrides = result.output or "-", " ".join(result.overrides)
        lines.append(f"  {result.number:>3}  {status:<8}  {loss:>10}  {output:<28}  {overrides}")
        if result.error:
            lines.append(f"       {result.error}")
    best = [r for r in results if figure(r) is not None and r.exit_code == 0]
    if len(best) > 1:
        winner = min(best, key=figure)
        lines.append(f"lowest {name}: #{winner.number} ({' '.join(winner.overrides)})")
    return "\n".join(lines)
