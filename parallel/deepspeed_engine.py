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
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from parallel.engine import Engine, StepResult, check_no_decay
from parallel.model import Denoiser
from parallel.optim import OptimConfig, excluded_from_decay, scheduler_arguments, weight_decay_start
from parallel.topology import Topology
from parallel.zero import ZeroConfig, deepspeed_config


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

    def load_state(self, path: Path, state: dict, *, load_optimizer: bool) -> None:
        """Collective: a DeepSpeed checkpoint of this engine's layout (ZeRO partitions are
        per data-parallel rank): weights, and the optimizer when `load_optimizer`."""
        saved = {key: state.get(key) for key in ("tp", "dp", "zero_stage")}
        mine = {key: value for key, value in self.checkpoint_layout().items() if key in saved}
        if saved != mine:
            raise ValueError(
                f"{path} was saved by DeepSpeed at {saved} and this run is {mine}: a DeepSpeed "
                "checkpoint loads at the layout and ZeRO stage it was saved with"
            )
        loaded, _ = self.model.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=False,  # the schedule is megatron's (restore_schedule)
            load_module_strict=True,
        )
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")

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


def _load_weights_only() -> None:
    """DeepSpeed reads its checkpoint files with full unpickling (`torch.load(...,
    weights_only=False)`, deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py:37),
    which runs whatever code a file names. Read them as tensors and plain containers
    only, allowing the classes DeepSpeed pickles into them (loss scaler, ZeRO stage enum,
    fragment addresses: data, no code; measured on ZeRO-1/2/3 and offload checkpoints);
    a file needing anything else fails, naming the class."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load


def _param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups as megatron-core's get_megatron_optimizer makes them for the
    scheduler: wd_mult 0 for optim.no_decay's parameters, 1 for the others."""
    if optim.no_decay:
        check_no_decay(model, optim.no_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = excluded_from_decay(optim.no_decay, name, param.dim())
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


def build_deepspeed_engine(
    model: Denoiser,
    topo: Topology,
    optim: OptimConfig,
    zero: ZeroConfig,
    *,
    train_steps: int,
    micro_batch_size: int,
    num_microbatches: int,
) -> DeepSpeedEngine:
    """Wrap one denoiser (the whole model: no pipeline) in DeepSpeed's engine with ZeRO
    `zero.stage`, our AdamW parameter groups and megatron's LR/weight-decay scheduler."""
    from parallel import cpu

    cpu.apply_deepspeed()
    import deepspeed

    _load_weights_only()

    config = model.config
    module = Float16Module(config, model) if config.bf16 else model
    ds_config = deepspeed_config(
        zero,
        micro_batch_size=micro_batch_size,
        num_microbatches=num_microbatches,
        dp=topo.dp,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
    )

    def log(line: str) -> None:
        if topo.rank == 0:
            print(f"dlm train: {line}", flush=True)

    optimizer = _adamw(_param_groups(module, optim), optim, zero, log)
    # DeepSpeed asserts LOCAL_RANK is set (engine.py _do_args_sanity_check): torchrun sets
    # it, srun and a single process do not.
    os.environ.setdefault("LOCAL_RANK", str(topo.local_rank))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config, mpu=MegatronMPU(), dist_init_required=False
    )
    engine.optimizer.override_loss_scale(1.0)  # forward_backward's losses are unscaled sums
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
