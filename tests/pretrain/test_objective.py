"""The masked-diffusion objective (pretrain/objective.py) as pure functions.

Expectations are computed independently: statistical bounds from the binomial /
uniform distributions, losses by explicit loops with math.log/exp.
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.objective import (
    diffusion_loss,
    logit_positions,
    mask_tokens,
    mix_seed,
    sample_t,
    shift_maskable,
)

MASK_ID = 999
EPS = 1e-3


def _tokens(B: int, L: int) -> torch.Tensor:
    # Distinct, never equal to MASK_ID.
    return (torch.arange(B * L, dtype=torch.int64).reshape(B, L) % 500) + 1


def _sigma_bound(p: float, n: int, k: float = 5.0) -> float:
    return k * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------
# mask_tokens
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t_value", [0.1, 0.5, 0.9])
def test_masked_fraction_matches_t(t_value):
    B, L = 8, 4096
    tokens = _tokens(B, L)
    t = torch.full((B,), t_value)
    _, is_masked = mask_tokens(tokens, t, torch.arange(B), seed=1, mask_id=MASK_ID)
    frac = is_masked.double().mean().item()
    assert abs(frac - t_value) < _sigma_bound(t_value, B * L)


def test_masked_fraction_follows_each_samples_own_t():
    ts = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0]
    B, L = len(ts), 4096
    tokens = _tokens(B, L)
    t = torch.tensor(ts)
    _, is_masked = mask_tokens(tokens, t, torch.arange(100, 100 + B), seed=3, mask_id=MASK_ID)
    for b, tb in enumerate(ts):
        frac = is_masked[b].double().mean().item()
        if tb == 1.0:
            assert frac == 1.0
        else:
            assert abs(frac - tb) < _sigma_bound(tb, L), (b, tb, frac)


def test_x_t_is_mask_id_exactly_where_masked_and_input_elsewhere():
    B, L = 4, 256
    tokens = _tokens(B, L)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    noisy, is_masked = mask_tokens(tokens, t, torch.arange(B), seed=7, mask_id=MASK_ID)
    assert noisy.shape == tokens.shape and noisy.dtype == tokens.dtype
    assert is_masked.dtype == torch.bool and is_masked.shape == tokens.shape
    assert bool((noisy[is_masked] == MASK_ID).all())
    assert torch.equal(noisy[~is_masked], tokens[~is_masked])
    # tokens never equal MASK_ID, so MASK_ID appears exactly at the masked positions
    assert torch.equal(noisy == MASK_ID, is_masked)
    assert 0 < int(is_masked.sum()) < B * L


def test_maskable_excludes_positions():
    B, L = 4, 2048
    tokens = _tokens(B, L)
    t = torch.full((B,), 0.6)
    idx = torch.arange(B)
    g = torch.Generator().manual_seed(0)
    maskable = torch.rand(B, L, generator=g) < 0.5
    maskable[:, :16] = False  # e.g. a prompt
    noisy, is_masked = mask_tokens(tokens, t, idx, seed=5, mask_id=MASK_ID, maskable=maskable)
    assert not bool((is_masked & ~maskable).any())
    assert torch.equal(noisy[~maskable], tokens[~maskable])
    assert bool((noisy[is_masked] == MASK_ID).all())
    n_maskable = int(maskable.sum())
    frac = int(is_masked.sum()) / n_maskable
    assert abs(frac - 0.6) < _sigma_bound(0.6, n_maskable)


def test_maskable_all_false_masks_nothing():
    B, L = 2, 64
    tokens = _tokens(B, L)
    maskable = torch.zeros(B, L, dtype=torch.bool)
    noisy, is_masked = mask_tokens(
        tokens, torch.ones(B), torch.arange(B), seed=0, mask_id=MASK_ID, maskable=maskable
    )
    assert not bool(is_masked.any())
    assert torch.equal(noisy, tokens)


# ---------------------------------------------------------------------------
# sample_t
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["uniform", "stratified"])
def test_sample_t_shape_dtype_and_range(method):
    idx = torch.arange(4000)
    t = sample_t(idx, seed=11, method=method, t_min=EPS, global_batch_size=64)
    assert t.shape == (4000,)
    assert t.dtype == torch.float32
    assert bool((t >= EPS).all()) and bool((t <= 1.0).all())


def test_sample_t_respects_large_eps():
    eps = 0.3
    t = sample_t(torch.arange(2000), seed=2, method="uniform", t_min=eps)
    assert bool((t >= eps).all()) and bool((t <= 1.0).all())
    # lower end actually reached: some t close to eps
    assert float(t.min()) < eps + 0.01


def test_sample_t_uniform_is_roughly_uniform():
    n = 4000
    t = sample_t(torch.arange(n), seed=123, method="uniform", t_min=EPS).double()
    u = (t - EPS) / (1 - EPS)  # should be U(0, 1)
    # mean of U(0,1): 1/2, variance 1/12
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        below = (u < q).double().mean().item()
        assert abs(below - q) < _sigma_bound(q, n), (q, below)
    # Kolmogorov-Smirnov statistic against U(0,1), 0.1% critical value ~1.95/sqrt(n)
    us = torch.sort(u).values
    k = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(k / n - us, us - (k - 1) / n).max().item()
    assert d < 1.95 / math.sqrt(n)


def test_sample_t_uniform_values_are_not_repeated():
    t = sample_t(torch.arange(1000), seed=0, method="uniform")
    assert len(set(t.tolist())) > 990


@pytest.mark.parametrize("B", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_sample_t_stratified_hits_each_stratum_once(B, seed):
    for s in range(5):  # several consecutive global batches
        idx = torch.arange(s * B, (s + 1) * B)
        t = sample_t(idx, seed=seed, method="stratified", t_min=EPS, global_batch_size=B).double()
        # stratum k = [eps + (1-eps) k/B, eps + (1-eps) (k+1)/B)
        strata = torch.floor((t - EPS) / (1 - EPS) * B).long().clamp(max=B - 1)
        assert sorted(strata.tolist()) == list(range(B)), (s, strata.tolist())
        lo = EPS + (1 - EPS) * strata.double() / B
        hi = EPS + (1 - EPS) * (strata.double() + 1) / B
        # float32 output: allow one float32 ulp at the boundaries
        assert bool((t >= lo - 1e-7).all()) and bool((t <= hi + 1e-7).all())


def test_sample_t_stratified_differs_between_global_batches():
    B = 8
    t0 = sample_t(torch.arange(0, B), seed=0, method="stratified", global_batch_size=B)
    t1 = sample_t(torch.arange(B, 2 * B), seed=0, method="stratified", global_batch_size=B)
    assert not torch.equal(torch.sort(t0).values, torch.sort(t1).values)


def test_sample_t_stratified_gives_each_data_parallel_share_strata_from_the_whole_range():
    """A data-parallel rank's contiguous share of the global batch must not be one band of
    strata (with masked-only logits its work grows with t: the rank with the high band is
    the slowest every step). Over 50 steps of B=64 at dp=8, the shares' mean t stays near
    the batch mean (random subsets of 8 strata: spread ~0.1), and which rank gets the
    highest strata changes from step to step."""
    B, dp, steps = 64, 8, 50
    spreads, highest = [], set()
    for step in range(steps):
        t = sample_t(torch.arange(step * B, (step + 1) * B), seed=3, method="stratified", global_batch_size=B)
        share_means = t.reshape(dp, B // dp).double().mean(dim=1)
        spreads.append((share_means.max() - share_means.min()).item())
        highest.add(int(t.argmax()) // (B // dp))
    # contiguous bands give a spread of ~(dp - 1) / dp = 0.875 whatever the offset
    assert sum(spreads) / steps < 0.5, sum(spreads) / steps
    assert len(highest) >= dp // 2


@pytest.mark.parametrize("gbs", [None, 0])
def test_sample_t_stratified_needs_global_batch_size(gbs):
    with pytest.raises(ValueError):
        sample_t(torch.arange(4), seed=0, method="stratified", global_batch_size=gbs)


@pytest.mark.parametrize("method", ["normal", "Uniform", "", "antithetic"])
def test_sample_t_bad_method_raises(method):
    with pytest.raises(ValueError):
        sample_t(torch.arange(4), seed=0, method=method, global_batch_size=4)


# ---------------------------------------------------------------------------
# Noise is a function of (seed, global sample index) only
# ---------------------------------------------------------------------------

N_GLOBAL = 16
SEQ = 128


def _noise(indices, seed, method="uniform", gbs=None):
    idx = torch.as_tensor(indices, dtype=torch.int64)
    tokens = _tokens(N_GLOBAL, SEQ)[idx]
    t = sample_t(idx, seed=seed, method=method, t_min=EPS, global_batch_size=gbs)
    noisy, is_masked = mask_tokens(tokens, t, idx, seed=seed, mask_id=MASK_ID)
    return t, noisy, is_masked


def _layouts():
    n = N_GLOBAL
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()
    return {
        "per_sample": [[i] for i in range(n)],
        "splits_3_5_8": [list(range(0, 3)), list(range(3, 8)), list(range(8, 16))],
        "halves": [list(range(0, 8)), list(range(8, 16))],
        "dp_interleaved_4": [list(range(r, n, 4)) for r in range(4)],
        "shuffled_one_piece": [perm],
        "shuffled_pieces_7_9": [perm[:7], perm[7:]],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("method", ["uniform", "stratified"])
def test_noise_independent_of_layout(layout, method):
    gbs = 8  # two global batches in 0..15
    seed = 17
    t_full, noisy_full, mask_full = _noise(list(range(N_GLOBAL)), seed, method, gbs)
    seen = set()
    for piece in _layouts()[layout]:
        t, noisy, mask = _noise(piece, seed, method, gbs)
        for j, i in enumerate(piece):
            seen.add(i)
            assert t[j].item() == t_full[i].item(), (layout, i)
            assert torch.equal(mask[j], mask_full[i]), (layout, i)
            assert torch.equal(noisy[j], noisy_full[i]), (layout, i)
    assert seen == set(range(N_GLOBAL))


def test_mask_depends_only_on_index_not_on_batch_neighbours():
    # the same sample index, batched with different other samples and t
    tokens = _tokens(3, SEQ)
    t = torch.tensor([0.5, 0.5, 0.5])
    _, m_a = mask_tokens(tokens, t, torch.tensor([5, 6, 7]), seed=0, mask_id=MASK_ID)
    t_other = torch.tensor([0.9, 0.5, 0.1])
    _, m_b = mask_tokens(tokens, t_other, torch.tensor([1, 6, 2]), seed=0, mask_id=MASK_ID)
    assert torch.equal(m_a[1], m_b[1])


def test_different_seed_gives_different_noise():
    idx = list(range(N_GLOBAL))
    t0, _, m0 = _noise(idx, seed=0)
    t1, _, m1 = _noise(idx, seed=1)
    assert not torch.equal(t0, t1)
    # compare masks at a common t so only the seed differs
    tokens = _tokens(N_GLOBAL, SEQ)
    half = torch.full((N_GLOBAL,), 0.5)
    _, a = mask_tokens(tokens, half, torch.tensor(idx), seed=0, mask_id=MASK_ID)
    _, b = mask_tokens(tokens, half, torch.tensor(idx), seed=1, mask_id=MASK_ID)
    for i in idx:
        assert not torch.equal(a[i], b[i]), i


def test_different_indices_give_different_masks():
    tokens = _tokens(N_GLOBAL, SEQ)
    half = torch.full((N_GLOBAL,), 0.5)
    _, m = mask_tokens(tokens, half, torch.arange(N_GLOBAL), seed=0, mask_id=MASK_ID)
    rows = {tuple(r.tolist()) for r in m}
    assert len(rows) == N_GLOBAL
    t = sample_t(torch.arange(N_GLOBAL), seed=0, method="uniform")
    assert len(set(t.tolist())) == N_GLOBAL


def test_noise_is_reproducible():
    idx = list(range(N_GLOBAL))
    a = _noise(idx, seed=9)
    b = _noise(idx, seed=9)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------
# diffusion_loss
# ---------------------------------------------------------------------------

B_, L_, V_ = 3, 5, 7
T_FIXED = [0.25, 0.8, 0.5]
IS_MASKED = [
    [1, 0, 1, 1, 0],
    [0, 0, 0, 1, 0],
    [1, 1, 1, 1, 1],
]
VALID = [
    [1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1],
]


def _fixed_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(2024)
    logits = (3 * torch.randn(B_, L_, V_, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V_, (B_, L_), generator=g)
    is_masked = torch.tensor(IS_MASKED, dtype=torch.bool)
    t = torch.tensor(T_FIXED)
    return logits, targets, is_masked, t


def _hand_ce(row: list[float], target: int) -> float:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return lse - row[target]


def _hand_loss(logits, targets, weighting, normalization, valid=None):
    lg = logits.tolist()
    tg = targets.tolist()
    total = 0.0
    n_masked = 0
    for b in range(B_):
        for i in range(L_):
            if IS_MASKED[b][i]:
                n_masked += 1
                ce = _hand_ce(lg[b][i], tg[b][i])
                if weighting == "elbo":
                    ce /= T_FIXED[b]
                total += ce
    if normalization == "masked":
        count = n_masked
    elif valid is not None:
        count = sum(sum(r) for r in valid)
    else:
        count = B_ * L_
    return total, count


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
@pytest.mark.parametrize("normalization", ["tokens", "masked"])
def test_loss_equals_hand_computation(weighting, normalization):
    logits, targets, is_masked, t = _fixed_case()
    loss_sum, count = diffusion_loss(
        logits, targets, is_masked, t, weighting=weighting, normalization=normalization
    )
    exp_sum, exp_count = _hand_loss(logits, targets, weighting, normalization)
    assert loss_sum.dim() == 0 and count.dim() == 0
    assert count.dtype == torch.int64
    assert int(count) == exp_count
    assert loss_sum.item() == pytest.approx(exp_sum, rel=1e-5)
    # the loss itself
    assert (loss_sum / count).item() == pytest.approx(exp_sum / exp_count, rel=1e-5)


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
@pytest.mark.parametrize("normalization", ["tokens", "masked"])
def test_loss_with_valid_equals_hand_computation(weighting, normalization):
    logits, targets, is_masked, t = _fixed_case()
    valid = torch.tensor(VALID, dtype=torch.bool)
    assert not bool((is_masked & ~valid).any())  # masked positions are valid
    loss_sum, count = diffusion_loss(
        logits, targets, is_masked, t, weighting=weighting, normalization=normalization, valid=valid
    )
    exp_sum, exp_count = _hand_loss(logits, targets, weighting, normalization, valid=VALID)
    assert int(count) == exp_count
    assert loss_sum.item() == pytest.approx(exp_sum, rel=1e-5)


def test_elbo_weighting_is_uniform_weighting_scaled_per_sample_by_one_over_t():
    logits, targets, is_masked, t = _fixed_case()
    for b in range(B_):
        only_b = torch.zeros_like(is_masked)
        only_b[b] = is_masked[b]
        elbo, _ = diffusion_loss(logits, targets, only_b, t, weighting="elbo")
        unif, _ = diffusion_loss(logits, targets, only_b, t, weighting="uniform")
        assert elbo.item() == pytest.approx(unif.item() / T_FIXED[b], rel=1e-6)


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
def test_changing_unmasked_logits_does_not_change_loss(weighting):
    logits, targets, is_masked, t = _fixed_case()
    ref_sum, ref_count = diffusion_loss(logits, targets, is_masked, t, weighting=weighting)
    changed = logits.clone()
    g = torch.Generator().manual_seed(7)
    noise = 100 * torch.randn(changed.shape, generator=g)
    changed[~is_masked] += noise[~is_masked]
    new_sum, new_count = diffusion_loss(changed, targets, is_masked, t, weighting=weighting)
    assert torch.equal(ref_sum, new_sum)
    assert torch.equal(ref_count, new_count)
    # while changing a masked position's logits does change it
    changed_masked = logits.clone()
    changed_masked[0, 0] += noise[0, 0]
    other, _ = diffusion_loss(changed_masked, targets, is_masked, t, weighting=weighting)
    assert other.item() != ref_sum.item()


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
@pytest.mark.parametrize("normalization", ["tokens", "masked"])
def test_gradient_is_zero_at_unmasked_positions(weighting, normalization):
    logits, targets, is_masked, t = _fixed_case()
    logits = logits.clone().requires_grad_(True)
    loss_sum, count = diffusion_loss(
        logits, targets, is_masked, t, weighting=weighting, normalization=normalization
    )
    (loss_sum / count).backward()
    grad = logits.grad
    assert grad is not None and grad.shape == (B_, L_, V_)
    assert bool((grad[~is_masked] == 0).all())
    # every masked row gets a gradient (softmax - onehot is never all zero)
    assert bool((grad[is_masked].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
@pytest.mark.parametrize("normalization", ["tokens", "masked"])
def test_masked_only_logits_match_full_logits(weighting, normalization):
    logits, targets, is_masked, t = _fixed_case()
    kw = dict(weighting=weighting, normalization=normalization)
    full_sum, full_count = diffusion_loss(logits, targets, is_masked, t, **kw)
    # row-major order of is_masked, built by explicit loops
    rows = [logits[b, i] for b in range(B_) for i in range(L_) if IS_MASKED[b][i]]
    flat = torch.stack(rows)  # [n, V]
    for compact in (flat, flat[:, None, :]):  # [n, V] and [n, 1, V]
        s, c = diffusion_loss(compact, targets, is_masked, t, **kw)
        torch.testing.assert_close(s, full_sum, rtol=1e-6, atol=0)
        assert int(c) == int(full_count)


def test_masked_only_logits_order_matters():
    # swapping two rows with different targets must change the loss, i.e. the rows
    # are matched to targets in row-major order, not in some other order
    logits, targets, is_masked, t = _fixed_case()
    rows = [logits[b, i] for b in range(B_) for i in range(L_) if IS_MASKED[b][i]]
    flat = torch.stack(rows)
    ref, _ = diffusion_loss(flat, targets, is_masked, t, weighting="uniform")
    tm = targets[is_masked].tolist()
    j = next(k for k in range(1, len(tm)) if tm[k] != tm[0])  # a row with another target
    perm = list(range(flat.shape[0]))
    perm[0], perm[j] = perm[j], perm[0]
    swapped, _ = diffusion_loss(flat[perm], targets, is_masked, t, weighting="uniform")
    assert swapped.item() != pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_number_of_logit_rows_raises(delta):
    logits, targets, is_masked, t = _fixed_case()
    n = int(is_masked.sum())
    bad = torch.randn(n + delta, V_)
    with pytest.raises(ValueError):
        diffusion_loss(bad, targets, is_masked, t)
    with pytest.raises(ValueError):
        diffusion_loss(bad[:, None, :], targets, is_masked, t)


def test_wrong_number_of_logit_rows_raises_before_custom_cross_entropy():
    # a vocab-parallel cross entropy need not check shapes itself
    logits, targets, is_masked, t = _fixed_case()
    n = int(is_masked.sum())
    lax_ce = lambda lg, tg: torch.zeros(lg.shape[0])
    with pytest.raises(ValueError):
        diffusion_loss(torch.randn(n + 1, V_), targets, is_masked, t, cross_entropy=lax_ce)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weighting": "ELBO"},
        {"weighting": "none"},
        {"weighting": ""},
        {"normalization": "batch"},
        {"normalization": "Tokens"},
        {"normalization": ""},
    ],
)
def test_invalid_weighting_or_normalization_raises(kwargs):
    logits, targets, is_masked, t = _fixed_case()
    with pytest.raises(ValueError):
        diffusion_loss(logits, targets, is_masked, t, **kwargs)


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
def test_custom_cross_entropy_is_used(weighting):
    logits, targets, is_masked, t = _fixed_case()
    n = int(is_masked.sum())
    calls = []

    def fake_ce(lg, tg):
        calls.append((lg.detach().clone(), tg.clone()))
        return torch.arange(1, lg.shape[0] + 1, dtype=torch.float32)  # CE_j = j + 1

    loss_sum, _ = diffusion_loss(logits, targets, is_masked, t, weighting=weighting, cross_entropy=fake_ce)
    assert len(calls) == 1
    lg, tg = calls[0]
    assert lg.shape == (n, V_)
    assert torch.equal(lg, logits[is_masked])
    assert torch.equal(tg, targets[is_masked])
    # hand sum: the j-th masked position (row-major) has CE j + 1
    expected = 0.0
    j = 0
    for b in range(B_):
        for i in range(L_):
            if IS_MASKED[b][i]:
                j += 1
                expected += j / T_FIXED[b] if weighting == "elbo" else j
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("normalization", ["tokens", "masked"])
def test_no_masked_positions_gives_zero_sum(normalization):
    logits, targets, _, t = _fixed_case()
    none = torch.zeros(B_, L_, dtype=torch.bool)
    loss_sum, count = diffusion_loss(logits, targets, none, t, normalization=normalization)
    assert loss_sum.item() == 0.0
    assert int(count) == (0 if normalization == "masked" else B_ * L_)


def test_loss_with_sampled_noise_end_to_end():
    # sample_t + mask_tokens + diffusion_loss agree with the hand computation
    B, L, V = 4, 16, 11
    idx = torch.arange(20, 20 + B)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    t = sample_t(idx, seed=4, method="uniform")
    _, is_masked = mask_tokens(tokens, t, idx, seed=4, mask_id=V)
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(2))
    loss_sum, count = diffusion_loss(logits, tokens, is_masked, t, weighting="elbo", normalization="masked")
    lg, tg, m, tt = logits.tolist(), tokens.tolist(), is_masked.tolist(), t.tolist()
    expected = sum(_hand_ce(lg[b][i], tg[b][i]) / tt[b] for b in range(B) for i in range(L) if m[b][i])
    assert int(count) == sum(sum(r) for r in m)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------
# mix_seed
# ---------------------------------------------------------------------------


def test_mix_seed_is_deterministic_and_63_bit():
    for parts in [(0,), (1, 2, 3), (2**62, 7), (2**64 - 1,), (123456789, 0x7A11, 42)]:
        a = mix_seed(*parts)
        assert a == mix_seed(*parts)
        assert isinstance(a, int)
        assert 0 <= a < 2**63


def test_mix_seed_sensitive_to_each_part():
    base = (11, 22, 33, 44)
    ref = mix_seed(*base)
    for k in range(len(base)):
        for delta in (1, 2, 1 << 40):
            changed = list(base)
            changed[k] += delta
            assert mix_seed(*changed) != ref, (k, delta)


def test_mix_seed_sensitive_to_order():
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert mix_seed(1, 2, 3) != mix_seed(3, 2, 1)
    assert mix_seed(0, 1) != mix_seed(1, 0)


def test_mix_seed_sensitive_to_number_of_parts():
    assert mix_seed(5) != mix_seed(5, 0)
    assert mix_seed(0) != mix_seed(0, 0)


def test_mix_seed_has_no_collisions_on_small_grid():
    seen = {mix_seed(s, stream, i) for s in range(8) for stream in range(4) for i in range(64)}
    assert len(seen) == 8 * 4 * 64


# -- logit shift (AR-initialised DLMs: position i predicts token i+1) ---------------------------
def test_logit_shift_scores_masked_token_j_with_the_logits_of_position_j_minus_1():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 7, 11
    tokens = torch.randint(0, V, (B, L), generator=g)
    logits = torch.randn(B, L, V, generator=g)
    t = torch.tensor([0.3, 0.6, 0.9])
    _, is_masked = mask_tokens(
        tokens, t, torch.arange(B), seed=1, mask_id=V - 1, maskable=shift_maskable((B, L))
    )
    assert not is_masked[:, 0].any() and is_masked.sum() > 3
    positions = logit_positions(is_masked, shift=True)
    loss_sum, _ = diffusion_loss(logits[positions], tokens, is_masked, t, weighting="elbo")
    hand = sum(
        torch.nn.functional.cross_entropy(logits[b, j - 1], tokens[b, j]) / t[b]
        for b in range(B)
        for j in range(1, L)
        if is_masked[b, j]
    )
    assert float(loss_sum) == pytest.approx(float(hand), rel=1e-6)
    # and it differs from the unshifted loss on the same logits
    unshifted, _ = diffusion_loss(logits[is_masked], tokens, is_masked, t, weighting="elbo")
    assert float(unshifted) != pytest.approx(float(hand), rel=1e-3)


def test_logit_shift_without_shift_is_the_identity_and_refuses_a_masked_position_0():
    is_masked = torch.tensor([[False, True, False, True], [True, False, False, False]])
    assert torch.equal(logit_positions(is_masked, shift=False), is_masked)
    with pytest.raises(ValueError, match="position 0"):
        logit_positions(is_masked, shift=True)


# ---------------------------------------------------------------------------
# Device discipline: every tensor follows the inputs' device
# ---------------------------------------------------------------------------


def _objective(device, weighting: str, normalization: str, masked_only: bool, shift: bool) -> dict:
    B, L, V = 3, 12, 16
    index = torch.arange(5, 5 + B)
    tokens = (torch.arange(B * L).reshape(B, L) % (V - 1)).to(device)
    t = sample_t(index, seed=1, method="stratified", global_batch_size=8).to(device)
    maskable = shift_maskable(tokens.shape, tokens.device) if shift else None
    noisy, is_masked = mask_tokens(tokens, t, index, seed=1, mask_id=V - 1, maskable=maskable)
    positions = logit_positions(is_masked, shift=shift)
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(0)).to(device)
    logits = logits[positions] if masked_only else logits
    valid = None if normalization == "masked" else torch.ones_like(tokens, dtype=torch.bool)
    loss_sum, count = diffusion_loss(
        logits, tokens, is_masked, t, weighting=weighting, normalization=normalization, valid=valid
    )
    loss_sum_no_valid, count_no_valid = diffusion_loss(
        logits, tokens, is_masked, t, weighting=weighting, normalization=normalization
    )
    return {
        "noisy": noisy,
        "positions": positions,
        "sums": torch.stack([loss_sum, loss_sum_no_valid, count.double(), count_no_valid.double()]),
    }


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
@pytest.mark.parametrize("normalization", ["tokens", "masked"])
@pytest.mark.parametrize(("masked_only", "shift"), [(True, False), (False, True)])
def test_objective_follows_the_inputs_device(weighting, normalization, masked_only, shift):
    """On a device that is not the CPU (tests/simulated_device.py: a CPU tensor mixed in
    raises, as on a GPU), every output is on that device and equals the CPU result."""
    from tests.simulated_device import DEVICE, OnDevice, simulated_device, values

    args = (weighting, normalization, masked_only, shift)
    cpu = _objective(torch.device("cpu"), *args)
    with simulated_device():
        out = _objective(DEVICE, *args)
        assert all(isinstance(v, OnDevice) for v in out.values())
        got = values(out)
    for key in cpu:
        assert torch.equal(got[key], cpu[key]), key
