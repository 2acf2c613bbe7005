"""Checkpoints in megatron-core's `dist_checkpointing` format, reshardable across
tensor/pipeline/data-parallel layouts.

Layout of a run directory::

    <run.dir>/checkpoints/step_<N>/   model + optimizer shards (torch_dist format),
                                      state.json (step, data position, ...),
                                      config.yaml (the resolved config),
                                      rng/rank_<r>.safetensors (per-rank RNG states)
    <run.dir>/checkpoints/latest      the name of the last complete checkpoint

Naming rule: the checkpoint of step N is `step_<N>`; saving step N again while a copy of
it exists (e.g. after `checkpoint.resume=false` in the same run.dir) writes a fresh
`step_<N>_<k>`, k one more than the newest copy's (`step_<N>` is copy 0), so that a
directory `latest` names is never replaced in place. `checkpoint_name_key` parses both
forms; anything ending in `.tmp` is a leftover, never a checkpoint.

A save, and what a crash at each point leaves (see `stage_checkpoint`/`publish_checkpoint`):

1. rank 0 deletes leftovers and creates `step_<N>.tmp/`; every rank writes its shards and
   RNG state into it;                  crash: `latest` and every checkpoint unchanged.
2. rank 0 fsyncs it, writes config.yaml, then state.json (atomically, last: a directory
   with state.json is complete);       crash: same, plus a `.tmp` leftover.
3. rank 0 renames it to the unused name (`step_<N>` or `step_<N>_<k>`) and fsyncs the
   directory;                          crash: a complete checkpoint `latest` does not name.
4. rank 0 replaces `latest` atomically (`latest.tmp`, fsync, rename): from here `latest`
   names the new checkpoint;           crash: `latest` names the old or the new one.
5. rank 0 deletes the superseded copies of the step (each renamed to `<name>.old.tmp`
   first, then deleted);               crash: an old copy, or a `.tmp` leftover.

In the background (`save_checkpoint(..., in_background=...)`, checkpoint.async_save), step
1's writing runs in a process forked once the step's tensors are captured, while training
goes on; steps 2-5 run in `finish_checkpoints`, which every rank calls each step, once every
rank's writer has finished. A crash before then leaves `latest` on the previous checkpoint.

So at every point `latest` names a complete checkpoint, and every directory with a
checkpoint name is complete. Leftovers (`*.tmp`, copies of a step other than the one
`latest` names or, failing that, the newest) are ignored by readers, which follow
`latest`, and deleted by the next save and by `prune_checkpoints`. Loading never
unpickles arbitrary objects: state.json is JSON, RNG states are safetensors, and
megatron's common state goes through `torch.load(weights_only=True)` (torch >= 2.6
default).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import shutil
import signal
from collections.abc import Callable
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
TORCH_DIST = "torch_dist"  # state.json "format": megatron-core's dist_checkpointing
DEEPSPEED = "deepspeed"  # state.json "format": DeepSpeed's save_checkpoint (parallel.engine=deepspeed)
TMP = ".tmp"  # suffix of leftovers: staging directories, `latest.tmp`, copies being deleted
TRASH = ".old" + TMP  # a superseded copy is renamed to <name>.old.tmp, then deleted
CHECKPOINT_NAME = re.compile(r"step_(0|[1-9]\d*)(?:_([1-9]\d*))?")


class CheckpointFormatError(ValueError):
    """A checkpoint of a format this operation cannot read; the message says what can."""


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
    """The global rank; 0 without a process group (single-process tools and tests)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def checkpoint_name_key(name: str) -> tuple[int, int] | None:
    """(step, copy) of a checkpoint directory name: `step_<N>` is (N, 0), `step_<N>_<k>`
    is (N, k); None for anything else (`latest`, `*.tmp` leftovers)."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return (int(match[1]), int(match[2] or 0)) if match else None


def _pointer(checkpoints_dir: Path) -> str | None:
    """The name `latest` holds, unchecked; None without `latest`."""
    pointer = Path(checkpoints_dir) / LATEST
    return pointer.read_text().strip() if pointer.exists() else None


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint named by `latest`, or None. A dangling pointer is an error."""
    name = _pointer(checkpoints_dir)
    if name is None:
        return None
    path = Path(checkpoints_dir) / name
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path.parent / LATEST} names {name}, which has no state.json")
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


