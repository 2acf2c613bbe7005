"""pretrain/curriculum.py: scheduled values, random-length steps, presets, and the parts of
the objective the curriculum drives (t band weighting, complementary pairs, noise on the
MASK embedding)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from parallel.topology import ConfigError
from pretrain.config import CONF_DIR, load_config
from pretrain.curriculum import (
    CurriculumConfig,
    Schedule,
    check,
    curriculum_at,
    progress,
    step_length,
    value_at,
)
from pretrain.objective import (
    block_diffusion_inputs,
    block_t,
    diffusion_loss,
    mask_embedding_noise,
    mask_tokens,
    sample_t,
    shift_maskable,
)

PRESETS = sorted(p.stem for p in (CONF_DIR / "curriculum").glob("*.yaml"))
# what a preset asks of the rest of the config (its comment says so); blocks of 16 so that
# the hybrid preset's block diffusion happens at the tests' sequence length of 64
PRESET_NEEDS = {"ar_to_dlm_hybrid": ["model.logit_shift=true", "curriculum.block_size.values=[16]"]}


# -- scheduled values --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("interp", "expected"),
    [
        # 'step' holds values[i] from at[i]: 1 from 0, 1 from 0.2, 3 from 0.6, 5 from 1.0
        ("step", {0.0: 1.0, 0.1: 1.0, 0.2: 1.0, 0.4: 1.0, 0.6: 3.0, 0.9: 3.0, 1.0: 5.0}),
        ("linear", {0.0: 1.0, 0.1: 1.0, 0.2: 1.0, 0.4: 2.0, 0.5: 2.5, 0.6: 3.0, 0.8: 4.0, 1.0: 5.0}),
        ("cosine", {0.2: 1.0, 0.3: 1.0 + (1 - math.sqrt(0.5)), 0.4: 2.0, 0.6: 3.0, 1.0: 5.0}),
    ],
)
def test_value_at_hand_computed_points(interp, expected):
    """values [1, 1, 3, 5] at [0, 0.2, 0.6, 1.0]: a flat start, a ramp to 3, a ramp to 5
    (values written by hand from the definition of each interpolation)."""
    schedule = Schedule(values=[1.0, 1.0, 3.0, 5.0], at=[0.0, 0.2, 0.6, 1.0], interp=interp)
    for fraction, value in expected.items():
        assert value_at(schedule, fraction) == pytest.approx(value, abs=1e-12), (interp, fraction)


def test_progress_starts_at_zero_and_stays_below_one():
    assert progress(1, 100) == 0.0 and progress(100, 100) == pytest.approx(0.99)
    schedule = Schedule(values=[0.0, 1.0], at=[0.0, 1.0], interp="linear")
    values = [value_at(schedule, progress(step, 10)) for step in range(1, 11)]
    assert values == pytest.approx([i / 10 for i in range(10)])


# -- random-length steps -----------------------------------------------------------------------
def test_random_length_rate_range_and_determinism():
    """LLaDA's 1%: the share of cut steps is within binomial error of the probability,
    cut lengths cover [1, L], and a (seed, step) always decides the same way."""
    steps, probability, seq_len = 20000, 0.01, 64
    lengths = [step_length(3, step, probability, seq_len) for step in range(1, steps + 1)]
    cut = [n for n in lengths if n < seq_len]
    stderr = math.sqrt(probability * (1 - probability) / steps)
    assert abs(len(cut) / steps - probability) < 4 * stderr
    assert min(cut) >= 1 and max(lengths) == seq_len
    always = [step_length(3, step, 1.0, 8) for step in range(1, 4001)]
    assert set(always) == set(range(1, 9))  # U[1, 8], every length drawn
    assert [step_length(3, s, 0.3, 64) for s in range(50)] == [step_length(3, s, 0.3, 64) for s in range(50)]
    assert [step_length(3, s, 0.3, 64) for s in range(50)] != [step_length(4, s, 0.3, 64) for s in range(50)]
    assert all(step_length(3, s, 1.0, 8, min_length=2) >= 2 for s in range(500))
    assert all(step_length(3, s, 0.0, 8) == 8 for s in range(500))


# -- presets and validation ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_decides_every_step(preset):
    cfg = load_config([f"curriculum={preset}", "train.micro_batch_size=4", *PRESET_NEEDS.get(preset, [])])
    assert cfg.curriculum.name == preset
    plans = [
        curriculum_at(cfg.curriculum, step=s, total_steps=50, seed=0, seq_len=cfg.data.seq_len)
        for s in range(1, 51)
    ]
    assert all(0 < p.t_min < p.t_max <= 1 and 1 <= p.length <= cfg.data.seq_len for p in plans)


def test_presets_say_what_they_are():
    llada = load_config(["curriculum=llada"]).curriculum
    assert value_at(llada.random_length_prob, 0.5) == 0.01 and value_at(llada.t_min, 0.0) == 1e-3
    band = load_config(["curriculum=dfactory_band"])
    assert (value_at(band.curriculum.t_min, 0.3), value_at(band.curriculum.t_max, 0.3)) == (0.3, 0.8)
    assert band.curriculum.complementary and band.objective.normalization == "masked"
    assert load_config(["curriculum=mdlm_antithetic"]).objective.t_sampling == "stratified"
    noise = load_config(["curriculum=llada2_noise"]).curriculum.mask_noise_std
    assert value_at(noise, 0.0) == 0.1 and value_at(noise, 0.05) == pytest.approx(0.05)
    assert value_at(noise, 0.1) == 0.0 and value_at(noise, 0.9) == 0.0


@pytest.mark.parametrize(
    ("schedule", "key"),
    [
        (Schedule(values=[0.1, 0.2], at=[0.0]), "curriculum.t_min"),
        (Schedule(values=[0.1, 0.2], at=[0.1, 0.5]), "curriculum.t_min.at"),
        (Schedule(values=[0.1, 0.2], at=[0.0, 1.5]), "curriculum.t_min.at"),
        (Schedule(values=[0.1, 0.2], at=[0.0, 0.0]), "curriculum.t_min.at"),
        (Schedule(values=[0.1], interp="spline"), "curriculum.t_min.interp"),
        (Schedule(values=[0.0]), "curriculum.t_min.values"),
    ],
)
def test_bad_schedules_name_the_key(schedule, key):
    cfg = load_config([]).curriculum
    cfg.t_min = schedule
    problems = check(cfg)
    assert problems and any(key in p for p in problems), problems


def test_a_band_that_closes_midway_is_refused():
    """t_min rising linearly into a t_max that falls: they cross at 0.5 of training."""
    cfg = load_config([]).curriculum
    cfg.t_min = Schedule(values=[0.1, 0.9], at=[0.0, 1.0], interp="linear")
    cfg.t_max = Schedule(values=[1.0, 0.2], at=[0.0, 1.0], interp="linear")
    (problem,) = check(cfg)
    assert "curriculum.t_min" in problem and "curriculum.t_max" in problem


# -- the objective under the curriculum ------------------------------------------------------
def test_t_stays_in_the_band():
    t = sample_t(torch.arange(4000), seed=1, t_min=0.3, t_max=0.8)
    assert float(t.min()) >= 0.3 and float(t.max()) < 0.8
    assert float(t.min()) < 0.31 and float(t.max()) > 0.79


def _toy_ce(noisy: torch.Tensor, tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """A per-token CE that grows with how much of the row is masked (as a real model's
    does), so that the ELBO integrand depends on t."""
    masked_fraction = (noisy == mask_id).double().mean(dim=1, keepdim=True)
    return (0.5 + 2.0 * masked_fraction**2 + 0.1 * tokens.double()).expand_as(tokens)


def _mean_loss(t_min: float, t_max: float, n: int = 6000) -> tuple[float, float]:
    """Mean and stderr of the ELBO-weighted 'tokens' loss over n rows with t ~ U[t_min, t_max]."""
    tokens = torch.randint(0, 5, (n, 12), generator=torch.Generator().manual_seed(0))
    index = torch.arange(n)
    t = sample_t(index, seed=5, t_min=t_min, t_max=t_max)
    noisy, is_masked = mask_tokens(tokens, t, index, seed=5, mask_id=9)
    ce = _toy_ce(noisy, tokens, 9)
    per_row = [
        diffusion_loss(
            ce[i : i + 1][is_masked[i : i + 1]].unsqueeze(-1),
            tokens[i : i + 1],
            is_masked[i : i + 1],
            t[i : i + 1],
            band=t_max - t_min,
            cross_entropy=lambda logits, targets: logits[:, 0],
        )
        for i in range(0, n)
    ]
    values = torch.tensor([float(s) / int(c) for s, c in per_row], dtype=torch.float64)
    return values.mean().item(), values.std().item() / math.sqrt(n)


def test_elbo_weight_makes_bands_add_up_to_the_whole_range():
    """With w = (t_max - t_min)/t each band's loss is its part of the ELBO integral, so
    the losses of [a, m] and [m, 1] add up to the loss of [a, 1] (in expectation); 1/t
    alone would make each band's loss its average, and the sum about twice the whole."""
    whole, whole_err = _mean_loss(0.01, 1.0)
    low, low_err = _mean_loss(0.01, 0.4)
    high, high_err = _mean_loss(0.4, 1.0)
    err = math.sqrt(whole_err**2 + low_err**2 + high_err**2)
    print(f"[0.01,1]: {whole:.4f}; [0.01,0.4] + [0.4,1]: {low:.4f} + {high:.4f}; stderr {err:.4f}")
    assert abs(low + high - whole) < 4 * err
    assert abs((low / 0.39 + high / 0.6) - whole / 0.99) > 20 * err  # the unscaled version is off


