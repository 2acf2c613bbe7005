"""Checkpoints in megatron-core's `dist_checkpointing` format, reshardable across
tensor/pipeline/data-parallel layouts.

Layout of a run directory::

    <run.dir>/checkpoints/step_<N>/   model + optimizer shards (torch_dist format),
                                      state.json (step, data position, ...),
                                      config.yaml (the resolved config),
                                      rng/rank_<r>.safetensors (per-rank RNG states)
    <run.dir>/checkpoints/latest      the name of the last complete checkpoint

A checkpoint is written to `step_<N>.tmp/` and renamed once every rank has
finished; `latest` is replaced atomically after that. A crash at any point leaves
the previous checkpoint and `latest` intact. Loading never unpickles arbitrary
objects: state.json is JSON, RNG states are safetensors, and megatron's common
state goes through `torch.load(weights_only=True)` (torch >= 2.6 default).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.optimizer import distrib_optimizer as dopt
from safetensors.torch import load_file, save_file

from data.files import fsync_dir, write_atomic
from parallel.engine import Engine

# Optimizer states stored per model parameter (not per DP bucket): loads at any TP/PP/DP.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
LATEST = "latest"


def _fix_torch_adam_checkpointing() -> None:
    """Three bugs of megatron-core 0.16.1's DistributedOptimizer checkpointing when it
    wraps torch's AdamW, i.e. on any install without Apex or Transformer Engine (every
    CPU machine). Not needed, and not applied, when Apex/TE provide the fused Adam."""
    cls = dopt.DistributedOptimizer
    original_state_dict = cls.state_dict
    original_load = cls.load_state_dict
    original_set = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_state_dict)
    def state_dict(self):
        # distrib_optimizer.py:642 asserts a single 'step' over the torch optimizer's
        # per-parameter states, which fails before the first step (no state yet); this
        # is also hit when *loading*, via sharded_state_dict(is_loading=True). Give the
        # optimizer zero-valued states first.
        if len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
            for s in self.optimizer.state.values():
                s["step"].zero_()
        return original_state_dict(self)

    @functools.wraps(original_set)
    def set_states(self, model_param, tensors):
        # distrib_optimizer.py:936-940 copies every key of the torch state, 'step'
        # included, from the loaded tensors, which (fully_reshardable format) hold only
        # param/exp_avg/exp_avg_sq: KeyError 'step'. 'step' is restored from the common
        # state in load_state_dict; copy what was loaded.
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        # distrib_optimizer.py:822 gives every parameter the SAME 'step' tensor; torch
        # AdamW increments it in place once per parameter per update (seen: step 3 -> 31
        # after one update, differing per DP rank). Give each parameter its own copy.
        for s in self.optimizer.state.values():
            if torch.is_tensor(s.get("step")):
                s["step"] = s["step"].clone()

    cls.state_dict = state_dict
    cls._set_main_param_and_optimizer_states = set_states
    cls.load_state_dict = load_state_dict


if not dopt.HAVE_APEX_OR_TE:
    _fix_torch_adam_checkpointing()


def _rank() -> int:
    return torch.distributed.get_rank()


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint named by `latest`, or None. A dangling pointer is an error."""
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no state.json")
    return path


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        states[f"tracker.{name}"] = state
    if torch.cuda.is_available():
        states["device"] = torch.cuda.get_rng_state()
    return {k: v.contiguous() for k, v in states.items()}


def _set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    tracker = {k.split(".", 1)[1]: v for k, v in states.items() if k.startswith("tracker.")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    if "device" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["device"])


def save_checkpoint(
    path: Path,
    engine: Engine,
    *,
    state: dict,
    config_yaml: str,
    include_optimizer: bool = True,
) -> Path:
    """Collective: every rank calls it. Returns `path` once it is complete and `latest`
    points at it."""
    sharded = {"model": engine.module.sharded_state_dict()}
    if include_optimizer:
        sharded["optimizer"] = engine.optimizer.sharded_state_dict(
            sharded["model"], metadata=SHARDING_METADATA
        )
    meta = {**state, "has_optimizer": include_optimizer, "world_size": engine.topo.world_size}
    return _save(Path(path), sharded, meta, config_yaml)


def save_model_checkpoint(path: Path, model, *, state: dict, config_yaml: str, world_size: int) -> Path:
    """Collective: a model-only checkpoint without an engine (e.g. weights converted by
    `dlm import-hf`), in the format of `save_checkpoint(..., include_optimizer=False)`."""
    meta = {**state, "has_optimizer": False, "world_size": world_size}
    return _save(Path(path), {"model": model.sharded_state_dict()}, meta, config_yaml)


def _save(path: Path, sharded: dict, meta: dict, config_yaml: str) -> Path:
    """Write `sharded` to `<path>.tmp/`, rename it to `path` when every rank is done, then
    point `latest` at it (atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    save_file(_rng_state(), str(tmp / "rng" / f"rank_{_rank()}.safetensors"))
    torch.distributed.barrier()

    if _rank() == 0:
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        if path.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        write_atomic(path.parent / LATEST, path.name)
    torch.distributed.barrier()
    return path


def load_checkpoint(path: Path, engine: Engine, *, load_optimizer: bool = True) -> dict:
    """Collective. Loads the model (and optimizer if asked and present) saved under any
    layout into this one. Returns the checkpoint's state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    load_optimizer = load_optimizer and state.get("has_optimizer", False)

    sharded = {"model": engine.module.sharded_state_dict()}
    if load_optimizer:
        sharded["optimizer"] = engine.optimizer.sharded_state_dict(
            sharded["model"], is_loading=True, metadata=SHARDING_METADATA
        )
    loaded = dist_checkpointing.load(sharded, str(path))
    engine.module.load_state_dict(loaded["model"])
    if load_optimizer:
        engine.optimizer.load_state_dict(loaded["optimizer"])
    else:
        # With bf16 the optimizer keeps fp32 main params made from the weights the model
        # was built with; its next step would copy those back over the loaded ones.
        # Refresh them from the loaded weights, as Megatron-LM's load_checkpoint does.
        engine.optimizer.reload_model_params()
    rng = path / "rng" / f"rank_{_rank()}.safetensors"
    if load_optimizer and state.get("world_size") == engine.topo.world_size and rng.exists():
        _set_rng_state(load_file(str(rng)))
    torch.distributed.barrier()
    return state


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Rank 0: delete all but the `keep` newest complete checkpoints (0 keeps all)."""
    if keep <= 0 or _rank() != 0:
        return []
    latest = latest_checkpoint(checkpoints_dir)
    steps = sorted(
        (p for p in Path(checkpoints_dir).glob("step_*") if not p.name.endswith(".tmp")),
        key=lambda p: int(p.name.split("_")[1]),
    )
    removed = [p for p in steps[:-keep] if p != latest]
    for p in removed:
        shutil.rmtree(p)
    return removed


def load_model_checkpoint(path: Path, model) -> dict:
    """Collective: load only the model weights of a checkpoint saved under any layout into
    this stage (`model`: a bare denoiser stage). Returns the checkpoint's state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])
    torch.distributed.barrier()
    return state