def start_writer_helpers(ignored_signals: tuple[int, ...]) -> None:
    """Start the helper process megatron's checkpoint writer reports through (the
    multiprocessing Manager that filesystem_async._get_write_results_queue would spawn on
    first use) ourselves, so that it (1) ignores `ignored_signals`, which Slurm sends to
    every process of a job step (SIGUSR1 before the time limit, SIGTERM on preemption),
    and the trainer can still save after them; (2) dies with its rank (PR_SET_PDEATHSIG):
    a rank killed outright would otherwise leave it orphaned, holding the step's output
    open, and Slurm would wait for it before ending or requeueing the job."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # megatron's context
    manager.start(initializer=_writer_helper_init, initargs=(ignored_signals,))
    filesystem_async._results_queue = manager.Queue()  # the queue keeps the manager alive


def _writer_helper_init(ignored_signals: tuple[int, ...]) -> None:
    for number in ignored_signals:
        signal.signal(number, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: an orphaned helper ends with the job
        pass


def save_checkpoint(
    path: Path,
    engine: Engine,
    *,
    state: dict,
    config_yaml: str,
    include_optimizer: bool = True,
    fully_parallel: bool = True,
    in_background: Callable[[Path], None] | None = None,
) -> Path | None:
    """Collective: every rank calls it with `path` = .../step_<N>. Returns the checkpoint
    once it is complete and `latest` names it: `path`, or `step_<N>_<k>` when a copy of
    step N exists (see the naming rule above). The format is the engine's: megatron's
    dist checkpoint, or DeepSpeed's (state.json says which, under "format"); without the
    optimizer (a seed checkpoint) it is always the dist checkpoint.

    `fully_parallel`: the data-parallel replicas share the writing (megatron's fully
    parallel save strategy) instead of the first replica writing everything.
    `in_background` (dist format only): return None once this step's state is captured;
    the files are written by a background process while training goes on, and
    `finish_checkpoints` publishes the checkpoint once every rank's write is complete,
    then calls `in_background(checkpoint)` on every rank."""
    meta = {**state, "has_optimizer": include_optimizer, "world_size": engine.topo.world_size}
    if include_optimizer:
        meta |= engine.checkpoint_layout()
        meta["schedule"] = engine.schedule_state()  # megatron's OptimizerParamScheduler state
        if meta["format"] == DEEPSPEED:  # DeepSpeed writes model and ZeRO partitions together
            return _save(Path(path), engine.save_state, meta, config_yaml)
    else:
        meta["format"] = TORCH_DIST  # weights only: reshardable, read by either engine
    with engine.whole_weights():  # ZeRO-3: gathered while megatron saves them
        sharded = {"model": engine.sharded_state_dict()}
        if include_optimizer:
            sharded["optimizer"] = engine.optimizer.sharded_state_dict(
                sharded["model"], metadata=SHARDING_METADATA
            )
        if in_background is not None:
            return _save_in_background(Path(path), sharded, meta, config_yaml, fully_parallel, in_background)
        write = functools.partial(_save_dist, sharded, fully_parallel=fully_parallel)
        return _save(Path(path), write, meta, config_yaml)


def save_model_checkpoint(path: Path, model, *, state: dict, config_yaml: str, world_size: int) -> Path:
    """Collective: a model-only checkpoint without an engine (e.g. weights converted by
    `dlm import-hf`), in the format of `save_checkpoint(..., include_optimizer=False)`."""
    meta = {**state, "has_optimizer": False, "world_size": world_size, "format": TORCH_DIST}
    sharded = {"model": model.sharded_state_dict()}
    return _save(Path(path), functools.partial(_save_dist, sharded), meta, config_yaml)


def save_weights_copy(directory: Path, model, *, state: dict, config_yaml: str) -> Path:
    """One process: `model`'s weights as a complete model-only dist checkpoint in
    `directory` (e.g. `step_<N>/dist/`, the converted copy of a DeepSpeed checkpoint),
    written to `<directory>.tmp` and renamed once complete (state.json last)."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + TMP)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _save_dist({"model": model.sharded_state_dict()}, staging)
    _fsync_tree(staging)
    write_atomic(staging / "config.yaml", config_yaml)
    meta = {**state, "has_optimizer": False, "world_size": 1, "format": TORCH_DIST}
    write_atomic(staging / "state.json", json.dumps(meta, indent=2))
    os.replace(staging, directory)
    fsync_dir(directory.parent)
    return directory


