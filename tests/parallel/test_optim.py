"""The optimizer's schedule and parameter groups (parallel/optim.py, parallel/engine.py).

The LR and weight decay come from megatron-core's OptimizerParamScheduler, built from
optim.* by `scheduler_arguments` and advanced to step k before the k-th update, as the
engine does. The expectations below are the formulas written out (steps 1-based);
engine-level tests run a real engine in a fresh process group.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from parallel.optim import OptimConfig, scheduler_arguments, validate
from parallel.topology import ConfigError
from tests.dist import spawn

LR = 3e-3
MIN_LR = 3e-4


def _optim(schedule: str, warmup: int = 10, decay_fraction: float = 0.2, **more) -> OptimConfig:
    return OptimConfig(
        lr=LR, min_lr=MIN_LR, schedule=schedule, warmup_steps=warmup, decay_fraction=decay_fraction, **more
    )


class _Groups:
    """What the scheduler touches of megatron's optimizer: a decaying and a no_decay group
    (as get_megatron_optimizer builds them: max_lr/min_lr from the config, a wd_mult)."""

    def __init__(self, optim: OptimConfig):
        self.param_groups = [
            {"max_lr": optim.lr, "min_lr": optim.min_lr, "wd_mult": 1.0},
            {"max_lr": optim.lr, "min_lr": optim.min_lr, "wd_mult": 0.0},
        ]


def _schedule(optim: OptimConfig, total_steps: int, steps) -> list[tuple[float, float, float]]:
    """(lr, weight decay, no_decay group's weight decay) at each of `steps` (increasing)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    groups = _Groups(optim)
    scheduler = OptimizerParamScheduler(
        groups, **scheduler_arguments(optim, total_steps), override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )  # fmt: skip
    values = []
    for step in steps:
        scheduler.step(increment=step - scheduler.num_steps)  # as Engine.optimizer_step
        decay, no_decay = groups.param_groups
        assert decay["lr"] == no_decay["lr"]
        values.append((decay["lr"], decay["weight_decay"], no_decay["weight_decay"]))
    return values


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    return _schedule(optim, total_steps, [step])[0][0]


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


# ---------------------------------------------------------------------------
# the other knobs: warmup_init, decay_steps, linear / inverse_sqrt, WSD styles
# ---------------------------------------------------------------------------


def test_warmup_starts_at_warmup_init():
    optim = _optim("cosine", warmup=4, warmup_init=1e-4)
    for k in range(1, 5):
        assert lr_at(k, optim, 100) == pytest.approx(1e-4 + (LR - 1e-4) * k / 4, rel=1e-12)


def test_decay_steps_ends_the_decay_before_train_steps():
    optim = _optim("linear", warmup=10, decay_steps=60)
    for step in (11, 35, 60):
        assert lr_at(step, optim, 100) == pytest.approx(LR - (LR - MIN_LR) * (step - 10) / 50, rel=1e-12)
    assert lr_at(61, optim, 100) == lr_at(100, optim, 100) == MIN_LR


def test_inverse_sqrt_decay():
    optim = _optim("inverse_sqrt", warmup=16)
    for step in (17, 64, 400):
        assert lr_at(step, optim, 1000) == pytest.approx(max(MIN_LR, LR * 4 / math.sqrt(step)), rel=1e-12)


@pytest.mark.parametrize(
    ("style", "coefficient"),
    [
        ("cosine", lambda r: 0.5 * (math.cos(math.pi * r) + 1)),
        ("exponential", lambda r: 2 * 0.5**r - 1),
        ("minus_sqrt", lambda r: 1 - math.sqrt(r)),
    ],
)
def test_wsd_decay_styles(style, coefficient):
    optim = _optim("wsd", warmup=5, decay_fraction=0.2, wsd_decay_style=style)
    for step in (80, 81, 90, 100):
        r = max(0, step - 80) / 20
        assert lr_at(step, optim, 100) == pytest.approx(MIN_LR + coefficient(r) * (LR - MIN_LR), rel=1e-12)


@pytest.mark.parametrize("total", [1, 3, 10])
def test_a_run_shorter_than_its_warmup_only_warms_up(total):
    """megatron's scheduler needs warmup < decay steps even for 'constant'."""
    for schedule in ("cosine", "constant", "wsd"):
        optim = _optim(schedule, warmup=10)
        assert [lr_at(k, optim, total) for k in range(1, total + 1)] == pytest.approx(
            [LR * k / 10 for k in range(1, total + 1)], rel=1e-12
        )


# ---------------------------------------------------------------------------
# weight decay: the schedule, and none for the no_decay group
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "fraction"),
    [("linear", lambda r: r), ("cosine", lambda r: 0.5 * (math.cos(math.pi * (1 - r)) + 1))],
)
def test_weight_decay_schedule_and_no_decay_group(style, fraction):
    optim = _optim("cosine", weight_decay=0.1, weight_decay_schedule=style, weight_decay_start=0.02)
    steps = [1, 25, 50, 100, 120]
    for step, (_, wd, wd_no_decay) in zip(steps, _schedule(optim, 100, steps), strict=True):
        assert wd == pytest.approx(0.02 + (0.1 - 0.02) * fraction(min(step, 100) / 100), rel=1e-12)
        assert wd_no_decay == 0.0


