"""The megatron-core training engine around one denoiser stage.

megatron DDP (gradient buffers, data-parallel reduction) + DistributedOptimizer
(ZeRO-1: AdamW states sharded over data-parallel ranks) with parameter groups from
optim.no_decay + OptimizerParamScheduler (LR and weight decay per group) + the pipeline
schedules of `get_forward_backward_func`. pretrain/ drives it through these calls:
`forward_backward`, `optimizer_step`, `broadcast_batch` (one data read per
tensor-parallel group), `global_sum`, the vocab-parallel loss helpers
`cross_entropy` / `correct`, and `forward_logits` (full logits on every rank, for the
sampler on the live model).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, ParamKey, ParamWithNamePredicate, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from parallel.model import Denoiser
from parallel.optim import (
    OptimConfig,
    excluded_from_decay,
    local_name,
    param_ndim,
    scheduler_arguments,
    weight_decay_start,
)
from parallel.topology import (
    ConfigError,
    ParallelConfig,
    Topology,
    context_parallel_positions,
    resolve_parallel,
)
from parallel.zero import DeepSpeedRun


class StepResult(NamedTuple):
    applied: bool  # False when the update was skipped (non-finite gradients)
    grad_norm: float
    lr: float  # of the groups that decay (the schedule's value)
    weight_decay: float  # of the groups that decay (0 for the no_decay groups)


class Engine:
    def __init__(self, model, optimizer, scheduler, topo: Topology, optim: OptimConfig):
        """`model`: the wrapped denoiser stage, or (parallel.vpp) the list of its model chunks."""
        self.chunks = list(model) if isinstance(model, list) else [model]
        self.model = self.chunks[0]
        self.optimizer = optimizer
        self.scheduler = scheduler  # megatron's OptimizerParamScheduler: LR and weight decay per group
        self.topo = topo
        self.optim = optim
        self._forward_backward = get_forward_backward_func()

    @property
    def module(self) -> Denoiser:
        """The bare denoiser stage (its first model chunk under parallel.vpp)."""
        return self.modules[0]

    @property
    def modules(self) -> list[Denoiser]:
        """The bare model chunks (under DDP and, with bf16, Float16Module)."""
        unwrapped = [chunk.module for chunk in self.chunks]
        return [m.module if isinstance(m, Float16Module) else m for m in unwrapped]

    def sharded_state_dict(self) -> dict:
        """The weights as megatron's dist checkpoint describes them. Their keys are global
        (layer numbers over the whole model), so a checkpoint loads under any layout."""
        if len(self.chunks) == 1:
            return self.module.sharded_state_dict()
        return {f"chunk{i}": module.sharded_state_dict() for i, module in enumerate(self.modules)}

    def load_state_dict(self, state: dict) -> None:
        """Weights loaded from a dist checkpoint (the structure of `sharded_state_dict`)."""
        if len(self.chunks) == 1:
            self.module.load_state_dict(state)
            return
        for i, module in enumerate(self.modules):
            module.load_state_dict(state[f"chunk{i}"])

    def named_parameters(self):
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    @property
    def config(self):
        return self.module.config

    # -- one training step ---------------------------------------------------------------
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
        """Run the pipeline schedule over `num_microbatches` microbatches.

        `forward_step(batch, model) -> (output, loss_fn)` follows megatron's contract;
        `loss_fn(output) -> (loss_sum, num_tokens, report)`. Returns the reports of
        this rank's microbatches (empty except on the last pipeline stage)."""
        # one iterator per model chunk: each chunk's stage reads the same microbatches
        iterators = itertools.tee(iter(microbatches), len(self.chunks))

        def megatron_forward_step(data_iterator, model):
            return forward_step(next(data_iterator), model)

        if not forward_only:
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
        # forward only (evaluation, sampling): current weights, no overlapped gathers
        with self.whole_weights() if forward_only else contextlib.nullcontext():
            return self._forward_backward(
                forward_step_func=megatron_forward_step,
                data_iterator=iterators[0] if len(iterators) == 1 else list(iterators),
                model=self.chunks,
                num_microbatches=num_microbatches,
                seq_length=seq_len,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )

    def optimizer_step(self, step: int) -> StepResult:
        """Update number `step` (1-based): the scheduler sets every group's LR and weight
        decay for this step (num_steps = step, whatever updates were skipped), then clip
        and step."""
        self.scheduler.step(increment=step - self.scheduler.num_steps)
        ok, grad_norm, _ = self.optimizer.step()
        decaying = next((g for g in self.optimizer.param_groups if g["wd_mult"] > 0), None)
        group = decaying or self.optimizer.param_groups[0]
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        return StepResult(bool(ok), norm, float(group["lr"]), float(group["weight_decay"]))

    # -- the schedule in checkpoints -----------------------------------------------------
    def schedule_state(self) -> dict:
        """The scheduler's state for state.json (JSON: numbers and strings)."""
        return {**self.scheduler.state_dict(), **_schedule_extras(self.scheduler)}

    def restore_schedule(self, saved: dict | None, step: int) -> list[str]:
        """After an optimizer load: the schedule follows this run's config at step `step`.
        Loading the optimizer brings back the saved groups' max_lr/min_lr; they are set
        from optim.lr/min_lr again, so a changed config is honoured. Returns how the saved
        schedule differs from this one (e.g. a longer train.steps), for the log."""
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = self.optim.lr, self.optim.min_lr
        self.scheduler.step(increment=step - self.scheduler.num_steps)
        mine = self.schedule_state()
        return [
            f"{key} {saved[key]} -> {value}"
            for key, value in mine.items()
            if saved is not None and key != "num_steps" and key in saved and saved[key] != value
        ]

    def describe_param_groups(self) -> str:
        """Parameters per weight-decay group, over the whole model (all stages and shards)."""
        counts = torch.zeros(4, dtype=torch.float64, device=self.topo.device)  # decay/no: tensors, params
        for name, param in self.named_parameters():
            if getattr(param, "shared", False) or not _counted_here(param, self.topo):
                continue
            column = 2 if excluded_from_decay(self.optim.no_decay, name, param_ndim(param)) else 0
            counts[column] += 1
            counts[column + 1] += getattr(param, "ds_numel", param.numel())  # ZeRO-3: full size
        torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
        tensors, params, no_tensors, no_params = (int(x) for x in counts.tolist())
        return (
            f"weight decay {self.optim.weight_decay:g}: {tensors} tensors, {params:,} params; "
            f"no decay {self.optim.no_decay}: {no_tensors} tensors, {no_params:,} params"
        )

    def train(self, mode: bool = True) -> None:
        for chunk in self.chunks:
            chunk.train(mode)

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds of the weights (its shards) and of the optimizer (fp32
        master weights and Adam moments of its partition), measured from the tensors."""
        return {
            "weights": sum(_local_tensor(p).numel() * p.element_size() for _, p in self.named_parameters()),
            "optimizer": optimizer_bytes(self.optimizer.optimizer),
        }

    @contextlib.contextmanager
    def whole_weights(self):
        """A context in which `module`'s parameters are whole and current on every rank.
        With parallel.overlap_param_gather the updated weights arrive bucket by bucket
        during the next forward: they are all-gathered now (forward pre-hooks off while
        inside, as Megatron-LM does around evaluation and checkpoint saves)."""
        hooked = [chunk for chunk in self.chunks if chunk.use_forward_hook]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in hooked:
                chunk.enable_forward_pre_hook()

    def checkpoint_layout(self) -> dict:
        """What state.json records of the format and layout this engine's checkpoints have."""
        return {"format": "torch_dist"}  # megatron's dist checkpoint: loads under any layout

    def run_files(self) -> dict[str, str]:
        """Files the engine's own configuration adds to the run directory: {name: text}."""
        return {}

    # -- losses under tensor parallelism -------------------------------------------------
    @staticmethod
    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-row CE of vocab-parallel logits [..., V/tp] against global ids [...].
        Note: megatron's implementation overwrites `logits` in place."""
        return tensor_parallel.vocab_parallel_cross_entropy(logits, targets)

    @staticmethod
    @torch.no_grad()
    def correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Whether the argmax over the full (tensor-parallel) vocabulary is the target."""
        group = parallel_state.get_tensor_model_parallel_group()
        shard = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        local = targets - start
        in_shard = (local >= 0) & (local < shard)
        target_logit = logits.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_shard, target_logit, torch.zeros_like(target_logit))
        best = logits.max(dim=-1).values
        torch.distributed.all_reduce(target_logit, group=group)
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=group)
        return target_logit >= best

    # -- data ------------------------------------------------------------------------------
    def broadcast_batch(self, batch: dict | None, keys: tuple[str, ...], shape: tuple[int, int]) -> dict:
        """The microbatch `keys` ([b, s] integer tensors) on this rank's device, as read by
        the first rank of its tensor-parallel group (`batch`; None elsewhere), as
        Megatron-LM's get_batch_on_this_tp_rank: one read per group, one broadcast."""
        device = self.topo.device
        if self.topo.tp == 1 or not keys:
            return {key: batch[key].to(device) for key in keys}
        if batch is not None:
            packed = torch.stack([batch[key].to(device, torch.int64) for key in keys])
        else:
            packed = torch.empty((len(keys), *shape), dtype=torch.int64, device=device)
        torch.distributed.broadcast(
            packed,
            src=parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
        return dict(zip(keys, packed.unbind(0), strict=True))

    # -- sampling on the live model ----------------------------------------------------------
    @torch.no_grad()
    def forward_logits(self, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits [b, s, vocab_size] of `tokens` [b, s] (the same on every rank of the
        model-parallel group), identical on every rank: one forward-only pass through the
        pipeline schedule, the tensor-parallel vocabulary shards gathered on the last
        stage, the result broadcast from it to the other stages."""
        batch, length = tokens.shape

        def step(data, model):
            output = model(self.context_part(data) if self.topo.is_first_stage else None)
            return output, lambda out: (
                out.sum() * 0,
                torch.ones((), dtype=torch.int64, device=out.device),
                {
                    "logits": self._context_gather(
                        tensor_parallel.gather_from_tensor_model_parallel_region(out), length
                    )
                },
            )

        # the interleaved schedule runs at least a group of microbatches: copies of `tokens`
        copies = self.config.microbatch_group_size_per_vp_stage if self.topo.vpp > 1 else 1
        reports = self.forward_backward(
            step,
            [tokens] * copies,
            num_microbatches=copies,
            seq_len=length,
            micro_batch_size=batch,
            forward_only=True,
        )
        padded = self.module.vocab_size
        logits = reports[0]["logits"].transpose(0, 1).float().contiguous() if reports else None
        if logits is None:
            logits = torch.empty((batch, length, padded), dtype=torch.float32, device=self.topo.device)
        if self.topo.pp > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            torch.distributed.broadcast(
                logits, src=last, group=parallel_state.get_pipeline_model_parallel_group()
            )
        return logits[..., :vocab_size]

    def broadcast_tokens(self, tokens: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """An integer tensor of `shape` from global rank 0 (`tokens`; None elsewhere) on
        every rank's device, e.g. the prompts that every rank samples from."""
        if self.topo.rank == 0:
            out = tokens.to(self.topo.device, torch.int64)
        else:
            out = torch.empty(shape, dtype=torch.int64, device=self.topo.device)
        torch.distributed.broadcast(out, src=0)
        return out

    # -- context parallelism ---------------------------------------------------------------
    def context_part(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This context-parallel rank's zig-zag part of every sequence of `tensor` (positions
        along `dim`): what megatron-core's RoPE and Transformer Engine's CP attention expect.
        The whole tensor without context parallelism."""
        if self.topo.cp == 1:
            return tensor
        positions = context_parallel_positions(
            tensor.shape[dim], self.topo.cp, self.topo.cp_rank, tensor.device
        )
        return tensor.index_select(dim, positions)

    def context_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the context-parallel ranks (each holds its part of every
        sequence): per-sample statistics that are not additive across samples."""
        if self.topo.cp == 1:
            return values
        values = values.clone()
        torch.distributed.all_reduce(values, group=parallel_state.get_context_parallel_group())
        return values

    def _context_gather(self, part: torch.Tensor, length: int) -> torch.Tensor:
        """The whole [s, ...] tensor from every context-parallel rank's part (positions along
        dim 0), identical on every rank."""
        if self.topo.cp == 1:
            return part
        group = parallel_state.get_context_parallel_group()
        parts = [torch.empty_like(part) for _ in range(self.topo.cp)]
        torch.distributed.all_gather(parts, part.contiguous(), group=group)
        whole = part.new_empty((length, *part.shape[1:]))
        for rank, piece in enumerate(parts):
            whole[context_parallel_positions(length, self.topo.cp, rank, part.device)] = piece
        return whole

    # -- metrics ---------------------------------------------------------------------------
    def global_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-replica statistics produced on the last pipeline stage over
        data-parallel (and context-parallel) ranks, and hand the result to every stage
        (zeros elsewhere)."""
        values = values.clone()
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(values, group=group)
        if self.topo.pp > 1:
            torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        return values

    def barrier(self) -> None:
        torch.distributed.barrier()


def _local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """What this rank stores of a parameter: its ZeRO-3 partition, else the tensor."""
    return getattr(param, "ds_tensor", param)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of a torch optimizer's parameters (the fp32 master copies it updates) and states."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in params + states)


def _counted_here(param: torch.nn.Parameter, topo: Topology) -> bool:
    """Count a parameter once over tensor-parallel ranks: its shard if it is split, else
    only on tensor-parallel rank 0 (replicated: norms, the QKV bias' replicas...)."""
    return getattr(param, "tensor_model_parallel", False) or topo.tp_rank == 0


def _schedule_extras(scheduler) -> dict:
    """The scheduler fields megatron's state_dict leaves out."""
    return {
        "init_lr": scheduler.init_lr,
        "wsd_decay_steps": scheduler.wsd_decay_steps,
        "lr_wsd_decay_style": scheduler.lr_wsd_decay_style,
    }


def check_no_decay(model: torch.nn.Module | list[torch.nn.Module], patterns: list[str]) -> None:
    """Collective: a pattern of optim.no_decay that matches no parameter on any rank is an
    error naming the key."""
    modules = model if isinstance(model, list) else [model]
    names = [(local_name(n), param_ndim(p)) for m in modules for n, p in m.named_parameters()]
    unmatched = torch.tensor(
        [not any(excluded_from_decay([pattern], n, dim) for n, dim in names) for pattern in patterns],
        dtype=torch.int32,
        device=next(modules[0].parameters()).device,
    )
    torch.distributed.all_reduce(unmatched, op=torch.distributed.ReduceOp.MIN)
    if unmatched.any():
        missing = [p for p, flag in zip(patterns, unmatched.tolist(), strict=True) if flag]
        example = ", ".join(n for n, _ in names[:4])
        raise ConfigError(f"optim.no_decay: {missing} match no parameter (names look like: {example}, ...)")


def no_decay_overrides(model: torch.nn.Module | list[torch.nn.Module], patterns: list[str]) -> dict:
    """megatron-core parameter-group overrides: wd_mult 0 for the parameters optim.no_decay
    names (replaces megatron's standard rule, which the default patterns reproduce)."""
    if not patterns:
        return {}
    check_no_decay(model, patterns)
    key = ParamKey(
        with_name_predicate=ParamWithNamePredicate(
            name=f"no_decay:{tuple(patterns)}",
            fn=lambda param, name: excluded_from_decay(patterns, name, param_ndim(param)),
        )
    )
    return {key: {"wd_mult": 0.0}}


def model_context(deepspeed: DeepSpeedRun | None):
    """Where the denoiser is built. Under DeepSpeed ZeRO-3: inside `deepspeed.zero.Init`,
    so that every rank keeps only its partition of each weight from construction on (the
    whole model never exists on one device; with zero.offload_param, not on any GPU).
    Otherwise nothing special."""
    if deepspeed is not None and deepspeed.zero.stage == 3:
        from parallel.deepspeed_engine import zero_init

        return zero_init(deepspeed)
    return contextlib.nullcontext()


def build_engine(
    model: Denoiser | list[Denoiser],
    topo: Topology,
    optim: OptimConfig,
    *,
    train_steps: int,
    parallel: ParallelConfig | None = None,
    deepspeed: DeepSpeedRun | None = None,
) -> Engine:
    """The training engine around one denoiser stage: DeepSpeed's with `deepspeed`
    (parallel.engine=deepspeed: parallel/deepspeed_engine.py), else megatron's, with the
    communication settings of `parallel` (resolved; None: the defaults)."""
    if deepspeed is not None:
        from parallel.deepspeed_engine import build_deepspeed_engine

        (stage,) = model if isinstance(model, list) else [model]  # no pipeline: one model chunk
        return build_deepspeed_engine(stage, topo, optim, deepspeed, train_steps=train_steps)
    parallel = parallel or resolve_parallel(ParallelConfig(tp=topo.tp, pp=topo.pp))
    return build_megatron_engine(model, topo, optim, parallel, train_steps=train_steps)


def ddp_config(parallel: ParallelConfig) -> DistributedDataParallelConfig:
    """megatron DDP: fp32 gradient buffers, reduced bucket by bucket during backward and
    (distributed optimizer) the updated weights all-gathered during the next forward, as
    parallel.overlap_* set."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        align_param_gather=parallel.align_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=parallel.bucket_size,
    )


def sync_functions(config, chunks: list[DistributedDataParallel], parallel: ParallelConfig) -> None:
    """The hooks megatron's pipeline schedules call (on the first chunk's config, which the
    schedules read), set as Megatron-LM's training loop sets them: no_sync around all but
    the last microbatch; with overlapped reduction, grad_sync launches each stage's
    remaining reductions when its last backward ends; with aligned parameter gathers,
    param_sync launches them together. One function, or one per model chunk."""

    def per_chunk(name: str):
        functions = [getattr(chunk, name) for chunk in chunks]
        return functions[0] if len(functions) == 1 else functions

    config.no_sync_func = per_chunk("no_sync")
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_sync_func = per_chunk("start_grad_sync") if parallel.overlap_grad_reduce else None
    aligned = parallel.overlap_param_gather and parallel.align_param_gather
    config.param_sync_func = per_chunk("start_param_sync") if aligned else None


def build_megatron_engine(
    model: Denoiser | list[Denoiser],
    topo: Topology,
    optim: OptimConfig,
    parallel: ParallelConfig,
    *,
    train_steps: int,
) -> Engine:
    """Wrap the denoiser stage (or its model chunks) for training: (Float16Module,) DDP,
    megatron's optimizer (DistributedOptimizer: ZeRO-1 with parallel.distributed_optimizer)
    with optim.no_decay's parameter groups, and megatron's OptimizerParamScheduler for LR
    and weight decay."""
    modules = model if isinstance(model, list) else [model]
    config = modules[0].config
    chunks = [
        DistributedDataParallel(
            config=module.config,
            ddp_config=ddp_config(parallel),
            module=Float16Module(module.config, module) if config.bf16 else module,
            # later chunks' reductions overlap the other chunks' compute anyway (Megatron-LM)
            disable_bucketing=index > 0,
        )
        for index, module in enumerate(modules)
    ]
    sync_functions(config, chunks, parallel)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",  # torch AdamW without Apex/TE, fused Adam(W) with them
            lr=optim.lr,  # every group's max_lr; the scheduler sets group["lr"] each step
            min_lr=optim.min_lr,
            weight_decay=weight_decay_start(optim),
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            adam_eps=optim.eps,
            clip_grad=optim.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=parallel.distributed_optimizer,
        ),
        chunks,
        config_overrides=no_decay_overrides(chunks, optim.no_decay),
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        **scheduler_arguments(optim, train_steps),
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # resume follows the config (restore_schedule)
    )
    return Engine(chunks if len(chunks) > 1 else chunks[0], optimizer, scheduler, topo, optim)