def _save_dist(sharded: dict, staging: Path, *, fully_parallel: bool = False, in_background: bool = False):
    """megatron's dist checkpoint of `sharded` into `staging`; in the background: the
    AsyncRequest that writes the files (this step's tensors already captured)."""
    return dist_checkpointing.save(
        sharded,
        str(staging),
        sharded_strategy=_save_strategy(fully_parallel),
        async_sharded_save=in_background,
    )


def _save_strategy(fully_parallel: bool):
    """megatron's torch_dist writer; fully parallel: wrapped so that the data-parallel
    replicas of each tensor share the writing (Megatron-LM's --ckpt-fully-parallel-save)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy(TORCH_DIST)
    if not fully_parallel or parallel_state.get_data_parallel_world_size() == 1:
        return strategy
    return FullyParallelSaveStrategyWrapper(strategy, parallel_state.get_data_parallel_group())


def _save(path: Path, write, meta: dict, config_yaml: str) -> Path:
    """Every rank writes its part of the checkpoint of step N (`path`: .../step_<N>) to
    the staging directory (`write(staging)`); rank 0 publishes it. Returns the published
    checkpoint."""
    staging = _begin_save(path)
    write(staging)
    _save_rng(staging)
    return _end_save(staging, path, meta, config_yaml)


def _begin_save(path: Path) -> Path:
    """Collective: rank 0 deletes leftovers and creates the staging directory of `path`."""
    staging = _staging_dir(path)
    if _rank() == 0:
        stage_checkpoint(path)
    torch.distributed.barrier()
    return staging


def _save_rng(staging: Path) -> None:
    (staging / "rng").mkdir(exist_ok=True)
    save_file(_rng_state(), str(staging / "rng" / f"rank_{_rank()}.safetensors"))


def _end_save(staging: Path, path: Path, meta: dict, config_yaml: str) -> Path:
    """Collective, once every rank has written its part: rank 0 publishes the checkpoint."""
    torch.distributed.barrier()
    if _rank() == 0:
        publish_checkpoint(staging, path, meta=meta, config_yaml=config_yaml)
    torch.distributed.barrier()
    return latest_checkpoint(path.parent)


# -- saves in the background ------------------------------------------------------------------
_BACKGROUND = None  # megatron's AsyncCallsQueue: the checkpoint being written, if any


def _save_in_background(
    path: Path, sharded: dict, meta: dict, config_yaml: str, fully_parallel: bool, done: Callable
) -> None:
    """Step 1 of the save (module docstring) in a background process forked once this
    step's tensors are captured (copied to host memory on GPUs); steps 2-5 run when every
    rank's write is complete (`finish_checkpoints`), so a crash before that leaves only a
    `.tmp` leftover and `latest` on the previous checkpoint. One save is in flight at a
    time: a previous one is finished first (the next save deletes leftovers)."""
    global _BACKGROUND
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    finish_checkpoints(blocking=True)
    staging = _begin_save(path)
    request = _save_dist(sharded, staging, fully_parallel=fully_parallel, in_background=True)
    _save_rng(staging)
    request.add_finalize_fn(lambda: done(_end_save(staging, path, meta, config_yaml)))
    _BACKGROUND = _BACKGROUND or AsyncCallsQueue()
    _BACKGROUND.schedule_async_request(request)


def finish_checkpoints(*, blocking: bool) -> int:
    """Collective (every rank, at the same points, e.g. every step): publish a checkpoint
    written in the background if every rank's write is complete (`blocking`: wait for
    it). Returns how many saves are still in flight. A rank's failed write raises here
    on every rank."""
    if _BACKGROUND is None:
        return 0
    _BACKGROUND.maybe_finalize_async_calls(blocking=blocking)
    return _BACKGROUND.get_num_unfinalized_calls()


def _staging_dir(path: Path) -> Path:
    key = checkpoint_name_key(path.name)
    if key is None or key[1] != 0:
        raise ValueError(f"a checkpoint is saved as .../step_<N>, not {path}")
    return path.with_name(path.name + TMP)


def stage_checkpoint(path: Path) -> Path:
    """Rank 0, before any rank writes: delete leftovers of crashed saves and create the
    empty staging directory `<path>.tmp/`, which it returns."""
    _remove_leftovers(path.parent)
    staging = _staging_dir(path)
    staging.mkdir(parents=True)
    return staging


def publish_checkpoint(staging: Path, path: Path, *, meta: dict, config_yaml: str) -> Path:
    """Rank 0, once every rank has written its part of `staging`: complete it, rename it
    to an unused checkpoint name, point `latest` at it, then delete what it supersedes
    (steps 2-5 of the module docstring). Returns the published checkpoint."""
    _fsync_tree(staging)
    write_atomic(staging / "config.yaml", config_yaml)
    write_atomic(staging / "state.json", json.dumps(meta, indent=2))  # last: marks it complete
    published = _unused_name(path)
    os.replace(staging, published)
    fsync_dir(published.parent)
    write_atomic(published.parent / LATEST, published.name)
    _remove_leftovers(published.parent)
    return published


def _fsync_tree(root: Path) -> None:
    """Make every file and directory under `root` durable (megatron fsyncs its shards,
    not common.pt, metadata.json or the RNG files)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def _unused_name(path: Path) -> Path:
    """`path` (step_<N>) when no copy of step N exists, else step_<N>_<k> with k one more
    than the newest copy's."""
    step = checkpoint_name_key(path.name)[0]
    copies = _checkpoints(path.parent).get(step)
    return path if not copies else path.with_name(f"step_{step}_{max(copies)[0] + 1}")


