"""The process layout: one validated dataclass, and the function that brings it up.

Validation is pure (no torch.distributed, no megatron import) so that a bad
configuration fails in a second, before any process group exists, with a message
naming the config keys involved.
"""

from __future__ import annotations

import math
import os
import random
import socket
from dataclasses import dataclass, replace

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


def stage_layer_counts(
    num_layers: int,
    pp: int,
    vpp: int = 1,
    *,
    first: int | None = None,
    last: int | None = None,
    embedding_as_layer: bool = False,
    loss_as_layer: bool = False,
) -> list[list[int]]:
    """Transformer layers of each model chunk: [pipeline rank][virtual stage], as
    megatron-core splits them (transformer_block.get_num_layers_to_build and the checks of
    TransformerConfig.__post_init__), checked here without megatron, naming our keys.
    `first`/`last`: layers of the first/last pipeline stage (uneven split; the others share
    the rest evenly); `embedding_as_layer`/`loss_as_layer`: the input embedding / the
    output layer and loss count as one layer of the first / last stage's share."""
    if vpp > 1 and pp == 1:
        raise ConfigError(f"parallel.vpp={vpp} interleaves pipeline stages: it needs parallel.pp > 1")
    if (first is not None or last is not None) and (embedding_as_layer or loss_as_layer):
        raise ConfigError(
            "parallel.first_stage_layers / last_stage_layers and parallel.embedding_as_layer / "
            "loss_as_layer are two ways to balance the pipeline: use one"
        )
    per_rank = _layers_per_pipeline_rank(num_layers, pp, first, last, embedding_as_layer + loss_as_layer)
    for rank, layers in enumerate(per_rank):
        if layers % vpp:
            raise ConfigError(
                f"pipeline stage {rank} has {layers} layers (model.num_layers={num_layers}, parallel.pp={pp}"
                f"{_uneven_note(first, last, embedding_as_layer, loss_as_layer)}): parallel.vpp={vpp} "
                "must divide it"
            )
    counts = [[layers // vpp] * vpp for layers in per_rank]
    counts[0][0] -= embedding_as_layer
    counts[-1][-1] -= loss_as_layer
    if min(min(chunk) for chunk in counts) < 0:
        raise ConfigError(
            "parallel.embedding_as_layer/loss_as_layer: a model chunk would have no layer to give"
        )
    return counts


def _layers_per_pipeline_rank(num_layers: int, pp: int, first: int | None, last: int | None, extra: int):
    """Layers (counting the embedding/loss when they count as layers) per pipeline rank."""
    ends = {0: first, pp - 1: last} if pp > 1 else {}
    for key, value in (("parallel.first_stage_layers", first), ("parallel.last_stage_layers", last)):
        if value is not None and (value < 1 or pp == 1):
            raise ConfigError(f"{key}={value} needs parallel.pp > 1 and a value >= 1")
    fixed = {rank: layers for rank, layers in ends.items() if layers is not None}
    middle_ranks = pp - len(fixed)
    middle_layers = num_layers + extra - sum(fixed.values())
    if (
        middle_layers < 0
        or bool(middle_layers) != bool(middle_ranks)
        or (middle_ranks and middle_layers % middle_ranks)
    ):
        raise ConfigError(
            f"model.num_layers={num_layers}{' (+ embedding/loss)' if extra else ''} cannot be split evenly "
            f"over parallel.pp={pp} stages{_uneven_note(first, last, False, False)}"
        )
    share = middle_layers // middle_ranks if middle_ranks else 0
    return [fixed.get(rank, share) for rank in range(pp)]


def _uneven_note(first, last, embedding_as_layer, loss_as_layer) -> str:
    parts = [f"first_stage_layers={first}"] * (first is not None) + [f"last_stage_layers={last}"] * (
        last is not None
    )
    parts += ["embedding_as_layer"] * embedding_as_layer + ["loss_as_layer"] * loss_as_layer
    return f", parallel.{', '.join(parts)}" if parts else ""


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size: ranks each layer is split over
    pp: int = 1  # pipeline-parallel size: stages the layers are split into
    dp: int | None = None  # data-parallel size; None: derived, world_size / (tp * cp * pp)
    # context-parallel size: ranks each sequence is split over (zig-zag, bidirectional
    # attention over the whole sequence through Transformer Engine's CP attention on GPUs)
    cp: int = 1
    distributed_optimizer: bool = True  # megatron engine: ZeRO-1, Adam states sharded over dp ranks
    # the training engine: megatron (TP/PP/DP, distributed optimizer) | deepspeed (ZeRO
    # stage 1/2/3 and CPU/NVMe offload from the zero: section, TP; no PP)
    engine: str = "megatron"
    # megatron engine: norms and the residual stream sharded along the sequence over the
    # tensor-parallel ranks (activation memory / tp); None: on when tp > 1
    sequence_parallel: bool | None = None
    # megatron engine: reduce each gradient bucket while backward goes on (Megatron-LM's
    # recommended --overlap-grad-reduce)
    overlap_grad_reduce: bool = True
    # megatron engine, distributed optimizer: all-gather the updated weights bucket by bucket
    # during the next forward (--overlap-param-gather)
    overlap_param_gather: bool = True
    # all pipeline stages launch their parameter all-gathers together (--align-param-gather)
    align_param_gather: bool = False
    # parameters per gradient-reduction bucket; None: megatron's max(40M, 1M x dp)
    bucket_size: int | None = None
    # Transformer Engine userbuffers: the tensor-parallel all-gathers and reduce-scatters
    # overlapped with the GEMMs (Megatron-LM's --tp-comm-overlap). GPUs with TE, sequence
    # parallelism and one sequence shape: no random lengths, block diffusion or eval samples
    tp_comm_overlap: bool = False
    # a userbuffers YAML (Megatron-LM's --tp-comm-overlap-cfg); None: TE's defaults
    tp_comm_overlap_config: str | None = None
    # model chunks per pipeline stage, run by megatron's interleaved schedule (pipeline
    # bubble / vpp); the layers of each stage must split evenly into them
    vpp: int = 1
    # interleaved schedule: microbatches run in a row on one model chunk (megatron's
    # --microbatch-group-size-per-vp-stage); None: parallel.pp
    microbatch_group_size: int | None = None
    # uneven pipeline: transformer layers of the first stage (the other stages share the rest
    # evenly), e.g. fewer where the embedding runs (megatron's num_layers_in_first_pipeline_stage)
    first_stage_layers: int | None = None
    # uneven pipeline: transformer layers of the last stage, e.g. fewer where the output layer
    # and the loss run (megatron's num_layers_in_last_pipeline_stage)
    last_stage_layers: int | None = None
    # the input embedding counts as one layer of the first stage's share
    # (megatron's account_for_embedding_in_pipeline_split)
    embedding_as_layer: bool = False
    # the output layer and loss count as one layer of the last stage's share
    # (megatron's account_for_loss_in_pipeline_split)
    loss_as_layer: bool = False


@dataclass(frozen=True)
class PipelineLayout:
    """How the layers are split over pipeline stages and model chunks (see
    `stage_layer_counts`), and how the interleaved schedule groups microbatches."""

    vpp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    embedding_as_layer: bool = False
    loss_as_layer: bool = False
    microbatch_group_size: int | None = None

    @classmethod
    def of(cls, parallel: ParallelConfig) -> PipelineLayout:
        return cls(
            parallel.vpp,
            parallel.first_stage_layers,
            parallel.last_stage_layers,
            parallel.embedding_as_layer,
            parallel.loss_as_layer,
            parallel.microbatch_group_size,
        )

    def layer_counts(self, num_layers: int, pp: int) -> list[list[int]]:
        return stage_layer_counts(
            num_layers,
            pp,
            self.vpp,
            first=self.first_stage_layers,
            last=self.last_stage_layers,
            embedding_as_layer=self.embedding_as_layer,
            loss_as_layer=self.loss_as_layer,
        )


def sequence_multiple(tp: int, cp: int, sequence_parallel: bool) -> int:
    """What every sequence length must be a multiple of: 2 x cp zig-zag chunks, each rank's
    part split over tp under sequence parallelism."""
    chunks = 2 * cp if cp > 1 else 1
    shard = cp * tp if sequence_parallel else 1
    return math.lcm(chunks, shard)


def check_interleaving(pp: int, vpp: int, group_size: int | None, num_microbatches: int) -> None:
    """megatron's interleaved schedule runs groups of N microbatches (N = group_size, by
    default pp) on each model chunk: pp <= N <= M, and the last group is full or at least
    pp long (pipeline_parallel/schedules.py forward_backward_pipelining_with_interleaving)."""
    if vpp == 1:
        return
    group = group_size or pp
    where = f"parallel.vpp={vpp} at parallel.pp={pp} runs groups of {group} microbatches"
    if not pp <= group <= num_microbatches:
        raise ConfigError(
            f"{where} (parallel.microbatch_group_size, default parallel.pp): it needs pp <= group <= "
            f"microbatches per step ({num_microbatches} = train.global_batch_size / "
            "(train.micro_batch_size x dp)); raise the global batch or lower train.micro_batch_size"
        )
    if 0 < num_microbatches % group < pp:
        raise ConfigError(
            f"{where}: the last of the {num_microbatches} microbatches per step form a group of "
            f"{num_microbatches % group} < pp; make the microbatches per step a multiple of {group}"
        )


def resolve_parallel(parallel: ParallelConfig) -> ParallelConfig:
    """The parallel section with every None decided and every setting the layout makes
    moot switched off, as the run uses it (logged with the derived values)."""
    megatron = parallel.engine == "megatron"
    if parallel.sequence_parallel and not megatron:
        raise ConfigError(
            "parallel.sequence_parallel=true is a megatron-engine setting (its gradient reduction "
            "all-reduces the sequence-parallel norms); with parallel.engine=deepspeed leave it unset"
        )
    sequence_parallel = parallel.tp > 1 and megatron and parallel.sequence_parallel is not False
    if parallel.tp_comm_overlap and not sequence_parallel:
        raise ConfigError(
            "parallel.tp_comm_overlap=true overlaps sequence-parallel communication: it needs the "
            f"megatron engine, parallel.tp > 1 (here {parallel.tp}) and parallel.sequence_parallel"
        )
    if parallel.bucket_size is not None and parallel.bucket_size < 1:
        raise ConfigError(f"parallel.bucket_size={parallel.bucket_size} must be >= 1 (or null)")
    return replace(
        parallel,
        sequence_parallel=sequence_parallel,
        overlap_param_gather=parallel.overlap_param_gather and parallel.distributed_optimizer,
    )


@dataclass(frozen=True)
class Topology:
    """tp x pp x dp processes, ordered as megatron-core's default 'tp-cp-ep-dp-pp'."""

    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    local_rank: int = 0
    sequence_parallel: bool = False  # activations sharded along the sequence over tp ranks
    pipeline: PipelineLayout = PipelineLayout()  # layers per stage and model chunk
    cp: int = 1  # context parallelism: ranks each sequence is split over (zig-zag)
    tp_comm_overlap: bool = False  # TE userbuffers overlap the tensor-parallel communication

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
        sequence_parallel: bool = False,
        pipeline: PipelineLayout = PipelineLayout(),
        cp: int = 1,
        tp_comm_overlap: bool = False,
    ) -> Topology:
        sizes = (
            ("parallel.tp", tp),
            ("parallel.cp", cp),
            ("parallel.pp", pp),
            ("parallel.vpp", pipeline.vpp),
        )
        for key, value in sizes:
            if value < 1:
                raise ConfigError(f"{key}={value} must be >= 1")
        named = (
            f"parallel.tp={tp} x parallel.cp={cp} x parallel.pp={pp}"
            if cp > 1
            else f"parallel.tp={tp} x parallel.pp={pp}"
        )
        if world_size % (tp * cp * pp):
            raise ConfigError(
                f"{named} = {tp * cp * pp} does not divide the world size {world_size} "
                "(number of launched processes)"
            )
        derived_dp = world_size // (tp * cp * pp)
        if dp is not None and dp != derived_dp:
            raise ConfigError(
                f"{named} x parallel.dp={dp} = {tp * cp * pp * dp} "
                f"!= world size {world_size}; leave parallel.dp unset to derive it"
            )
        checks = (
            ("model.num_attention_heads", num_attention_heads, "parallel.tp", tp),
            ("model.num_query_groups", num_query_groups, "parallel.tp", tp),
            ("model.ffn_hidden_size", ffn_hidden_size, "parallel.tp", tp),
            ("padded vocabulary (model.make_vocab_size_divisible_by)", padded_vocab, "parallel.tp", tp),
        )
        for what, value, by_key, by in checks:
            if value % by:
                raise ConfigError(f"{by_key}={by} does not divide {what}={value}")
        pipeline.layer_counts(num_layers, pp)  # the layers split over stages and chunks
        sp = sequence_parallel and tp > 1
        return cls(world_size, tp, pp, derived_dp, rank, local_rank, sp, pipeline, cp, tp_comm_overlap and sp)

    @property
    def device(self) -> torch.device:
        return current_device()

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

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
        sp = " sp" if self.sequence_parallel else ""
        vpp = f" vpp={self.pipeline.vpp}" if self.pipeline.vpp > 1 else ""
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return f"world={self.world_size} tp={self.tp}{sp}{cp} pp={self.pp}{vpp} dp={self.dp} ({self.backend})"

    @property
    def vpp(self) -> int:
        return self.pipeline.vpp


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
    *,
    tp: int,
    pp: int,
    dp: int | None,
    seed: int,
    model_dims: dict,
    sequence_parallel: bool = False,
    pipeline: PipelineLayout = PipelineLayout(),
    cp: int = 1,
    tp_comm_overlap: bool = False,
    timeout_minutes: int = 30,
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
        sequence_parallel=sequence_parallel,
        pipeline=pipeline,
        cp=cp,
        tp_comm_overlap=tp_comm_overlap,
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
        virtual_pipeline_model_parallel_size=pipeline.vpp if pipeline.vpp > 1 else None,
        context_parallel_size=cp,
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
    assert parallel_state.get_context_parallel_rank() == topo.cp_rank
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


def context_parallel_positions(length: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """The sequence positions a context-parallel rank holds, as megatron-core and Transformer
    Engine expect them (zig-zag, models/common/embeddings/rotary_pos_embedding.py
    get_pos_emb_on_this_cp_rank): the sequence cut into 2 x cp chunks, rank r holding chunks r
    and 2cp - 1 - r, so that under causal masks every rank has the same work."""
    chunk = length // (2 * cp)
    starts = (cp_rank * chunk, (2 * cp - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(start, start + chunk, device=device) for start in starts])
