"""The DeepSpeed engine: ZeRO stage 1/2/3 (+ CPU/NVMe offload) around the same
megatron-core denoiser, behind the interface of `parallel.engine.Engine`.

What is shared with the megatron engine, unchanged: the model (parallel/model.py, with
Float16Module under bf16, so both engines compute the loss from fp32 logits), megatron's
OptimizerParamScheduler (LR and weight decay per parameter group, the same schedule
state in checkpoints), the parameter groups of optim.no_decay, the vocab-parallel loss
helpers, the tensor-parallel data broadcast and the metric reductions. Tensor
parallelism is megatron-core's, reached by DeepSpeed through `MegatronMPU`; pipeline
parallelism is refused before start (parallel/zero.py).

Loss normalization, equal to the megatron engine's: each microbatch's loss function
returns (loss_sum, num_tokens); megatron divides the summed gradients by the global
token count (`calculate_per_token_loss`). DeepSpeed averages gradients over the
data-parallel ranks. So each microbatch's loss_sum is backpropagated unscaled, and at
the step the ZeRO optimizer's loss scale is set to (global tokens / dp): DeepSpeed then
divides the gradients by it before computing the norm, clipping and stepping, exactly
as it unscales an fp16 loss (`override_loss_scale`, stage_1_and_2.py / stage3.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from data.files import fsync_dir
from parallel.engine import Engine, StepResult, check_no_decay
from parallel.model import Denoiser
from parallel.optim import (
    OptimConfig,
    excluded_from_decay,
    local_name,
    param_ndim,
    scheduler_arguments,
    weight_decay_start,
)
from parallel.topology import ConfigError, LaunchEnv, Topology
from parallel.zero import DeepSpeedRun, ZeroConfig, zero_stage_change

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
UNIVERSAL = "universal"  # step_<N>/universal/: DeepSpeed's universal checkpoint of step_<N>


class MegatronMPU:
    """DeepSpeed's `mpu` hook over megatron-core's parallel_state. DeepSpeed's "model
    parallel" is megatron's tensor parallelism (no pipeline here); megatron-core lacks the
    `get_model_parallel_*` names and `get_data_parallel_group_ranks` DeepSpeed calls
    (deepspeed/runtime/engine.py -> utils/groups.py)."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks():
        return torch.distributed.get_process_group_ranks(parallel_state.get_data_parallel_group())


