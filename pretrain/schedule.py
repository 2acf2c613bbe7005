"""Learning-rate schedules as one pure function."""

from __future__ import annotations

import math

from pretrain.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then cosine
    decay to min_lr, WSD (constant, then linear decay over the last decay_fraction),
    or constant."""
    if optim.warmup_steps > 0 and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "cosine":
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(round(total_steps * optim.decay_fraction)))
    decay_start = total_steps - decay_steps
    if step <= decay_start:
        return optim.lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    return optim.lr + (optim.min_lr - optim.lr) * progress