def test_complementary_pairs_score_every_token_once():
    tokens = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1))
    tokens[1::2] = tokens[0::2]  # rows 2k, 2k+1 hold the same sample
    index = torch.arange(10, 18)
    t = sample_t(index, seed=2, t_min=0.2, t_max=0.9, complementary=True)
    assert torch.allclose(t[0::2] + t[1::2], torch.ones(4))
    maskable = shift_maskable(tokens.shape)
    noisy, is_masked = mask_tokens(
        tokens, t, index, seed=2, mask_id=99, maskable=maskable, complementary=True
    )
    assert torch.equal(is_masked[0::2] ^ is_masked[1::2], maskable[0::2])  # each token exactly once
    assert not is_masked[:, 0].any()
    plain_noisy, plain_masked = mask_tokens(tokens[0::2], t[0::2], index[0::2], seed=2, mask_id=99)
    assert torch.equal(is_masked[0::2], plain_masked & maskable[0::2])  # first rows: the usual draw
    logits = torch.randn(int(is_masked.sum()), 100)
    _, count = diffusion_loss(logits, tokens, is_masked, t, normalization="masked")
    assert int(count) == 4 * 15  # with masked normalization a pair counts its sample's tokens once
    _, count = diffusion_loss(logits, tokens, is_masked, t, normalization="tokens")
    assert int(count) == 8 * 16  # with token normalization both rows count: the pair's mean


