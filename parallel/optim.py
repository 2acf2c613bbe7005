"""The optimizer's schema and the pure parts of its schedule (no megatron import here, so
config validation stays fast; parallel/engine.py builds from them).

AdamW with megatron-core's parameter groups, driven by megatron-core's
`OptimizerParamScheduler`: it sets every group's `lr` from the group's `max_lr`/`min_lr`
and its `weight_decay` to the scheduled value times the group's `wd_mult`. Groups
matched by `no_decay` get `wd_mult=0`: norms and biases are not decayed, as in
Megatron-LM, LLaDA and the usual AdamW recipes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from parallel.topology import ConfigError

ONE_DIMENSIONAL = "1d"  # the no_decay entry meaning "every 1-D parameter" (norm weights, biases)
SCHEDULES = {  # optim.schedule -> megatron's lr_decay_style
    "cosine": "cosine",
    "linear": "linear",
    "wsd": "WSD",
    "constant": "constant",
    "inverse_sqrt": "inverse-square-root",
}
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
WEIGHT_DECAY_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    name: str = "adamw"  # preset name, set by the conf/optim/ option
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate reached at the end of the decay
    warmup_steps: int = 10  # linear warmup from warmup_init to lr over these steps
    warmup_init: float = 0.0  # learning rate at the start of the warmup
    schedule: str = "cosine"  # LR after warmup: cosine | linear | wsd | constant | inverse_sqrt
    decay_steps: int | None = None  # the step where the decay ends (None: train.steps)
    decay_fraction: float = 0.2  # wsd: the last share of decay_steps spent decaying
    wsd_decay_style: str = "linear"  # wsd: the decay's shape: linear | cosine | exponential | minus_sqrt
    weight_decay: float = 0.1  # decoupled (AdamW); the final value of a weight-decay schedule
    weight_decay_schedule: str = "constant"  # weight decay over train.steps: constant | linear | cosine
    weight_decay_start: float | None = None  # linear/cosine: the first value (<= weight_decay)
    # Parameters that get no weight decay: "1d" (every 1-D parameter) and fnmatch patterns.
    # Patterns match parameter names such as decoder.layers.0.self_attention.linear_qkv.bias,
    # embedding.word_embeddings.weight, output_layer.weight. The default ["1d"] is
    # Megatron-LM's rule (1-D parameters and *.bias: every bias here is 1-D): RMSNorm
    # weights and QKV biases. [] decays everything. A pattern matching nothing is an error.
    no_decay: list[str] = field(default_factory=lambda: [ONE_DIMENSIONAL])
    beta1: float = 0.9  # AdamW's decay rate of the gradient average (first moment)
    beta2: float = 0.95  # AdamW's decay rate of the squared-gradient average (second moment)
    eps: float = 1e-8  # AdamW's epsilon, added to the denominator
    clip_grad: float = 1.0  # clip the global gradient norm to this; 0: no clipping


def validate(o: OptimConfig) -> None:
    """Raise ConfigError naming the key, before megatron would assert."""
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={o.schedule!r} is not one of {tuple(SCHEDULES)}")
    if o.wsd_decay_style not in WSD_DECAY_STYLES:
        raise ConfigError(f"optim.wsd_decay_style={o.wsd_decay_style!r} is not one of {WSD_DECAY_STYLES}")
    if o.weight_decay_schedule not in WEIGHT_DECAY_SCHEDULES:
        raise ConfigError(
            f"optim.weight_decay_schedule={o.weight_decay_schedule!r} is not one of {WEIGHT_DECAY_SCHEDULES}"
        )
    if not 0 <= o.min_lr <= o.lr or not 0 <= o.warmup_init <= o.lr:
        raise ConfigError(
            f"need 0 <= optim.min_lr ({o.min_lr}) <= optim.lr ({o.lr}) and optim.warmup_init "
            f"({o.warmup_init}) <= optim.lr"
        )
    if o.warmup_steps < 0 or (o.decay_steps is not None and o.decay_steps < 1):
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0, optim.decay_steps >= 1")
    if o.schedule == "wsd" and not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    start = weight_decay_start(o)
    if not 0 <= start <= o.weight_decay:
        raise ConfigError(
            f"need 0 <= optim.weight_decay_start ({start}) <= optim.weight_decay ({o.weight_decay}): "
            "megatron's scheduler only increases weight decay"
        )
    if o.weight_decay_schedule == "constant" and start != o.weight_decay:
        raise ConfigError("optim.weight_decay_start needs optim.weight_decay_schedule=linear|cosine")


def weight_decay_start(o: OptimConfig) -> float:
    return o.weight_decay if o.weight_decay_start is None else o.weight_decay_start


def scheduler_arguments(o: OptimConfig, train_steps: int) -> dict:
    """Keyword arguments of megatron's OptimizerParamScheduler, counted in optimizer steps.

    The scheduler is advanced to step k before the k-th update, so step k uses
    num_steps = k: warmup reaches optim.lr at step warmup_steps and the decay reaches
    min_lr at decay_steps (Megatron-LM advances after the update, one step later). It
    asserts warmup < decay steps even for 'constant': a run shorter than its warmup
    decays over warmup_steps + 1 steps, which it never reaches."""
    decay = max(o.decay_steps or train_steps, o.warmup_steps + 1)
    return dict(
        init_lr=o.warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=SCHEDULES[o.schedule],
        start_wd=weight_decay_start(o),
        end_wd=o.weight_decay,
        wd_incr_steps=train_steps,
        wd_incr_style=o.weight_decay_schedule,
        wsd_decay_steps=max(1, int(round(decay * o.decay_fraction))),
        lr_wsd_decay_style=o.wsd_decay_style,
    )


def local_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP, Float16Module): `module.`."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def param_ndim(param) -> int:
    """A parameter's number of dimensions, also when ZeRO-3 holds it partitioned (flat)."""
    return len(getattr(param, "ds_shape", param.shape))


def excluded_from_decay(patterns: list[str], name: str, ndim: int) -> bool:
    """Whether optim.no_decay exempts the parameter `name` (wrapper prefixes allowed)."""
    name = local_name(name)
    return any(ndim == 1 if p == ONE_DIMENSIONAL else fnmatch.fnmatchcase(name, p) for p in patterns)
