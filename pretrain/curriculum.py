"""The masking curriculum: what corruption each training step uses, as pure functions
of (global step, train.steps, seed, the curriculum config).

Every rank and every layout calls `curriculum_at` with the same arguments and gets the
same answer, so nothing is communicated; a run resumed mid-schedule continues exactly
because nothing here has state. Presets live in conf/curriculum/.

A scheduled value is a piecewise function of training progress p = (step - 1) / steps
in [0, 1): `Schedule(values, at, interp)` holds values[i] from at[i] on, and between
at[i] and at[i+1] either keeps it ('step'), or moves to values[i+1] linearly ('linear')
or along a half cosine ('cosine'); after the last point the last value holds. One value
is a constant.

Schedules:
  t_min, t_max          masking level t ~ U[t_min, t_max] (LLaDA: [1e-3, 1]; dFactory's
                        0.3-0.8 band). With ELBO weighting the loss is the band's part of
                        the ELBO: w(t) = (t_max - t_min) / t (see objective.py).
  random_length_prob    probability that a step's whole batch is cut to a length drawn
                        from U[1, L] (LLaDA's 1%, for variable-length generation).
  mask_noise_std        std of Gaussian noise added to the MASK token's input embedding
                        (LLaDA2.0, against gradient blow-ups of AR-initialised runs),
                        usually annealed to zero.
  bidirectional_ratio   attention-mask annealing (DiffuLLaMA): causal attention plus each
                        non-causal link with this probability (pretrain/masks.py); 1 (the
                        default) is plain bidirectional attention, no mask tensor.
  block_size            block diffusion (BD3-LM): the model sees [x_t, x0] (2L tokens)
                        under the block mask, one t per block; 0 or >= the step's length
                        is plain full-sequence masked diffusion. Scheduled in steps it is
                        LLaDA2.0's block-size Warmup-Stable-Decay (conf/curriculum/llada2_wsd).
  ar_weight, dlm_weight the hybrid loss of AR-initialised runs (Megatron-Bridge's AR-to-DLM
                        recipe: 1.0 x AR + 0.3 x DLM): with ar_weight > 0 the clean copy of
                        [x_t, x0] attends causally and its next-token cross entropy is
                        added; defaults 0 and 1 (diffusion only).
And one switch:
  complementary         rows come in pairs holding the same sample, the second with the
                        complement of the first one's mask (LLaDA2.0): every token of the
                        sample is scored once per pair.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from pretrain.objective import mix_seed

INTERPOLATIONS = ("step", "linear", "cosine")
_STREAM_LENGTH = 0x1E46


@dataclass
class Schedule:
    """A value over training: values[i] from progress at[i] on (see the module doc)."""

    values: list[float] = field(default_factory=lambda: [0.0])  # the value from each point of `at` on
    at: list[float] = field(default_factory=lambda: [0.0])  # fractions of train.steps where each value starts
    interp: str = "step"  # between points: step (hold) | linear | cosine


def constant(value: float) -> Schedule:
    return Schedule(values=[value], at=[0.0])


@dataclass
class CurriculumConfig:
    name: str = "constant"  # preset name, set by the conf/curriculum/ option
    # lower end of the masking-ratio band: t ~ U[t_min, t_max]
    t_min: Schedule = field(default_factory=lambda: constant(1e-3))
    # upper end of the masking-ratio band: t ~ U[t_min, t_max]
    t_max: Schedule = field(default_factory=lambda: constant(1.0))
    # probability that a step's whole batch is cut to a length drawn from U[1, data.seq_len]
    random_length_prob: Schedule = field(default_factory=lambda: constant(0.0))
    # std of Gaussian noise added to the MASK token's input embedding
    mask_noise_std: Schedule = field(default_factory=lambda: constant(0.0))
    # probability of each non-causal attention link on top of causal ones (1: bidirectional)
    bidirectional_ratio: Schedule = field(default_factory=lambda: constant(1.0))
    # tokens per block of block diffusion (BD3-LM); 0: the full sequence
    block_size: Schedule = field(default_factory=lambda: constant(0))
    # weight of the next-token (AR) loss on the clean copy; 0: none
    ar_weight: Schedule = field(default_factory=lambda: constant(0.0))
    # weight of the masked-diffusion (DLM) loss
    dlm_weight: Schedule = field(default_factory=lambda: constant(1.0))
    complementary: bool = False  # pair each row with the same sample under the complementary mask
    # random lengths are multiples of this (e.g. parallel.tp under sequence parallelism, which
    # shards every sequence over the tensor-parallel ranks); the same under every layout
    length_multiple: int = 1

    @property
    def uses_random_lengths(self) -> bool:
        return max(self.random_length_prob.values) > 0

    @property
    def uses_ar_loss(self) -> bool:
        return max(self.ar_weight.values) > 0

    def uses_block_diffusion(self, seq_len: int) -> bool:
        """Some step trains with blocks shorter than the sequence."""
        return any(0 < size < seq_len for size in self.block_size.values)

    @property
    def anneals_attention(self) -> bool:
        """Some step attends through an annealed causal mask (a ratio below 1)."""
        return min(self.bidirectional_ratio.values) < 1


@dataclass(frozen=True)
class StepCurriculum:
    """What one optimizer step uses. `length` is the sequence length of the step's batch
    (shorter than data.seq_len on a random-length step)."""

    t_min: float
    t_max: float
    length: int
    mask_noise_std: float
    bidirectional_ratio: float
    complementary: bool
    block_size: int = 0  # tokens per block; the step's length when not block diffusion
    ar_weight: float = 0.0
    dlm_weight: float = 1.0

    @property
    def block_diffusion(self) -> bool:
        return self.block_size < self.length

    @property
    def two_copies(self) -> bool:
        """The model sees [x_t, x0]: block diffusion, or the hybrid loss's causal clean copy."""
        return self.block_diffusion or self.ar_weight > 0

    @property
    def model_length(self) -> int:
        """Tokens per row the model sees: 2L for [x_t, x0]."""
        return 2 * self.length if self.two_copies else self.length

    def metrics(self) -> dict:
        """The per-step record fields (metrics.jsonl, wandb)."""
        return {
            "curriculum/t_min": self.t_min,
            "curriculum/t_max": self.t_max,
            "curriculum/length": self.length,
            "curriculum/mask_noise_std": self.mask_noise_std,
            "curriculum/bidirectional_ratio": self.bidirectional_ratio,
            "curriculum/block_size": self.block_size,
            "curriculum/ar_weight": self.ar_weight,
            "curriculum/dlm_weight": self.dlm_weight,
        }


