"""The megatron-core training engine around one denoiser stage.

megatron DDP (gradient buffers, data-parallel reduction) + DistributedOptimizer
(ZeRO-1: AdamW states sharded over data-parallel ranks) + the pipeline schedules of
`get_forward_backward_func`. pretrain/ drives it through four calls:
`forward_backward`, `optimizer_step`, `broadcast_batch` (one data read per
tensor-parallel group), `global_sum` and the vocab-parallel loss helpers
`cross_entropy` / `correct`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from parallel.model import Denoiser
from parallel.topology import Topology


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW settings (mirrors pretrain's OptimConfig; the LR is set every step)."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    distributed: bool = True  # ZeRO-1 sharding of optimizer states over data-parallel ranks


class Engine:
    def __init__(self, model: DistributedDataParallel, optimizer, topo: Topology):
        self.model = model
        self.optimizer = optimizer
        self.topo = topo
        self._forward_backward = get_forward_backward_func()

    @property
    def module(self) -> Denoiser:
        """The bare denoiser stage (under DDP and, with bf16, Float16Module)."""
        module = self.model.module
        return module.module if isinstance(module, Float16Module) else module

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
        iterator = iter(microbatches)

        def megatron_forward_step(data_iterator, model):
            return forward_step(next(data_iterator), model)

        if not forward_only:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        return self._forward_backward(
            forward_step_func=megatron_forward_step,
            data_iterator=iterator,
            model=[self.model],
            num_microbatches=num_microbatches,
            seq_length=seq_len,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    def optimizer_step(self, lr: float) -> tuple[bool, float]:
        """Set the learning rate, clip, step. Returns (update applied, grad norm)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ok, grad_norm, _ = self.optimizer.step()
        return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

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

    # -- metrics ---------------------------------------------------------------------------
    def global_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-replica statistics produced on the last pipeline stage over
        data-parallel ranks, and hand the result to every stage (zeros elsewhere)."""
        values = values.clone()
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        if self.topo.pp > 1:
            torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        return values

    def barrier(self) -> None:
        torch.distributed.barrier()


def build_engine(model: Denoiser, topo: Topology, settings: OptimizerSettings) -> Engine:
    """Wrap one denoiser stage for training: (Float16Module,) DDP, DistributedOptimizer."""
    config = model.config
    module = Float16Module(config, model) if config.bf16 else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=settings.distributed,
        check_for_nan_in_grad=True,
        bucket_size=None,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",  # torch AdamW without Apex/TE, fused Adam(W) with them
            lr=0.0,  # set every step by optimizer_step
            weight_decay=settings.weight_decay,
            adam_beta1=settings.beta1,
            adam_beta2=settings.beta2,
            adam_eps=settings.eps,
            clip_grad=settings.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=settings.distributed,
        ),
        [ddp],
    )
    return Engine(ddp, optimizer, topo)