def _checkpoints(checkpoints_dir: Path) -> dict[int, list[tuple[int, Path]]]:
    """The checkpoint directories by step: {N: [(copy, path), ...]}."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in Path(checkpoints_dir).glob("step_*"):
        key = checkpoint_name_key(path.name)
        if key is not None:
            found.setdefault(key[0], []).append((key[1], path))
    return found


def _live_checkpoints(checkpoints_dir: Path) -> dict[int, Path]:
    """One checkpoint per step, by step: the copy `latest` names, else the newest copy."""
    named = _pointer(checkpoints_dir)
    live = {}
    for step, copies in _checkpoints(checkpoints_dir).items():
        pointed = [path for _, path in copies if path.name == named]
        live[step] = pointed[0] if pointed else max(copies)[1]
    return dict(sorted(live.items()))


def _leftovers(checkpoints_dir: Path) -> list[Path]:
    """What crashed saves leave: `step_*.tmp` (staging directories and copies being
    deleted), `latest.tmp`, and the copies of a step other than its live one."""
    checkpoints_dir = Path(checkpoints_dir)
    tmp = sorted(checkpoints_dir.glob("step_*" + TMP))
    if (checkpoints_dir / (LATEST + TMP)).exists():
        tmp.append(checkpoints_dir / (LATEST + TMP))
    live = set(_live_checkpoints(checkpoints_dir).values())
    superseded = [p for copies in _checkpoints(checkpoints_dir).values() for _, p in copies if p not in live]
    return tmp + sorted(superseded)


def _remove_leftovers(checkpoints_dir: Path) -> list[Path]:
    """Rank 0, while no save is under way: delete what `_leftovers` lists. Returns it."""
    removed = _leftovers(checkpoints_dir)
    for path in removed:
        _delete(path)
    return removed


def _delete(path: Path) -> None:
    """Delete a leftover, or a checkpoint by renaming it to `<name>.old.tmp` first, so
    that no directory with a checkpoint name is ever half deleted."""
    if not path.name.endswith(TMP):
        trash = path.with_name(path.name + TRASH)
        os.replace(path, trash)
        path = trash
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def checkpoint_format(state: dict) -> str:
    """The format of a checkpoint from its state.json (checkpoints before the DeepSpeed
    engine existed are megatron dist checkpoints)."""
    return state.get("format", TORCH_DIST)


def load_checkpoint(path: Path, engine: Engine, *, load_optimizer: bool = True) -> dict:
    """Collective. Loads the model (and optimizer if asked and present) into this engine:
    a megatron dist checkpoint saved under any layout, or a DeepSpeed checkpoint (into the
    DeepSpeed engine at the layout it was saved with). Returns the checkpoint's
    state.json, plus `schedule_changes` (how the saved LR/weight-decay schedule differs
    from this run's) after an optimizer load."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    load_optimizer = load_optimizer and state.get("has_optimizer", False)
    saved, mine = checkpoint_format(state), engine.checkpoint_layout()["format"]
    if saved != mine and load_optimizer:
        raise CheckpointFormatError(
            f"{path} is a {saved} checkpoint and this run's engine writes {mine}: the optimizer "
            f"state does not move between engines here; start from its weights with "
            f"checkpoint.init_from={path} checkpoint.resume=false in a new run.dir"
        )
    if saved == DEEPSPEED:
        if mine != DEEPSPEED or not load_optimizer:
            raise CheckpointFormatError(
                f"{path} is a DeepSpeed checkpoint: it resumes the DeepSpeed engine; its weights "
                "alone are read from its dist copy (pretrain/engine_convert.py dist_weights)"
            )
        engine.load_state(path, state)
    elif mine == DEEPSPEED:
        engine.load_weights(functools.partial(_load_dist_model, path))
    else:
        _load_dist(path, engine, load_optimizer)
    if load_optimizer:
        # the schedule continues at the checkpoint's step, as this run's config defines it
        state["schedule_changes"] = engine.restore_schedule(state.get("schedule"), state["step"])
    rng = path / "rng" / f"rank_{_rank()}.safetensors"
    if load_optimizer and state.get("world_size") == engine.topo.world_size and rng.exists():
        _set_rng_state(load_file(str(rng)))
    torch.distributed.barrier()
    return state


def _load_dist(path: Path, engine: Engine, load_optimizer: bool) -> None:
    """A megatron dist checkpoint into the megatron engine."""
    sharded = {"model": engine.sharded_state_dict()}
    if load_optimizer:
        sharded["optimizer"] = engine.optimizer.sharded_state_dict(
            sharded["model"], is_loading=True, metadata=SHARDING_METADATA
        )
    loaded = dist_checkpointing.load(sharded, str(path))
    engine.load_state_dict(loaded["model"])
    if load_optimizer:
        engine.optimizer.load_state_dict(loaded["optimizer"])
    else:
        # With bf16 the optimizer keeps fp32 main params made from the weights the model
        # was built with; its next step would copy those back over the loaded ones.
        # Refresh them from the loaded weights, as Megatron-LM's load_checkpoint does.
        engine.optimizer.reload_model_params()


def _load_dist_model(path: Path, model) -> None:
    """The weights of a megatron dist checkpoint into a bare denoiser stage."""
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Rank 0, after a save: delete the leftovers of crashed saves, then all but the `keep`
    newest steps' checkpoints (0 keeps all); the checkpoint `latest` names is always
    kept. Returns what it deleted."""
    if _rank() != 0:
        return []
    removed = _remove_leftovers(checkpoints_dir)
    if keep > 0:
        named = _pointer(checkpoints_dir)
        older = list(_live_checkpoints(checkpoints_dir).values())[:-keep]
        for path in (p for p in older if p.name != named):
            _delete(path)
            removed.append(path)
    return removed


def load_model_checkpoint(path: Path, model) -> dict:
    """Collective: load only the model weights of a checkpoint saved under any layout into
    this stage (`model`: a bare denoiser stage). Returns the checkpoint's state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if checkpoint_format(state) != TORCH_DIST:
        raise CheckpointFormatError(
            f"{path} is a {checkpoint_format(state)} checkpoint; this reads megatron dist checkpoints"
        )
    _load_dist_model(path, model)
    torch.distributed.barrier()
    return state