def progress(step: int, total_steps: int) -> float:
    """Training progress of optimizer step `step` (1-based): 0 for the first step."""
    return (step - 1) / max(total_steps, 1)


def value_at(schedule: Schedule, fraction: float) -> float:
    """The schedule's value at training progress `fraction`."""
    segment = bisect.bisect_right(schedule.at, fraction) - 1
    if segment < 0:
        return float(schedule.values[0])
    if segment + 1 >= len(schedule.values) or schedule.interp == "step":
        return float(schedule.values[segment])
    start, end = schedule.at[segment], schedule.at[segment + 1]
    alpha = (fraction - start) / (end - start)
    if schedule.interp == "cosine":
        alpha = 0.5 * (1.0 - math.cos(math.pi * alpha))
    low, high = schedule.values[segment], schedule.values[segment + 1]
    return float(low + alpha * (high - low))


def step_length(
    seed: int, step: int, probability: float, seq_len: int, *, min_length: int = 1, multiple: int = 1
) -> int:
    """The step's sequence length: with `probability`, a multiple of `multiple` drawn
    uniformly from [min_length, seq_len] (LLaDA's random length); else seq_len. One draw
    per (seed, step): all ranks agree."""
    if probability <= 0:
        return seq_len
    generator = torch.Generator().manual_seed(mix_seed(seed, _STREAM_LENGTH, step))
    draw, length = torch.rand(2, generator=generator, dtype=torch.float64, device="cpu").tolist()
    if draw >= probability:
        return seq_len
    low, high = -(-min_length // multiple), seq_len // multiple  # in units of `multiple`
    return (low + int(length * (high - low + 1))) * multiple


def curriculum_at(
    cfg: CurriculumConfig, *, step: int, total_steps: int, seed: int, seq_len: int, min_length: int = 1
) -> StepCurriculum:
    """Everything the curriculum decides for optimizer step `step` (1-based)."""
    fraction = progress(step, total_steps)
    cut = value_at(cfg.random_length_prob, fraction)
    length = step_length(seed, step, cut, seq_len, min_length=min_length, multiple=cfg.length_multiple)
    return StepCurriculum(
        t_min=value_at(cfg.t_min, fraction),
        t_max=value_at(cfg.t_max, fraction),
        length=length,
        mask_noise_std=value_at(cfg.mask_noise_std, fraction),
        bidirectional_ratio=value_at(cfg.bidirectional_ratio, fraction),
        complementary=cfg.complementary,
        block_size=effective_block_size(value_at(cfg.block_size, fraction), length),
        ar_weight=value_at(cfg.ar_weight, fraction),
        dlm_weight=value_at(cfg.dlm_weight, fraction),
    )


def effective_block_size(value: float, length: int) -> int:
    """A scheduled block size as used on a sequence of `length`: 0 and anything from the
    length up mean the whole sequence (plain masked diffusion)."""
    size = int(round(value))
    return length if size <= 0 or size >= length else size


def eval_curriculum(cfg: CurriculumConfig, seq_len: int) -> StepCurriculum:
    """Evaluation noise: the full t range [min t_min, 1] over the schedule, full length,
    no embedding noise, no pairing, full bidirectional attention (where annealing ends),
    so that evals at any step measure the same thing."""
    return StepCurriculum(
        t_min=min(cfg.t_min.values),
        t_max=1.0,
        length=seq_len,
        mask_noise_std=0.0,
        bidirectional_ratio=1.0,
        complementary=False,
        block_size=seq_len,
    )


# -- validation (config errors name the key) ---------------------------------------------------
def check_schedule(key: str, schedule: Schedule, *, low: float, high: float) -> list[str]:
    """Problems with one schedule, each naming `key`."""
    problems = []
    if schedule.interp not in INTERPOLATIONS:
        problems.append(f"{key}.interp={schedule.interp!r} is not one of {INTERPOLATIONS}")
    if not schedule.values or len(schedule.values) != len(schedule.at):
        problems.append(f"{key}: values and at need the same, nonzero length")
    elif schedule.at[0] != 0 or any(b <= a for a, b in zip(schedule.at, schedule.at[1:], strict=False)):
        problems.append(f"{key}.at={list(schedule.at)} must start at 0 and increase")
    elif schedule.at[-1] > 1:
        problems.append(f"{key}.at={list(schedule.at)}: fractions of train.steps, at most 1")
    bad = [v for v in schedule.values if not low <= v <= high]
    if bad:
        problems.append(f"{key}.values={list(schedule.values)}: each must be in [{low}, {high}]")
    return problems


def check(cfg: CurriculumConfig) -> list[str]:
    """Every problem with the curriculum section, naming keys; [] when valid."""
    problems = check_schedule("curriculum.t_min", cfg.t_min, low=1e-6, high=1.0)
    problems += check_schedule("curriculum.t_max", cfg.t_max, low=1e-6, high=1.0)
    problems += check_schedule("curriculum.random_length_prob", cfg.random_length_prob, low=0.0, high=1.0)
    problems += check_schedule("curriculum.mask_noise_std", cfg.mask_noise_std, low=0.0, high=math.inf)
    problems += check_schedule("curriculum.bidirectional_ratio", cfg.bidirectional_ratio, low=0.0, high=1.0)
    problems += check_schedule("curriculum.block_size", cfg.block_size, low=0, high=math.inf)
    problems += check_schedule("curriculum.ar_weight", cfg.ar_weight, low=0, high=math.inf)
    problems += check_schedule("curriculum.dlm_weight", cfg.dlm_weight, low=0, high=math.inf)
    if cfg.block_size.interp != "step" or any(v != int(v) for v in cfg.block_size.values):
        problems.append("curriculum.block_size: whole numbers of tokens, changing in steps (interp: step)")
    if cfg.length_multiple < 1:
        problems.append(f"curriculum.length_multiple={cfg.length_multiple} must be >= 1")
    if (any(0 < v for v in cfg.block_size.values) or cfg.uses_ar_loss) and cfg.anneals_attention:
        problems.append(
            "curriculum.block_size / ar_weight and curriculum.bidirectional_ratio both set the "
            "attention mask: use one"
        )
    if not problems:
        problems += check_band(cfg)
    return problems


def check_band(cfg: CurriculumConfig) -> list[str]:
    """t_min < t_max at every point of either schedule (both are piecewise monotone, so
    checking the union of their breakpoints, and just before each, suffices for 'step';
    interpolated schedules are checked on a fine grid)."""
    grid = sorted(set(cfg.t_min.at) | set(cfg.t_max.at) | {i / 1000 for i in range(1000)})
    for fraction in grid:
        low, high = value_at(cfg.t_min, fraction), value_at(cfg.t_max, fraction)
        if low >= high:
            return [
                f"curriculum.t_min ({low}) must stay below curriculum.t_max ({high}); "
                f"not so at {fraction:.3f} of train.steps"
            ]
    return []