def test_constant_weight_decay_and_none_for_the_no_decay_group():
    values = _schedule(_optim("wsd"), 50, range(1, 51))
    assert {wd for _, wd, _ in values} == {0.1} and {nd for _, _, nd in values} == {0.0}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"schedule": "step"}, "optim.schedule"),
        ({"wsd_decay_style": "sqrt"}, "optim.wsd_decay_style"),
        ({"weight_decay_schedule": "exp"}, "optim.weight_decay_schedule"),
        ({"min_lr": 1.0}, "optim.min_lr"),
        ({"warmup_init": 1.0}, "optim.warmup_init"),
        ({"warmup_steps": -1}, "optim.warmup_steps"),
        ({"decay_steps": 0}, "optim.decay_steps"),
        ({"schedule": "wsd", "decay_fraction": 0.0}, "optim.decay_fraction"),
        ({"weight_decay_schedule": "linear", "weight_decay_start": 0.5}, "optim.weight_decay_start"),
        ({"weight_decay_start": 0.0}, "optim.weight_decay_schedule"),
    ],
)
def test_bad_settings_fail_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(OptimConfig(**change))


# ---------------------------------------------------------------------------
# the engine: groups, decay, resume (one process group each)
# ---------------------------------------------------------------------------

DIMS = dict(
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    padded_vocab_size=256,
    max_seq_len=32,
    qkv_bias=True,
)
TOPO_DIMS = dict(
    num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, padded_vocab=256
)
BATCH = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def _engine(optim: OptimConfig, train_steps: int = 10):
    from parallel import ModelDims, build_engine, build_model, init_distributed

    topo = init_distributed(tp=1, pp=1, dp=None, seed=1, model_dims=TOPO_DIMS)
    return build_engine(build_model(ModelDims(**DIMS), topo), topo, optim, train_steps=train_steps)


def _step(engine, step: int, loss_scale: float = 1.0):
    """One update on BATCH; loss_scale 0 gives every parameter an exactly zero gradient."""

    def forward_step(batch, model):
        targets = batch.transpose(0, 1).contiguous()
        count = torch.tensor(targets.numel(), device=targets.device)
        return model(batch), lambda out: (engine.cross_entropy(out, targets).sum() * loss_scale, count, {})

    engine.forward_backward(forward_step, [BATCH], num_microbatches=1, seq_len=16, micro_batch_size=2)
    return engine.optimizer_step(step)


def _weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _decay_with_zero_gradients(no_decay: list[str]) -> dict:
    """3 updates with weight_decay 0.5, lr 0.1 and zero gradients (Adam's step is then 0):
    only weight decay moves the weights."""
    from parallel import shutdown_distributed

    optim = OptimConfig(lr=0.1, min_lr=0.0, warmup_steps=0, schedule="constant", weight_decay=0.5)
    optim.no_decay = no_decay
    engine = _engine(optim)
    before = _weights(engine)
    results = [_step(engine, k, loss_scale=0.0) for k in (1, 2, 3)]
    out = {"before": before, "after": _weights(engine), "results": results}
    out["groups"] = engine.describe_param_groups()
    out["wd"] = [g["weight_decay"] for g in engine.optimizer.param_groups]
    shutdown_distributed()
    return out


