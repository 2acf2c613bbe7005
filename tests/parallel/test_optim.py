"""Learning-rate schedules (pretrain/schedule.py): lr_at(step, optim, total_steps), steps 1-based."""

from __future__ import annotations

import math

import pytest

from pretrain.config import OptimConfig
from pretrain.schedule import lr_at

LR = 3e-3
MIN_LR = 3e-4


def _optim(schedule: str, warmup: int = 10, decay_fraction: float = 0.2) -> OptimConfig:
    return OptimConfig(
        lr=LR, min_lr=MIN_LR, schedule=schedule, warmup_steps=warmup, decay_fraction=decay_fraction
    )


# ---------------------------------------------------------------------------
# warmup
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("warmup", [1, 4, 10])
def test_linear_warmup(schedule, warmup):
    optim = _optim(schedule, warmup=warmup)
    for k in range(1, warmup + 1):
        assert lr_at(k, optim, 100) == pytest.approx(LR * k / warmup, rel=1e-12), k


def test_warmup_ends_at_peak_lr_and_is_increasing():
    optim = _optim("cosine", warmup=8)
    values = [lr_at(k, optim, 100) for k in range(1, 9)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(LR, rel=1e-12)


# ---------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("warmup,total", [(10, 110), (0, 50), (5, 37), (1, 2)])
def test_cosine_reaches_min_lr_at_total_steps(warmup, total):
    optim = _optim("cosine", warmup=warmup)
    assert lr_at(total, optim, total) == pytest.approx(MIN_LR, rel=1e-12)


def test_cosine_stays_at_min_lr_after_total_steps():
    optim = _optim("cosine", warmup=10)
    for step in (111, 120, 500):
        assert lr_at(step, optim, 110) == pytest.approx(MIN_LR, rel=1e-12)


@pytest.mark.parametrize("warmup,total", [(10, 110), (0, 50), (5, 37)])
def test_cosine_monotone_non_increasing_after_warmup(warmup, total):
    optim = _optim("cosine", warmup=warmup)
    start = max(1, warmup)
    values = [lr_at(s, optim, total) for s in range(start, total + 1)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))
    assert all(MIN_LR - 1e-15 <= v <= LR + 1e-15 for v in values)
    # and strictly decreasing somewhere: it is not constant
    assert values[0] > values[-1]


@pytest.mark.parametrize("warmup,total", [(10, 110), (0, 50), (6, 26)])
def test_cosine_midpoint_is_mean_of_lr_and_min_lr(warmup, total):
    optim = _optim("cosine", warmup=warmup)
    assert (total - warmup) % 2 == 0
    mid = warmup + (total - warmup) // 2
    assert lr_at(mid, optim, total) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)


def test_cosine_quarter_points():
    warmup, total = 10, 110  # decay span 100
    optim = _optim("cosine", warmup=warmup)
    # progress 1/4: cos(pi/4) = sqrt(2)/2; progress 3/4: cos(3pi/4) = -sqrt(2)/2
    q1 = MIN_LR + (LR - MIN_LR) * (1 + math.sqrt(2) / 2) / 2
    q3 = MIN_LR + (LR - MIN_LR) * (1 - math.sqrt(2) / 2) / 2
    assert lr_at(warmup + 25, optim, total) == pytest.approx(q1, rel=1e-12)
    assert lr_at(warmup + 75, optim, total) == pytest.approx(q3, rel=1e-12)


def test_cosine_is_continuous_at_end_of_warmup():
    optim = _optim("cosine", warmup=10)
    span = 1000
    a = lr_at(10, optim, 10 + span)
    b = lr_at(11, optim, 10 + span)
    assert a == pytest.approx(LR, rel=1e-12)
    assert b <= a
    assert a - b < (LR - MIN_LR) * 1e-4  # one small step into the decay


# ---------------------------------------------------------------------------
# WSD
# ---------------------------------------------------------------------------


# (warmup, total, decay_fraction); total * decay_fraction never ends in .5, where the
# rounding convention would matter: 37 * 0.3 = 11.1 -> 11 decay steps, 37 * 0.35 = 12.95
# -> 13 (not 12: rounded, not truncated), 100 * 0.29 = 28.999999999999996 -> 29.
@pytest.mark.parametrize(
    "warmup,total,frac",
    [(5, 100, 0.2), (0, 100, 0.2), (3, 37, 0.3), (3, 37, 0.35), (2, 100, 0.29), (10, 1000, 0.1)],
)
def test_wsd_constant_then_linear_to_min_lr(warmup, total, frac):
    optim = _optim("wsd", warmup=warmup, decay_fraction=frac)
    decay_steps = round(total * frac)
    decay_start = total - decay_steps
    assert decay_start > warmup
    # stable phase: exactly lr
    for step in range(warmup + 1, decay_start + 1):
        assert lr_at(step, optim, total) == LR, step
    # decay phase: linear from lr (at decay_start) to min_lr (at total)
    for step in range(decay_start + 1, total + 1):
        expected = LR - (LR - MIN_LR) * (step - decay_start) / decay_steps
        assert lr_at(step, optim, total) == pytest.approx(expected, rel=1e-12), step
    assert lr_at(decay_start + 1, optim, total) < LR  # decay starts exactly there
    assert lr_at(total, optim, total) == pytest.approx(MIN_LR, rel=1e-12)


@pytest.mark.parametrize(
    "total,frac,expected_start",
    [(100, 0.2, 80), (37, 0.3, 26), (37, 0.35, 24), (100, 0.29, 71), (1000, 0.1, 900)],
)
def test_wsd_exact_decay_start(total, frac, expected_start):
    optim = _optim("wsd", warmup=0, decay_fraction=frac)
    assert lr_at(expected_start, optim, total) == LR
    assert lr_at(expected_start + 1, optim, total) < LR


def test_wsd_full_decay_fraction_decays_from_first_step():
    total = 20
    optim = _optim("wsd", warmup=0, decay_fraction=1.0)
    for step in range(1, total + 1):
        expected = LR - (LR - MIN_LR) * step / total
        assert lr_at(step, optim, total) == pytest.approx(expected, rel=1e-12)


def test_wsd_stays_at_min_lr_after_total_steps():
    optim = _optim("wsd", warmup=5, decay_fraction=0.2)
    for step in (101, 150):
        assert lr_at(step, optim, 100) == pytest.approx(MIN_LR, rel=1e-12)


def test_wsd_monotone_non_increasing_after_warmup():
    optim = _optim("wsd", warmup=5, decay_fraction=0.3)
    values = [lr_at(s, optim, 100) for s in range(5, 101)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))


# ---------------------------------------------------------------------------
# constant
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [0, 10])
def test_constant_schedule(warmup):
    optim = _optim("constant", warmup=warmup)
    for step in range(warmup + 1, 200):
        assert lr_at(step, optim, 100) == LR, step