def test_complementary_pairs_must_be_whole():
    tokens = torch.zeros(4, 8, dtype=torch.long)
    t = torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="whole pairs"):
        mask_tokens(tokens, t, torch.arange(1, 5), seed=0, mask_id=1, complementary=True)


def test_mask_embedding_noise_is_per_sample_and_only_on_masked_positions():
    is_masked = torch.rand(6, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    index = torch.arange(20, 26)
    noise = mask_embedding_noise(is_masked, index, seed=4, std=0.3, hidden_size=32)
    assert noise.shape == (6, 10, 32)
    assert torch.equal(noise.abs().sum(-1) > 0, is_masked)
    assert abs(noise[is_masked].std().item() - 0.3) < 0.03
    again = mask_embedding_noise(is_masked[3:], index[3:], seed=4, std=0.3, hidden_size=32)
    assert torch.equal(again, noise[3:])  # a sample's noise does not depend on its batch
    other = mask_embedding_noise(is_masked, index, seed=5, std=0.3, hidden_size=32)
    assert not torch.equal(other, noise)


# -- block diffusion ------------------------------------------------------------------------------
def test_llada2_wsd_block_sizes_over_training():
    """Warmup 1 -> 4 -> 32 -> 64 -> full, stable full, decay 4096 -> ... -> 32, as used on
    sequences of 128 tokens (blocks of 128 and more are full-sequence steps)."""
    cfg = load_config(["curriculum=llada2_wsd", "data.seq_len=64", "model.max_seq_len=128"]).curriculum
    sizes = {
        round(fraction, 3): curriculum_at(
            cfg, step=int(fraction * 1000) + 1, total_steps=1000, seed=0, seq_len=128
        ).block_size
        for fraction in (0.0, 0.01, 0.02, 0.05, 0.07, 0.5, 0.81, 0.91, 0.94, 0.96, 0.99)
    }
    assert sizes == {
        0.0: 1,
        0.01: 1,
        0.02: 4,
        0.05: 32,
        0.07: 64,
        0.5: 128,
        0.81: 128,
        0.91: 128,
        0.94: 128,
        0.96: 64,
        0.99: 32,
    }


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["curriculum.block_size.values=[4.5]"], "curriculum.block_size"),
        (["curriculum.block_size={values:[1,8],at:[0,0.5],interp:linear}"], "curriculum.block_size"),
        (
            ["curriculum.block_size.values=[4]", "curriculum.bidirectional_ratio.values=[0.5]"],
            "bidirectional_ratio",
        ),
        (["curriculum.block_size.values=[4]", "objective.t_sampling=stratified"], "objective.t_sampling"),
        (["curriculum.block_size.values=[4]", "model.attention=causal"], "model.attention"),
    ],
)
def test_bad_block_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides)