def test_norms_and_biases_are_not_decayed_and_matrices_shrink_by_one_minus_lr_wd():
    """Megatron-LM's rule (optim.no_decay default): every 1-D parameter (RMSNorm weights,
    QKV biases) is unchanged by weight decay; every matrix shrinks by exactly (1 - lr*wd)
    per update; "*word_embeddings*" also exempts the embedding. Control: no_decay=[]
    decays the norms too (what the engine did before)."""
    default = spawn(_decay_with_zero_gradients, 1, ["1d", "*.bias"])[0]
    assert all(r.applied and r.grad_norm == 0.0 and r.weight_decay == 0.5 for r in default["results"])
    assert sorted(default["wd"]) == [0.0, 0.5]
    one_d = [n for n, w in default["before"].items() if w.dim() == 1]
    assert any("layernorm" in n for n in one_d) and any("bias" in n for n in one_d)
    for name, weight in default["before"].items():
        if weight.dim() == 1:
            assert torch.equal(default["after"][name], weight), name
        else:
            expected = weight.clone()
            for _ in range(3):
                expected.mul_(1 - 0.1 * 0.5)
            assert torch.equal(default["after"][name], expected), name
    tensors = sum(w.dim() > 1 for w in default["before"].values())
    params = sum(w.numel() for w in default["before"].values() if w.dim() > 1)
    no_params = sum(w.numel() for w in default["before"].values() if w.dim() == 1)
    assert f"{tensors} tensors, {params:,} params" in default["groups"]
    assert f"{len(one_d)} tensors, {no_params:,} params" in default["groups"]

    embedding = spawn(_decay_with_zero_gradients, 1, ["1d", "*.bias", "*word_embeddings*"])[0]
    name = next(n for n in embedding["before"] if "word_embeddings" in n)
    assert torch.equal(embedding["after"][name], embedding["before"][name])

    everything = spawn(_decay_with_zero_gradients, 1, [])[0]
    norms = [n for n in one_d if "layernorm" in n]  # (the biases start at 0: decay leaves them there)
    assert all(not torch.equal(everything["after"][n], everything["before"][n]) for n in norms)


def _unknown_pattern() -> str:
    from parallel import shutdown_distributed

    optim = OptimConfig()
    optim.no_decay = ["1d", "*layer_norm*"]
    try:
        _engine(optim)
    except ConfigError as e:
        return str(e)
    finally:
        shutdown_distributed()
    return "no error"


def test_a_no_decay_pattern_that_matches_nothing_fails_naming_the_key():
    message = spawn(_unknown_pattern, 1)[0]
    assert "optim.no_decay" in message and "*layer_norm*" in message and "layernorm" in message


def _resume_schedule(path: str) -> dict:
    """6 updates straight vs 3 + checkpoint + a fresh engine + load + 3, and a resume with
    another optim.lr; per-update (lr, weight decay) and final weights."""
    from parallel import load_checkpoint, save_checkpoint, shutdown_distributed

    optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, schedule="cosine", weight_decay=0.1)
    straight = _engine(optim, train_steps=6)
    first = [_step(straight, k) for k in range(1, 7)]
    out = {"straight": first, "straight_weights": _weights(straight)}
    shutdown_distributed()

    engine = _engine(optim, train_steps=6)
    [_step(engine, k) for k in range(1, 4)]
    save_checkpoint(Path(path) / "step_3", engine, state={"step": 3}, config_yaml="")
    shutdown_distributed()
    resumed = _engine(optim, train_steps=6)
    out["changes"] = load_checkpoint(Path(path) / "step_3", resumed)["schedule_changes"]
    out["resumed"] = [_step(resumed, k) for k in range(4, 7)]
    out["resumed_weights"] = _weights(resumed)
    shutdown_distributed()

    other = OptimConfig(lr=5e-3, min_lr=0.0, warmup_steps=2, schedule="cosine", weight_decay=0.1)
    changed = _engine(other, train_steps=12)
    out["changed_changes"] = load_checkpoint(Path(path) / "step_3", changed)["schedule_changes"]
    out["changed"] = [_step(changed, k) for k in range(4, 7)]
    shutdown_distributed()
    return out


def test_resume_mid_schedule_continues_the_same_values(tmp_path):
    """The scheduler's state goes into state.json: 3 + resume + 3 updates give the same
    LR, weight decay and weights as 6. A resume under another optim.lr / train.steps
    follows the new config (the saved groups' max_lr would otherwise win) and says so."""
    out = spawn(_resume_schedule, 1, str(tmp_path))[0]
    assert out["changes"] == []
    assert [(r.lr, r.weight_decay) for r in out["resumed"]] == [
        (r.lr, r.weight_decay) for r in out["straight"][3:]
    ]
    for name, weight in out["straight_weights"].items():
        assert torch.equal(out["resumed_weights"][name], weight), name
    optim = OptimConfig(lr=5e-3, min_lr=0.0, warmup_steps=2, schedule="cosine")
    expected = [lr for lr, _, _ in _schedule(optim, 12, [4, 5, 6])]
    assert [r.lr for r in out["changed"]] == pytest.approx(expected, rel=1e-12)
    assert any(c.startswith("max_lr 0.01 -> 0.005") for c in out["changed_changes"])
    assert any(c.startswith("lr_decay_steps 6 -> 12") for c in out["changed_changes"])
