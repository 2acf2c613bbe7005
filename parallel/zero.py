"""The DeepSpeed engine's settings (`zero:` section, presets in conf/zero/) and
`DeepSpeedRun`, which holds them with the rest of what the engine takes from the run's
config and turns them into DeepSpeed's JSON config (`config()`).

Pure: no deepspeed import, so config validation stays fast. The generated config is the
only place DeepSpeed's keys are spelled; `zero.extra` passes anything else through
(DeepSpeed validates it at initialise). One source of truth: batch sizes, gradient
clipping and precision come from train.* / optim.*, never from `zero.extra`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallel.topology import ConfigError

ENGINES = ("megatron", "deepspeed")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
OPTIMIZERS = ("auto", "torch", "cpu_adam")
# Keys the run's own config decides; `zero.extra` may not set them.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


@dataclass
class ZeroConfig:
    name: str = "zero2"  # preset name, set by the conf/zero/ option (parallel.engine=deepspeed only)
    stage: int = 2  # ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters sharded over dp
    offload_optimizer: str = "none"  # optimizer states and step on: none | cpu | nvme (ZeRO-Offload)
    offload_param: str = "none"  # stage 3 parameters kept on: none | cpu | nvme (ZeRO-Infinity)
    nvme_path: str | None = None  # offload=nvme: a directory on a local NVMe drive
    pin_memory: bool = True  # offload: page-locked host buffers (faster copies, more host memory)
    # AdamW implementation: auto (DeepSpeedCPUAdam under optimizer offload when its op
    # builds, else torch's) | torch | cpu_adam
    optimizer: str = "auto"
    overlap_comm: bool = True  # overlap gradient reduction with backward
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 500_000_000  # stage 1/2: elements per parameter all-gather bucket
    # stage 3: parameters smaller than this stay gathered (0 shards every one: tiny models)
    stage3_param_persistence_threshold: int = 100_000
    stage3_prefetch_bucket_size: int = 50_000_000  # stage 3: elements prefetched ahead of use
    stage3_max_live_parameters: int = 1_000_000_000  # stage 3: gathered elements kept at most
    # anything else of DeepSpeed's config, merged last (e.g. {aio: {block_size: 1048576}})
    extra: dict = field(default_factory=dict)


def validate(zero: ZeroConfig, *, engine: str, pp: int, distributed_optimizer: bool) -> None:
    """Raise ConfigError naming the keys, before any process starts."""
    if engine not in ENGINES:
        raise ConfigError(f"parallel.engine={engine!r} is not one of {ENGINES}")
    if engine != "deepspeed":
        return
    if pp > 1:
        raise ConfigError(
            f"parallel.pp={pp} with parallel.engine=deepspeed: pipeline parallelism is the megatron "
            "engine's (DeepSpeed's ZeRO-2/3 refuse pipelines); use parallel.engine=megatron or parallel.pp=1"
        )
    if not distributed_optimizer:
        raise ConfigError(
            "parallel.distributed_optimizer=false is the megatron engine's; with parallel.engine=deepspeed "
            "the sharding is zero.stage"
        )
    if zero.stage not in (1, 2, 3):
        raise ConfigError(f"zero.stage={zero.stage} is not one of (1, 2, 3)")
    for key in ("offload_optimizer", "offload_param"):
        if getattr(zero, key) not in OFFLOAD_DEVICES:
            raise ConfigError(f"zero.{key}={getattr(zero, key)!r} is not one of {OFFLOAD_DEVICES}")
    if zero.offload_param != "none" and zero.stage != 3:
        raise ConfigError(f"zero.offload_param={zero.offload_param} needs zero.stage=3 (is {zero.stage})")
    if "nvme" in (zero.offload_optimizer, zero.offload_param) and not zero.nvme_path:
        raise ConfigError("zero.offload_optimizer/offload_param=nvme needs zero.nvme_path (a local NVMe dir)")
    if zero.optimizer not in OPTIMIZERS:
        raise ConfigError(f"zero.optimizer={zero.optimizer!r} is not one of {OPTIMIZERS}")
    if zero.optimizer == "cpu_adam" and zero.offload_optimizer == "none":
        raise ConfigError("zero.optimizer=cpu_adam needs zero.offload_optimizer=cpu|nvme")
    owned = sorted(set(zero.extra) & set(OWNED_KEYS))
    if owned:
        raise ConfigError(f"zero.extra sets {owned}: these come from train.* / optim.* (one source of truth)")


@dataclass(frozen=True)
class DeepSpeedRun:
    """What the DeepSpeed engine takes from the run's config besides the model and the
    optimizer settings: made once (`deepspeed_run`), used to build the model (ZeRO-3's
    zero.Init) and the engine, and turned into DeepSpeed's config by `config()`."""

    zero: ZeroConfig
    micro_batch_size: int
    num_microbatches: int
    dp: int
    clip_grad: float
    bf16: bool

    def config(self) -> dict:
        """DeepSpeed's config for this run. The optimizer is passed in built (torch AdamW
        or DeepSpeedCPUAdam), and the LR/weight-decay schedule is megatron's scheduler,
        shared with the megatron engine: so no `optimizer`/`scheduler` sections."""
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.num_microbatches,
            "train_batch_size": self.micro_batch_size * self.num_microbatches * self.dp,
            "gradient_clipping": self.clip_grad,
            "bf16": {"enabled": self.bf16},
            "zero_optimization": zero_section(self.zero),
            "zero_allow_untested_optimizer": True,  # torch's AdamW, passed in
            "zero_force_ds_cpu_optimizer": False,  # ... also under offload (zero.optimizer decides)
            "steps_per_print": 2**62,  # the trainer logs; DeepSpeed's own step log stays quiet
            "wall_clock_breakdown": False,
        }
        return _merge(config, self.zero.extra)