def test_block_t_one_level_per_block():
    index = torch.arange(30, 36)
    t = block_t(index, seed=4, block_size=4, length=10, t_min=0.2, t_max=0.9)
    assert t.shape == (6, 10) and float(t.min()) >= 0.2 and float(t.max()) < 0.9
    blocks = [t[:, 0:4], t[:, 4:8], t[:, 8:10]]  # the last block is short
    assert all(bool((b == b[:, :1]).all()) for b in blocks)
    firsts = torch.stack([b[:, 0] for b in blocks], dim=1)
    assert len(set(firsts.flatten().tolist())) == firsts.numel()  # every block draws its own
    assert torch.equal(block_t(index[3:], seed=4, block_size=4, length=10, t_min=0.2, t_max=0.9), t[3:])
    pairs = block_t(index, seed=4, block_size=4, length=10, t_min=0.2, t_max=0.9, complementary=True)
    assert torch.allclose(pairs[0::2] + pairs[1::2], torch.ones(3, 10))


def test_block_t_masks_each_block_at_its_own_rate():
    """Tokens of a block are masked at the block's t (measured over many samples)."""
    n, length, size = 4000, 8, 4
    index = torch.arange(n)
    t = block_t(index, seed=1, block_size=size, length=length)
    _, masked = mask_tokens(torch.zeros(n, length, dtype=torch.long), t, index, seed=1, mask_id=7)
    low = t[:, 0] < 0.5  # first block's level
    rate_low, rate_high = masked[low, :size].float().mean(), masked[~low, :size].float().mean()
    assert rate_low < 0.3 < 0.7 < rate_high  # E[t | t < 0.5] = 0.25, E[t | t >= 0.5] = 0.75


def test_block_diffusion_inputs_put_the_noisy_copy_first():
    tokens = torch.arange(10, 18).reshape(1, 8)
    noisy = torch.full_like(tokens, 99)  # every token masked
    plain = block_diffusion_inputs(noisy, tokens, block_size=4, shift=False)
    assert torch.equal(plain, torch.cat([noisy, tokens], dim=1))
    shifted = block_diffusion_inputs(noisy, tokens, block_size=4, shift=True)
    # under a shift, block k is predicted from positions 4k-1 .. 4k+2: position 3 (and 7)
    # opens a block's window and holds its clean token
    assert shifted[0, :8].tolist() == [99, 99, 99, 13, 99, 99, 99, 17]
    assert torch.equal(shifted[:, 8:], tokens)


# -- every preset trains -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_the_loss_down(preset, tmp_path):
    """200 steps of the tiny model on standard-library bytes: the training loss of the last
    20 steps is well below that of the first 20, and the final held-out bound is finite
    and below the bound of a uniform guess over the byte vocabulary (ln 260 nats)."""
    from tests.dist import QUIET, launch, read_metrics

    steps = 200
    launch(
        1,
        [
            "model=tiny",
            f"curriculum={preset}",
            "data.max_bytes=400000",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            "train.eval_batches=1",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            f"run.dir={tmp_path / 'run'}",
            *PRESET_NEEDS.get(preset, []),
            *QUIET,
        ],
    )
    rows = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    (final,) = [r for r in rows if "eval_nll" in r]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"{preset}: loss {first:.3f} -> {last:.3f}, held-out bound {final['eval_nll']:.3f}")
    assert len(losses) == steps and last < 0.8 * first
    assert math.isfinite(final["eval_nll"]) and final["eval_nll"] < math.log(260)


def test_random_lengths_are_multiples_of_length_multiple():
    """Every multiple of 4 from 8 (the first >= min_length 5) up to 64 is drawn, nothing else."""
    lengths = {step_length(3, step, 1.0, 64, min_length=5, multiple=4) for step in range(1, 3001)}
    assert lengths == set(range(8, 65, 4))
    assert check(dataclasses.replace(CurriculumConfig(), length_multiple=0)) == [
        "curriculum.length_multiple=0 must be >= 1"
    ]
