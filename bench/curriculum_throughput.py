"""Step time of the curriculum's attention settings against plain full attention, and the
time of the likelihood eval, on the CPU.

    .venv/bin/python bench/curriculum_throughput.py [--steps 8] [--warmup 2] [--threads N]

One process, one model (hidden 256, 4 layers, seq 256, batch 8), one engine; each
configuration is a different step plan (pretrain.curriculum.StepCurriculum) over the same
weights and data, so only the attention construction differs:

  plain      full bidirectional attention, no mask tensor (the reference)
  document   the document mask ([b, 1, L, L], from EOS-delimited documents)
  annealed   DiffuLLaMA's annealed causal mask at ratio 0.5 ([b, 1, L, L], drawn per sample)
  block16    block diffusion, blocks of 16: [x_t, x0] = 2L tokens under the BD3 mask
  hybrid16   block16 plus the causal clean copy's next-token loss (ar 1.0, dlm 0.3)

Configurations are interleaved round by round (ABCDE, EDCBA, ...) after a warm-up; the
script prints the median step time and the median over rounds of each one's time
relative to plain in the same round (cancelling the shared machine's drift). Then the
likelihood bound (eval.draws=4, 4 global batches) is timed and given per 1M held-out
tokens. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from parallel.topology import shutdown_distributed
from pretrain.config import load_config
from pretrain.curriculum import eval_curriculum

OVERRIDES = [
    "model.name=bench",
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=688",
    "model.max_seq_len=256",
    "model.logit_shift=true",  # the hybrid loss needs it; the others do not mind
    "data.seq_len=256",
    "data.max_bytes=3000000",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.steps=1000000",
    "train.eval_batches=4",
    "eval.draws=4",
    # mask tensors on every layer spec (only Transformer Engine needs to know in advance)
    "curriculum.bidirectional_ratio.values=[0.5]",
    "logging.wandb=disabled",
    "logging.progress=false",
]
CONFIGS = {
    "plain": dict(bidirectional_ratio=1.0),
    "document": dict(bidirectional_ratio=1.0),
    "annealed": dict(bidirectional_ratio=0.5),
    "block16": dict(bidirectional_ratio=1.0, block_size=16),
    "hybrid16": dict(bidirectional_ratio=1.0, block_size=16, ar_weight=1.0, dlm_weight=0.3),
}


def step(run, plan, keys: tuple[str, ...]) -> float:
    """One optimizer step of `run` under `plan`; seconds."""
    from pretrain.train import run_schedule

    run.stage_keys = keys
    start = time.perf_counter()
    run.engine.train(True)
    run_schedule(run, run.consumed_samples, run.data.train, run.cfg.seed, plan, False)
    run.engine.optimizer_step(run.step + 1)
    run.step, run.consumed_samples = run.step + 1, run.consumed_samples + run.cfg.train.global_batch_size
    return time.perf_counter() - start


def plans(run) -> dict:
    base = eval_curriculum(run.cfg.curriculum, run.cfg.data.seq_len)
    return {name: dataclasses.replace(base, **fields) for name, fields in CONFIGS.items()}


def time_configs(run, args) -> dict[str, list[float]]:
    names, by_plan = list(CONFIGS), plans(run)
    keys = {name: ("tokens", "segments") if name == "document" else ("tokens",) for name in names}
    times = {name: [] for name in names}
    for round_ in range(args.warmup + args.steps):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            elapsed = step(run, by_plan[name], keys[name])
            if round_ >= args.warmup:
                times[name].append(elapsed)
    return times


def report(times: dict[str, list[float]]) -> None:
    plain = times["plain"]
    for name, series in times.items():
        ratio = statistics.median(t / p for t, p in zip(series, plain, strict=True))
        print(f"  {name:9s} median step {statistics.median(series) * 1e3:8.1f} ms   x{ratio:.2f} of plain")


def time_eval(run) -> None:
    from pretrain.train import likelihood

    run.stage_keys = ("tokens",)
    likelihood(run)  # warm-up
    start = time.perf_counter()
    result = likelihood(run)
    elapsed = time.perf_counter() - start
    cfg = run.cfg
    held_out = (cfg.eval.batches or cfg.train.eval_batches) * cfg.train.global_batch_size * cfg.data.seq_len
    print(
        f"likelihood eval: {held_out:,} held-out tokens x {cfg.eval.draws} draws in {elapsed:.2f} s = "
        f"{elapsed / held_out * 1e6:.1f} s per 1M held-out tokens "
        f"({elapsed / (held_out * cfg.eval.draws) * 1e6:.1f} s per 1M token-forwards); "
        f"bound {result['eval_nll']:.3f} +- {result['eval_nll_stderr']:.3f} nats/token"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pretrain.train import setup

    cfg = load_config([*OVERRIDES, f"run.dir={tempfile.mkdtemp(prefix='dlm-bench-')}"])
    run = setup(cfg)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; seq {cfg.data.seq_len}, batch 8")
    try:
        report(time_configs(run, args))
        time_eval(run)
    finally:
        run.data.close()
        run.logger.close()
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