def deepspeed_run(engine: str, zero: ZeroConfig, **settings) -> DeepSpeedRun | None:
    """The DeepSpeed engine's settings with parallel.engine=deepspeed, else None (the
    megatron engine). `settings`: DeepSpeedRun's other fields."""
    return DeepSpeedRun(zero, **settings) if engine == "deepspeed" else None


def zero_section(zero: ZeroConfig) -> dict:
    """DeepSpeed's `zero_optimization` section from the zero: settings."""
    section = {
        "stage": zero.stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": zero.reduce_bucket_size,
    }
    if zero.stage < 3:
        section["allgather_bucket_size"] = zero.allgather_bucket_size
    else:
        section |= {
            "stage3_param_persistence_threshold": zero.stage3_param_persistence_threshold,
            "stage3_prefetch_bucket_size": zero.stage3_prefetch_bucket_size,
            "stage3_max_live_parameters": zero.stage3_max_live_parameters,
        }
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(zero, key)
        if device != "none":
            section[key] = {"device": device, "pin_memory": zero.pin_memory}
            if device == "nvme":
                section[key]["nvme_path"] = zero.nvme_path
    return section


def _merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, nested dictionaries key by key."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_checkpoint_engine(
    state: dict, engine: str, *, where: str, resuming: bool, zero_stage: int | None = None
) -> None:
    """Before start: whether parallel.engine (and zero.stage) can take a checkpoint (its
    state.json). Its weights: any engine (a DeepSpeed checkpoint reaches the megatron
    engine through a converted dist copy, pretrain/engine_convert.py); resuming,
    optimizer included: only the engine that wrote it, at a ZeRO stage it can load."""
    saved = state.get("format", "torch_dist")
    writer = "deepspeed" if saved == "deepspeed" else "megatron"
    if not (resuming and state.get("has_optimizer")):
        return
    if writer != engine:
        raise ConfigError(
            f"{where} was written by the {writer} engine with its optimizer: resuming needs "
            f"parallel.engine={writer}; to continue with parallel.engine={engine} from its weights, "
            "set checkpoint.init_from to it with a new run.dir"
        )
    problem = zero_stage_change(state.get("zero_stage"), zero_stage) if writer == "deepspeed" else None
    if problem:
        raise ConfigError(f"{where}: {problem}")


def zero_stage_change(saved: int | None, mine: int | None) -> str | None:
    """Why a DeepSpeed checkpoint of ZeRO stage `saved` cannot resume at stage `mine`, or
    None. Measured with deepspeed 0.19.8: its universal checkpoint moves ZeRO-1 <-> 2
    (and any DP size), not ZeRO-3 <-> 1/2 (the loader finds no model files)."""
    if saved is None or mine is None or (saved == 3) == (mine == 3):
        return None
    return (
        f"saved with zero.stage={saved}, resumed with zero.stage={mine}: DeepSpeed resumes ZeRO-3 "
        "only as ZeRO-3 and ZeRO-1/2 only as ZeRO-1/2; start from its weights with "
        "checkpoint.init_from in a new run.dir"
    )
