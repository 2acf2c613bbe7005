"""Moving weights between the engines' checkpoint formats.

The megatron engine writes megatron-core dist checkpoints (reshardable: any TP/PP/DP
loads them), the DeepSpeed engine DeepSpeed checkpoints (ZeRO partitions at the layout
that wrote them). Both directions, weights only:

- dist -> DeepSpeed: `checkpoint.init_from=<dist checkpoint>` with parallel.engine=deepspeed
  (parallel/deepspeed_engine.py gathers the weights into the ZeRO partitions);
- DeepSpeed -> dist: `dist_weights(checkpoint)` makes `<checkpoint>/dist/`, a model-only
  dist checkpoint of the same weights, once: DeepSpeed's universal checkpoint
  (`<checkpoint>/universal/`, every parameter whole in the tp=1 layout) loaded into a
  tp=1 denoiser in a fresh single process, saved by megatron-core. `dlm export-hf` and
  the megatron engine's `checkpoint.init_from` read DeepSpeed checkpoints through it;
  `checkpoint.init_from=<checkpoint>/dist` works too.

The optimizer state does not move between the formats (Adam moments are laid out per
ZeRO partition in one and per parameter shard in the other): a run that changes engine
starts a new optimizer from the weights.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import torch

DIST_COPY = "dist"  # <DeepSpeed checkpoint>/dist/: its weights as a megatron dist checkpoint


def checkpoint_format(checkpoint: Path) -> str:
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    return state.get("format", "torch_dist")


def dist_weights(checkpoint: Path) -> Path:
    """The megatron dist checkpoint holding `checkpoint`'s weights: itself, or for a
    DeepSpeed checkpoint `<checkpoint>/dist/`, made by global rank 0 if missing (the
    other ranks wait: collective when a process group exists)."""
    checkpoint = Path(checkpoint)
    if checkpoint_format(checkpoint) == "torch_dist":
        return checkpoint
    copy = checkpoint / DIST_COPY
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (not distributed or torch.distributed.get_rank() == 0) and not (copy / "state.json").exists():
        _run_alone(_convert, str(checkpoint))
    if distributed:
        torch.distributed.barrier()
    return copy


def _run_alone(function, *args) -> None:
    """`function(*args)` in a fresh process of its own (a one-rank process group and
    megatron state of its own, whatever this process has set up)."""
    process = multiprocessing.get_context("spawn").Process(target=function, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"converting {args[0]} to a dist checkpoint failed (exit code {process.exitcode})")


def _convert(checkpoint: str) -> None:
    """In the fresh process: DeepSpeed checkpoint -> `<checkpoint>/dist/`."""
    import parallel
    from pretrain.config import layout_dims, load_checkpoint_config, model_dims, to_yaml

    path = Path(checkpoint)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[key]  # LaunchEnv would take the job's ranks
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(parallel.topology._free_port())
    state = json.loads((path / "state.json").read_text())
    cfg = load_checkpoint_config(path, [])
    padded = state["derived"]["padded_vocab_size"]
    dims = model_dims(cfg, padded)
    topo = parallel.init_distributed(tp=1, pp=1, dp=1, seed=cfg.seed, model_dims=layout_dims(cfg, padded))
    try:
        model = parallel.build_model(dims, topo, initialize=False)
        if state.get("tp", 1) > 1 and state.get("zero_stage") == 3:
            raise ValueError(f"{path}: converting a ZeRO-3 checkpoint saved at parallel.tp > 1 is not built")
        shapes = {name: param.shape for name, param in model.named_parameters()}
        weights = parallel.universal_weights(parallel.ensure_universal(path), shapes)
        result = model.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{path}: universal weights do not fit the model: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )
        cfg.parallel.engine = "megatron"
        keep = {k: state[k] for k in ("step", "consumed_samples", "tokens_seen", "derived") if k in state}
        parallel.save_weights_copy(
            path / DIST_COPY, model, state={**keep, "converted_from": "deepspeed"}, config_yaml=to_yaml(cfg)
        )
    finally:
        parallel.shutdown_distributed()