class DeepSpeedEngine(Engine):
    """`model` is DeepSpeed's engine (`deepspeed.initialize`), `optimizer` its ZeRO optimizer."""

    def __init__(self, model, scheduler, topo: Topology, optim: OptimConfig, ds_config: dict):
        super().__init__(model, model.optimizer, scheduler, topo, optim)
        self.ds_config = ds_config  # as generated; written to the run directory
        self._tokens = None  # this rank's loss tokens of the step, for the loss scale

    @property
    def module(self) -> Denoiser:
        module = self.model.module
        return module.module if isinstance(module, Float16Module) else module

    def run_files(self) -> dict[str, str]:
        return {"deepspeed_config.json": json.dumps(self.ds_config, indent=2)}

    @property
    def zero_stage(self) -> int:
        return self.model.zero_optimization_stage()

    # -- checkpoints (parallel/checkpoint.py stages, publishes and names them) ---------------
    def checkpoint_layout(self) -> dict:
        return {"format": "deepspeed", "zero_stage": self.zero_stage, "tp": self.topo.tp, "dp": self.topo.dp}

    def save_state(self, staging: Path) -> None:
        """Collective: DeepSpeed's checkpoint (module, ZeRO partitions of the optimizer)
        into the staging directory; no `latest` of DeepSpeed's own (ours is the pointer)."""
        self.model.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)

    def load_state(self, path: Path, state: dict) -> None:
        """Collective: a DeepSpeed checkpoint's weights and optimizer (resume). Saved at
        this layout and ZeRO stage: directly; at another data-parallel size or stage:
        through DeepSpeed's universal checkpoint, made once next to it
        (`step_<N>/universal/`). The tensor-parallel size must match. (Weights alone are
        read from the checkpoint's dist copy: DeepSpeed's ZeRO-3 weights-only load looks
        for a `latest` file of its own, engine.py _load_checkpoint.)"""
        saved = {key: state.get(key) for key in ("tp", "dp", "zero_stage")}
        mine = {key: value for key, value in self.checkpoint_layout().items() if key in saved}
        if saved["tp"] != mine["tp"]:
            raise ValueError(
                f"{path} was saved by DeepSpeed at parallel.tp={saved['tp']} and this run has "
                f"parallel.tp={mine['tp']}: a DeepSpeed checkpoint keeps its tensor-parallel size"
            )
        problem = zero_stage_change(saved["zero_stage"], mine["zero_stage"])
        if problem:
            raise ValueError(f"{path}: {problem}")
        tag, universal = path.name, saved != mine
        if universal:
            tag = UNIVERSAL
            if self.topo.rank == 0:
                ensure_universal(path)
            torch.distributed.barrier()
        self.model._config.load_universal_checkpoint = universal  # read by load_checkpoint
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            with weights_only_loads():
                loaded, _ = self.model.load_checkpoint(
                    str(path if universal else path.parent),
                    tag=tag,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,  # the schedule is megatron's (restore_schedule)
                    load_module_strict=True,
                )
        finally:
            self.model._config.load_universal_checkpoint = False
        # A universal load gives every group the hyperparameters of group 0
        # (stage3.py load_hp_checkpoint_state_from_checkpoint_dir_stage3): the no-decay
        # group would get wd_mult 1. The groups' own settings are this run's config.
        for group, settings in zip(self.optimizer.param_groups, groups, strict=True):
            group.update(settings)
        # ... and every group's Adam state the same `step` tensor, which torch's AdamW
        # increments in place once per group per update: one copy each.
        for param_state in self.optimizer.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")

    def whole_weights(self):
        import deepspeed

        params = list(self.module.parameters())
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3)

    def load_weights(self, fill: Callable[[torch.nn.Module], None]) -> None:
        """Collective: `fill(denoiser)` loads weights into the whole (under ZeRO-3:
        gathered) denoiser; the optimizer's fp32 master copies are refreshed from them."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=self.zero_stage == 3):
            fill(self.module)
        self.optimizer.refresh_fp32_params()

    def forward_backward(
        self,
        forward_step: Callable,
        microbatches: Iterable,
        *,
        num_microbatches: int,
        seq_len: int,
        micro_batch_size: int,
        forward_only: bool = False,
    ) -> list[dict]:
        """Forward (and backward) of each microbatch in turn; DeepSpeed reduces the
        gradients at the last one (its gradient-accumulation boundary). Returns every
        microbatch's report. `seq_len`/`micro_batch_size` serve the pipeline schedule of
        the megatron engine only."""
        if not forward_only:
            self._tokens = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        reports = []
        for index, batch in enumerate(microbatches):
            with torch.no_grad() if forward_only else contextlib.nullcontext():
                output, loss_fn = forward_step(batch, self.model)
                loss_sum, num_tokens, report = loss_fn(output)
            reports.append(report)
            if forward_only:
                continue
            self._tokens += num_tokens
            self.model.backward(loss_sum, scale_wrt_gas=False)
            if index < num_microbatches - 1:
                self.model.step()  # accumulates; the last microbatch's step is optimizer_step's
        if not forward_only and len(reports) != num_microbatches:
            raise ValueError(f"forward_backward got {len(reports)} microbatches, expected {num_microbatches}")
        return reports

    def optimizer_step(self, step: int) -> StepResult:
        """Update number `step`: the schedule first (as the megatron engine), then
        DeepSpeed's step, unscaling the gradients by (global tokens / dp)."""
        self.scheduler.step(increment=step - self.scheduler.num_steps)
        tokens = self._tokens.clone()
        torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        self.optimizer.override_loss_scale(max(float(tokens), 1.0) / self.topo.dp)
        try:
            self.model.step()
        finally:
            self.optimizer.override_loss_scale(1.0)
        decaying = next((g for g in self.optimizer.param_groups if g["wd_mult"] > 0), None)
        group = decaying or self.optimizer.param_groups[0]
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = self.model.was_step_applied()
        return StepResult(bool(applied), norm, float(group["lr"]), float(group["weight_decay"]))


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` inside: tensors and plain containers only. DeepSpeed reads its
    checkpoint files with full unpickling (`weights_only=False`:
    runtime/checkpoint_engine/torch_checkpoint_engine.py:37, checkpoint/ds_to_universal.py,
    checkpoint/universal_checkpoint.py), which runs whatever code a file names. torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides those call sites; the classes DeepSpeed
    pickles into its files (loss scaler, ZeRO stage enum, fragment addresses: data, no
    code; measured on ZeRO-1/2/3 and offload checkpoints) are allowed, a file needing
    anything else fails, naming the class."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


def ensure_universal(checkpoint: Path) -> Path:
    """`<checkpoint>/universal/`, DeepSpeed's universal checkpoint of a DeepSpeed
    checkpoint, made now if it does not exist (one process: call it on one rank).
    A large checkpoint converts faster beforehand, with DeepSpeed's parallel workers:
    python -m deepspeed.checkpoint.ds_to_universal --input_folder C --output_folder C/universal.tmp
    then rename universal.tmp to universal."""
    out = checkpoint / UNIVERSAL
    if not out.is_dir():
        to_universal(checkpoint, out)
    return out


def universal_weights(universal: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weights from a universal checkpoint, whole (the tensor-
    parallel slices merged as `universal_checkpoint_info` says: the layout of tp=1), by
    the denoiser's parameter names, in `shapes` (ZeRO-3's are stored flat)."""
    weights = {}
    with weights_only_loads():
        for path in sorted((universal / "zero").glob("*/fp32.pt")):
            loaded = torch.load(path, map_location="cpu")
            name = local_name(path.parent.name)
            tensor = loaded["param"] if isinstance(loaded, dict) else loaded  # ZeRO-1/2 | ZeRO-3
            if name in shapes and tensor.numel() != shapes[name].numel():
                raise ValueError(f"{path}: {tuple(tensor.shape)} does not fit {name} {tuple(shapes[name])}")
            weights[name] = tensor.reshape(shapes[name]) if name in shapes else tensor
    if not weights:
        raise FileNotFoundError(f"{universal}: no zero/<parameter>/fp32.pt (not a universal checkpoint)")
    return weights


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of `checkpoint` (one process): every parameter's
    fp32 weights and Adam moments whole, loadable at any data-parallel size and ZeRO
    stage. Written to `<out>.tmp` and renamed: `out` exists only complete."""
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    arguments = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(staging),
        # in this process: a rank with a live process group is not forked
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,  # saved by the engine (universal_checkpoint_info)
    )
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):  # its per-file chatter
        ds_to_universal.main(arguments)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer (to the .tmp)
    fsync_dir(staging)
    os.replace(staging, out)
    fsync_dir(out.parent)


def universal_checkpoint_info(module: torch.nn.Module) -> dict:
    """How ds_to_universal merges each parameter's tensor-parallel slices, from the
    megatron-core layers' own attributes: norms and other unsplit parameters are
    replicated, row-parallel weights (linear_proj, linear_fc2) are cut along dim 1,
    SwiGLU's linear_fc1 holds two sub-parameters, the rest (column-parallel: QKV by
    query group, the vocabulary) is cut along dim 0, ds_to_universal's default. So the
    merged tensors are the tp=1 layout megatron's own checkpoints store. The vocabulary's
    padding is kept (it does not depend on parallel.tp)."""
    from deepspeed.checkpoint import constants

    replicated, rows, gated = [], [], []
    glu = module.config.gated_linear_unit
    for name, param in module.named_parameters():
        pattern = re.escape(name) + "$"
        if not getattr(param, "tensor_model_parallel", False):
            replicated.append(pattern)
        elif getattr(param, "partition_dim", 0) == 1:
            rows.append(pattern)
        elif glu and name.endswith("linear_fc1.weight"):
            gated.append(pattern)  # each slice is [gate_r; up_r]: merged as [gate; up]
    return {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        constants.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rows,
        constants.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: gated,
    }


def _without_empty_extra_state(module_state_dict: Callable) -> Callable:
    """DeepSpeed's module state without megatron's empty `*._extra_state` entries (None:
    kept for Transformer Engine compatibility, tensor_parallel/layers.py:1075), on which
    ds_to_universal fails (`None.float()`, checkpoint/ds_to_universal.py:1226). Loading
    does not miss them: megatron's layers add the entry back (layers.py:941)."""

    def state_dict(*args, **kwargs):
        state = module_state_dict(*args, **kwargs)
        for key in [k for k, v in state.items() if k.endswith("._extra_state") and v is None]:
            del state[key]
        return state

    return state_dict


def _param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups as megatron-core's get_megatron_optimizer makes them for the
    scheduler: wd_mult 0 for optim.no_decay's parameters, 1 for the others."""
    if optim.no_decay:
        check_no_decay(model, optim.no_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = excluded_from_decay(optim.no_decay, name, param_ndim(param))
            (no_decay if exempt else decay).append(param)
    groups = [
        {"params": params, "wd_mult": mult, "lr_mult": 1.0, "max_lr": optim.lr, "min_lr": optim.min_lr}
        for params, mult in ((decay, 1.0), (no_decay, 0.0))
        if params
    ]
    return groups


def _adamw(groups: list[dict], optim: OptimConfig, zero: ZeroConfig, log: Callable[[str], None]):
    """torch's AdamW, or DeepSpeedCPUAdam under optimizer offload (zero.optimizer)."""
    arguments = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    arguments["weight_decay"] = weight_decay_start(optim)
    wanted = zero.optimizer == "cpu_adam" or (zero.optimizer == "auto" and zero.offload_optimizer != "none")
    if wanted:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **arguments)
        except Exception as error:  # the op is built (compiled) on first use
            if zero.optimizer == "cpu_adam":
                message = f"zero.optimizer=cpu_adam: DeepSpeedCPUAdam does not build: {error}"
                raise RuntimeError(message) from error
            log(f"zero.optimizer=auto: DeepSpeedCPUAdam does not build ({error}); using torch's AdamW")
    return torch.optim.AdamW(groups, foreach=False, **arguments)


def zero_init(run: DeepSpeedRun):
    """DeepSpeed's ZeRO-3 construction context for this run's config (its partitioning
    over the data-parallel group of `MegatronMPU`, offload_param's device, the dtype)."""
    deepspeed = _start_deepspeed()
    # dtype from the config (bf16 or fp32): an explicit dtype is ignored on a CPU accelerator
    # (partition_parameters.py:409 picks bf16: `dtype or fp16 if ... else bf16 ...`).
    # mem_efficient_linear=False: no process-wide replacement of torch.nn.functional.linear.
    return deepspeed.zero.Init(
        config_dict_or_path=run.config(), mpu=MegatronMPU(), mem_efficient_linear=False
    )


def _start_deepspeed():
    """deepspeed, with its communication layer over our process group (before zero.Init
    reads its config: else its batch check sees a world of 1, runtime/config.py)."""
    from parallel import cpu

    cpu.apply_deepspeed()
    import deepspeed

    # DeepSpeed asserts LOCAL_RANK is set (engine.py _do_args_sanity_check): torchrun sets
    # it, srun and a single process do not.
    os.environ.setdefault("LOCAL_RANK", str(LaunchEnv.detect().local_rank))
    deepspeed.init_distributed(
        dist_backend=torch.distributed.get_backend(), dist_init_required=False, verbose=False
    )
    return deepspeed


def build_deepspeed_engine(
    model: Denoiser, topo: Topology, optim: OptimConfig, run: DeepSpeedRun, *, train_steps: int
) -> DeepSpeedEngine:
    """Wrap one denoiser (the whole model: no pipeline) in DeepSpeed's engine with ZeRO
    `run.zero.stage`, our AdamW parameter groups and megatron's LR/weight-decay scheduler."""
    deepspeed = _start_deepspeed()
    zero, ds_config = run.zero, run.config()
    module = Float16Module(model.config, model) if model.config.bf16 else model

    def log(line: str) -> None:
        if topo.rank == 0:
            print(f"dlm train: {line}", flush=True)

    optimizer = _adamw(_param_groups(module, optim), optim, zero, log)
    # saved in every checkpoint (deepspeed/runtime/engine.py reads this attribute)
    module.universal_checkpoint_info = universal_checkpoint_info(module)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config, mpu=MegatronMPU(), dist_init_required=False
    )
    if not hasattr(engine.optimizer, "override_loss_scale"):
        # DeepSpeed's BF16_Optimizer (bf16, zero.stage=1, no offload, fp32 gradient
        # accumulation asked for in zero.extra's data_types) has no loss scale.
        raise ConfigError(
            f"zero.extra={zero.extra} selects DeepSpeed's {type(engine.optimizer).__name__}, which has "
            "no loss scale to normalize the loss by the global token count: use zero.stage=2, or "
            "leave data_types.grad_accum_dtype unset"
        )
    engine.optimizer.override_loss_scale(1.0)  # forward_backward's losses are unscaled sums
    engine.module_state_dict = _without_empty_extra_state(engine.module_state_dict)
    if zero.stage == 3 and model.share_embeddings_and_output_weights and model.post_process:
        # ZeRO-3 gathers a weight only inside its own module's forward; the output layer
        # uses the embedding's (tied) weight.
        tied = model.shared_embedding_or_output_weight()
        deepspeed.zero.register_external_parameter(model.output_layer, tied)
    scheduler = OptimizerParamScheduler(
        engine.optimizer,
        **scheduler_arguments(optim, train_steps),
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return DeepSpeedEngine(engine, scheduler, topo, optim, ds_config)
