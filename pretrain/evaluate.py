"""`dlm eval checkpoint=PATH [key=value ...]`: the held-out likelihood of a checkpoint.

    dlm eval checkpoint=runs/stdlib-cpu                      # its latest checkpoint
    dlm eval checkpoint=runs/r1/checkpoints/step_500 eval.draws=16 eval.batches=8
    torchrun --nproc-per-node 2 -m pretrain.evaluate checkpoint=runs/r1 parallel.tp=2

The config is the one saved with the checkpoint; overrides apply on top (`data=<preset>`
evaluates on other data). Prints the Monte Carlo upper bound on the per-token NLL with
its standard error, bits per byte where the tokenizer allows, and the training loss on
the same held-out samples; writes them to <checkpoint>/eval.json (and to
<output>/eval.json with output=DIR, as each job of a sweep does). The noise is fixed:
two evaluations of one checkpoint agree exactly, at any TP/PP/DP layout up to float
reduction order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

import parallel
from data.files import write_atomic
from parallel.topology import ConfigError
from pretrain.config import Config, load_checkpoint_config, resolve_checkpoint


def evaluate_checkpoint(path: Path, cfg: Config) -> dict:
    """Load the checkpoint's weights into this launch's layout and evaluate them."""
    from pretrain.engine_convert import dist_weights
    from pretrain.train import build_data, build_run, evaluate

    cfg.checkpoint.init_from, cfg.checkpoint.resume = str(path), False
    run, vocab = build_run(cfg)
    state = parallel.load_checkpoint(dist_weights(path), run.engine, load_optimizer=False)
    run.step = int(state.get("step", 0))
    run.data = build_data(run, vocab, None)
    try:
        result = evaluate(run)
    finally:
        run.data.close()
    return {"checkpoint": str(path), **result, "draws": cfg.eval.draws, "method": cfg.eval.method}


def summary(result: dict) -> str:
    line = (
        f"dlm eval: {result['checkpoint']} (step {result['step']}): NLL bound "
        f"{result['eval_nll']:.4f} \u00b1 {result['eval_nll_stderr']:.4f} nats/token over "
        f"{result['eval_samples']} samples x {result['draws']} draws ({result['method']})"
    )
    if "eval_bpb" in result:
        line += f", {result['eval_bpb']:.4f} bits/byte"
    return line + f"; training loss on them {result['eval_loss']:.4f}"


def load_eval_config(argv: list[str]) -> tuple[Path, Config]:
    """checkpoint=PATH and the overrides -> (the checkpoint directory, its config with the
    overrides on top, validated)."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if not given:
        raise ConfigError("checkpoint=<checkpoint, checkpoints/ or run directory> is required")
    path = resolve_checkpoint(Path(given[-1]), "checkpoint")
    overrides = [a for a in argv if not a.startswith(("checkpoint=", "output="))]
    return path, load_checkpoint_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, cfg = load_eval_config(argv)
        result = evaluate_checkpoint(path, cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"dlm eval: invalid configuration: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.shutdown_distributed()
    if parallel.LaunchEnv.detect().rank == 0:
        outputs = [path] + [Path(a.split("=", 1)[1]) for a in argv if a.startswith("output=")][-1:]
        for directory in outputs:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic(directory / "eval.json", json.dumps(result, indent=2) + "\n")
        print(summary(result), flush=True)
    return 0


if __name__ == "__main__":  # torchrun -m pretrain.evaluate: the `dlm eval` application
    from pretrain.cli import main as dlm

    sys.exit(dlm(["eval", *sys.argv[1:]]))
