"""Per-rank memory and step time of the two engines: megatron (distributed optimizer =
ZeRO-1) against DeepSpeed ZeRO-1/2/3 and ZeRO-3 with the optimizer offloaded, at DP=2.

    .venv/bin/python bench/engines.py [--hidden 512] [--layers 8] [--steps 6] [--nproc 2]

Each configuration is one torchrun launch of `--nproc` ranks training the same model
(about 27M parameters at the defaults: big enough that model states dominate the
per-rank differences on this CPU) on the standard-library bytes, fp32, for --steps
steps. Rank 0 reports, per configuration:

- weights / optimizer MB: what the rank holds, measured from the tensors (the engine's
  memory_report: its weight shards, its optimizer's fp32 master partition and Adam moments);
- peak RSS MB: the rank's resident-set high-water mark (ru_maxrss), minus its RSS before
  the model was built: what the engine adds, activations and communication buffers included;
- step s: the median step time after the first step.

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "megatron (distributed optimizer)": ["parallel.engine=megatron"],
    "deepspeed zero1": ["parallel.engine=deepspeed", "zero=zero1"],
    "deepspeed zero2": ["parallel.engine=deepspeed", "zero=zero2"],
    "deepspeed zero3": ["parallel.engine=deepspeed", "zero=zero3"],
    "deepspeed zero3_offload": ["parallel.engine=deepspeed", "zero=zero3_offload", "zero.optimizer=torch"],
}


def model_overrides(hidden: int, layers: int, steps: int) -> list[str]:
    return [
        f"model.hidden_size={hidden}",
        f"model.num_layers={layers}",
        f"model.num_attention_heads={hidden // 64}",
        f"model.num_query_groups={hidden // 64}",
        f"model.ffn_hidden_size={hidden * 8 // 3 // 64 * 64}",
        "model.max_seq_len=128",
        "data.seq_len=128",
        "data.max_bytes=2000000",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        f"train.steps={steps}",
        "train.precision=fp32",
        "checkpoint.every=0",
        "zero.stage3_param_persistence_threshold=0",
        "logging.wandb=disabled",
        "logging.progress=false",
    ]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(overrides: list[str], out: str) -> None:
    """One rank: build, train, measure; rank 0 writes the figures to `out`."""
    from parallel import shutdown_distributed
    from pretrain.config import load_config
    from pretrain.train import setup, train_step

    before = rss_mb()
    run = setup(load_config(overrides))
    times = []
    for _ in range(run.cfg.train.steps):
        start = time.perf_counter()
        train_step(run)
        times.append(time.perf_counter() - start)
    report = run.engine.memory_report()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if run.topo.rank == 0:
        figures = {
            "weights_mb": report["weights"] / 2**20,
            "optimizer_mb": report["optimizer"] / 2**20,
            "peak_rss_mb": peak - before,
            "step_s": statistics.median(times[1:]),
            "params": run.derived.params["total"],
        }
        Path(out).write_text(json.dumps(figures))
    run.data.close()
    if run.logger:
        run.logger.close()
    shutdown_distributed()


def launch(nproc: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            __file__, "--worker", str(out), *overrides, f"run.dir={run_dir}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(overrides)}\n{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    base = model_overrides(args.hidden, args.layers, args.steps)
    print(f"per rank, dp={args.nproc}, fp32, hidden {args.hidden}, {args.layers} layers:")
    print(f"{'engine':34} {'weights MB':>10} {'optim MB':>9} {'peak RSS MB':>11} {'step s':>7}")
    for name, overrides in CONFIGS.items():
        figures = launch(args.nproc, [*base, *overrides])
        print(
            f"{name:34} {figures['weights_mb']:10.1f} {figures['optimizer_mb']:9.1f} "
            f"{figures['peak_rss_mb']:11.0f} {figures['step_s']:7.2f}"
            f"   ({figures['params'] / 1e6:.1f}M params)",
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[3:], sys.argv[2])
    else:
        main()
