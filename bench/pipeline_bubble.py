"""Pipeline bubble and step time of PP=2 against PP=2 x VPP=2 (megatron's interleaved
schedule), with one process (the whole model, no pipeline) as the baseline.

    .venv/bin/python bench/pipeline_bubble.py [--hidden 512] [--layers 8] [--steps 6] [--microbatches 4]

Each configuration is one launch training the same model (about 27M parameters at the
defaults) on the standard-library bytes, fp32, for --steps steps, with --microbatches
microbatches per step (global batch = 2 x microbatches, micro batch 2, dp 1). The figure
of merit is the measured bubble: the share of a pipelined step that is not the model's
own compute, 1 - T1 / (pp x Tpp), where T1 is the one-process step time (the same work
on one core) and Tpp the pipelined one (pp cores). Next to it the schedule's theoretical
bubble, (pp - 1) / (vpp x M + pp - 1). On this CPU the measured one also holds the gloo
message time and the per-microbatch overheads of each schedule.

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import launch, model_overrides  # noqa: E402  (bench/engines.py: one training launch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--microbatches", type=int, default=4)
    args = parser.parse_args()
    batch = [f"train.global_batch_size={2 * args.microbatches}", "train.micro_batch_size=2"]
    base = [*model_overrides(args.hidden, args.layers, args.steps), *batch]
    one = launch(1, base)["step_s"]
    print(f"fp32, hidden {args.hidden}, {args.layers} layers, {args.microbatches} microbatches per step:")
    print(f"{'layout':22} {'step s':>7} {'measured bubble':>16} {'theoretical':>12}")
    print(f"{'one process':22} {one:7.2f}")
    for name, pp, vpp in (("pp=2", 2, 1), ("pp=2 x vpp=2", 2, 2)):
        step = launch(pp, [*base, f"parallel.pp={pp}", f"parallel.vpp={vpp}"])["step_s"]
        theoretical = (pp - 1) / (vpp * args.microbatches + pp - 1)
        print(f"{name:22} {step:7.2f} {1 - one / (pp * step):16.1%} {theoretical:12.1%}", flush=True)


if __name__ == "__main__":
    main()
