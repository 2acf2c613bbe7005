"""The one multi-process helper of the test suite.

- `launch(nproc, overrides)`: run the real entry point (`python -m pretrain.train`, or
  torchrun with `nproc` ranks) as a user would, and fail with the tail of its output.
- `spawn(fn, world_size, *args)`: run `fn(*args)` in `world_size` fresh processes that
  form a gloo group through the same environment variables torchrun sets, and return
  every rank's result (rank order). `fn` must be importable (module level).
- `read_metrics(run_dir)`: the rows of `<run_dir>/metrics.jsonl`.
Every process started here is waited for or killed before the call returns.

The processes see no GPU (CUDA_VISIBLE_DEVICES=""), so that on a GPU machine the suite
still checks the CPU path it was written for (gloo, fp32, layout equivalence to 1e-5);
tests marked `gpu` pass `gpu=True` to run on the GPUs.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logging.wandb=disabled", "logging.progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None, gpu: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(extra or {})})
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def launch(
    nproc: int,
    overrides: list[str],
    *,
    module: str = "pretrain.train",
    timeout: float = 600,
    check: bool = True,
    env: dict | None = None,
    gpu: bool = False,
) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *overrides]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", module, *overrides,
        ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(env, gpu), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def _worker(fn, rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        # Plain pickle (bytes), not the queue's ForkingPickler: that one shares tensor
        # storage through file descriptors which die with this process.
        queue.put((rank, True, pickle.dumps(fn())))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))


def spawn(fn, world_size: int, *args, timeout: float = 300, gpu: bool = False) -> list:
    import functools

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    target = functools.partial(fn, *args) if args else fn
    procs = [
        ctx.Process(target=_worker, args=(target, r, world_size, port, queue)) for r in range(world_size)
    ]
    with _environ({} if gpu else {"CUDA_VISIBLE_DEVICES": ""}):  # spawned children copy it
        for p in procs:
            p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)  # our own child's output
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


@contextlib.contextmanager
def _environ(updates: dict):
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
