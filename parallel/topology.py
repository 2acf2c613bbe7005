"""The process layout: one validated dataclass, and the function that brings it up.

Validation is pure (no torch.distributed, no megatron import) so that a bad
configuration fails in a second, before any process group exists, with a message
naming the config keys involved.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the offending key(s)."""


def cause_line(error: BaseException) -> str:
    """An indented line with the error's cause when it says more than the error itself."""
    cause = error.__cause__
    return f"\n  {cause}" if cause is not None and str(cause) != str(error) else ""


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Vocabulary rounded up to a multiple of `divisible_by`.

    The padding does not depend on the tensor-parallel size (unlike Megatron-LM's
    `divisible_by * tp`), so a checkpoint keeps one embedding shape under any layout
    and reshards freely; `Topology.validate` checks that tp divides the result.
    """
    return -(-vocab_size // divisible_by) * divisible_by


@dataclass(frozen=True)
class Topology:
    """tp x pp x dp processes, ordered as megatron-core's default 'tp-cp-ep-dp-pp'."""

    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def build(
        cls,
        world_size: int,
        *,
        tp: int = 1,
        pp: int = 1,
        dp: int | None = None,
        rank: int = 0,
        local_rank: int = 0,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int,
        ffn_hidden_size: int,
        padded_vocab: int,
    ) -> Topology:
        for key, value in (("parallel.tp", tp), ("parallel.pp", pp)):
            if value < 1:
                raise ConfigError(f"{key}={value} must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(
                f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the "
                f"world size {world_size} (number of launched processes)"
            )
        derived_dp = world_size // (tp * pp)
        if dp is not None and dp != derived_dp:
            raise ConfigError(
                f"parallel.tp={tp} x parallel.pp={pp} x parallel.dp={dp} = {tp * pp * dp} "
                f"!= world size {world_size}; leave parallel.dp unset to derive it"
            )
        checks = (
            ("model.num_attention_heads", num_attention_heads, "parallel.tp", tp),
            ("model.num_query_groups", num_query_groups, "parallel.tp", tp),
            ("model.ffn_hidden_size", ffn_hidden_size, "parallel.tp", tp),
            ("padded vocabulary (model.make_vocab_size_divisible_by)", padded_vocab, "parallel.tp", tp),
            ("model.num_layers", num_layers, "parallel.pp", pp),
        )
        for what, value, by_key, by in checks:
            if value % by:
                raise ConfigError(f"{by_key}={by} does not divide {what}={value}")
        return cls(world_size, tp, pp, derived_dp, rank, local_rank)

    @property
    def device(self) -> torch.device:
        return current_device()

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def backend(self) -> str:
        """The torch.distributed backend: NCCL on GPUs, gloo on CPU."""
        return "nccl" if torch.cuda.is_available() else "gloo"

    def describe(self) -> str:
        return f"world={self.world_size} tp={self.tp} pp={self.pp} dp={self.dp} ({self.backend})"


@dataclass(frozen=True)
class LaunchEnv:
    """Rank information from torchrun or Slurm (or a single process)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def detect(cls) -> LaunchEnv:
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.run
            return cls(
                int(env["RANK"]),
                int(env["WORLD_SIZE"]),
                int(env.get("LOCAL_RANK", 0)),
                env.get("MASTER_ADDR", "127.0.0.1"),
                int(env.get("MASTER_PORT", 29500)),
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun
            job = int(env.get("SLURM_JOB_ID", 0))
            return cls(
                int(env["SLURM_PROCID"]),
                int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", 0)),
                env.get("MASTER_ADDR") or _slurm_first_host(env.get("SLURM_JOB_NODELIST", "")),
                int(env.get("MASTER_PORT", 20000 + job % 20000)),
            )
        return cls(0, 1, 0, "127.0.0.1", _free_port())


def _slurm_first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    if not nodelist:
        return "127.0.0.1"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split("]")[0]
    return head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def current_device() -> torch.device:
    """The GPU this rank is bound to (select_device), else the CPU."""
    if torch.cuda.is_available():
        return torch.device(torch.cuda.current_device())
    return torch.device("cpu")


def select_device(local_rank: int) -> None:
    """Bind this process to GPU `local_rank % visible devices`, as Megatron-LM does: under
    Slurm with --gpus-per-task=1 every process sees one device (index 0) whatever its
    local rank; under torchrun it sees them all. No-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def init_distributed(
    *, tp: int, pp: int, dp: int | None, seed: int, model_dims: dict, timeout_minutes: int = 30
) -> Topology:
    """Start torch.distributed (NCCL with CUDA, gloo without) and megatron-core's
    parallel_state, seeding its tensor-parallel RNG streams. `model_dims` holds the
    keyword arguments of `Topology.build` that describe the model."""
    from datetime import timedelta

    launch = LaunchEnv.detect()
    topo = Topology.build(
        launch.world_size,
        tp=tp,
        pp=pp,
        dp=dp,
        rank=launch.rank,
        local_rank=launch.local_rank,
        **model_dims,
    )
    from parallel import cpu

    cpu.apply()
    select_device(launch.local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        torch.distributed.init_process_group(
            topo.backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    # As Megatron-LM's _set_random_seed: every pipeline stage gets its own seed (else the
    # stages would initialise their layers from the same streams), and the default
    # generators are seeded too -- megatron-core seeds only its CUDA tracker, while CPU
    # initialisation (use_cpu_initialization) draws from torch's default generator.
    stage_seed = seed + 100 * topo.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    assert parallel_state.get_data_parallel_rank() == topo.dp_rank
    assert parallel_state.get_pipeline_model_parallel_rank() == topo.pp_rank
    assert parallel_state.get_tensor_model_parallel_rank() == topo.tp_rank
    return topo


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (an all-reduce over all ranks; the flag
    itself without a process group)."""
    if not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=current_device())  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def shutdown_distributed() -> None:
    if not torch.distributed.is_initialized():
        return
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
