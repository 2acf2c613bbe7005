"""The Monte Carlo likelihood bound (pretrain/likelihood.py) against exact enumeration.

A toy "model" on a vocabulary of 3 tokens (+ MASK) and 4 scoreable positions maps a noisy
sequence to per-position log-probabilities; the exact bound sums over all 2^4 - 1 mask
subsets, and the Monte Carlo estimates must match it within K_SIGMA of their own
measured standard error.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrain.likelihood import _mask_exactly, bits_per_byte, combine, eval_masks, nll_sum, sample_stats

V, MASK_ID = 3, 3
X = torch.tensor([1, 0, 2, 1, 1])  # position 0 is not scoreable (as under a logit shift)
MASKABLE = torch.tensor([False, True, True, True, True])
K_SIGMA = 4.0  # |MC mean - exact| < 4 se: a false alarm has probability ~6e-5


def _mlp(seed: int = 0):
    """A fixed random MLP from the whole noisy sequence to log p(x_i = v) [N, L, V]."""
    g = torch.Generator().manual_seed(seed)
    L = X.numel()
    w1 = torch.randn(L * (V + 1), 32, generator=g, dtype=torch.float64)
    w2 = torch.randn(32, L * V, generator=g, dtype=torch.float64)

    def model(noisy: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.nn.functional.one_hot(noisy, V + 1).flatten(1).double() @ w1 / 3)
        return torch.log_softmax((h @ w2).reshape(-1, L, V), dim=-1)

    return model


def _ce(model, noisy: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(tokens_i | noisy) for every position, [N, L]."""
    return -model(noisy).gather(-1, tokens[..., None])[..., 0]


def _ce_by_subset(model, x: torch.Tensor, positions: list[int]) -> dict[tuple[int, ...], torch.Tensor]:
    """Every subset M of `positions` (sorted tuple, the empty one too) -> CE [L] of x with M
    masked, from one batched model call."""
    subsets = [s for size in range(len(positions) + 1) for s in itertools.combinations(positions, size)]
    noisy = x.repeat(len(subsets), 1)
    for row, subset in enumerate(subsets):
        noisy[row, list(subset)] = MASK_ID
    return dict(zip(subsets, _ce(model, noisy, x.expand_as(noisy)), strict=True))


def _mean_s_by_size(model, x: torch.Tensor, positions: list[int]) -> dict[int, float]:
    """l -> mean over the subsets M of `positions` of size l of sum_{i in M} CE_i."""
    totals: dict[int, list[float]] = {}
    for subset, ce in _ce_by_subset(model, x, positions).items():
        if subset:
            totals.setdefault(len(subset), []).append(float(ce[list(subset)].sum()))
    return {size: sum(v) / len(v) for size, v in totals.items()}


def exact_bound(model, x: torch.Tensor, positions: list[int]) -> float:
    """B(x) = sum_l (1/L)(L/l) E_{|M|=l} S(M), by enumeration (nats)."""
    return sum(s / size for size, s in _mean_s_by_size(model, x, positions).items())


def exact_truncated(model, x: torch.Tensor, positions: list[int], eps: float) -> float:
    """E of the 'antithetic_t' estimator: (1/(1-eps)) sum_l C(L,l) E_l[S] int_eps^1
    t^(l-1) (1-t)^(L-l) dt, the integral expanded as a polynomial."""
    L = len(positions)
    total = 0.0
    for size, s in _mean_s_by_size(model, x, positions).items():
        integral = sum(
            math.comb(L - size, k) * (-1) ** k * (1 - eps ** (size + k)) / (size + k)
            for k in range(L - size + 1)
        )
        total += math.comb(L, size) * s * integral
    return total / (1 - eps)


def _positions() -> list[int]:
    return [i for i in range(X.numel()) if MASKABLE[i]]


def _draw_sums(model, method: str, n: int, num_draws: int, seed: int = 0, eps: float = 1e-3):
    """[D, n] per-draw sums and [n] counts for n copies of X (distinct global indices)."""
    tokens, maskable = X.repeat(n, 1), MASKABLE.repeat(n, 1)
    sums = []
    for d in range(num_draws):
        noisy, is_masked, weight = eval_masks(
            tokens, torch.arange(n), seed=seed, draw=d, num_draws=num_draws,
            mask_id=MASK_ID, method=method, maskable=maskable, eps=eps,
        )  # fmt: skip
        draw_sum, counts = nll_sum(_ce(model, noisy, tokens)[is_masked], is_masked, weight, maskable)
        sums.append(draw_sum)
    return torch.stack(sums), counts


# ---------------------------------------------------------------------------
# The exact bound itself
# ---------------------------------------------------------------------------


def test_exact_bound_is_the_any_order_average_and_bounds_the_random_order_sampler():
    """B(x) = mean over orders sigma of -log q_sigma(x); q = mean_sigma q_sigma is a proper
    distribution (sum 1 over V^L) and B(x) >= -log q(x) (Jensen)."""
    model, positions = _mlp(), _positions()
    seqs = [torch.tensor([X[0], *rest]) for rest in itertools.product(range(V), repeat=len(positions))]
    q_mix = []
    for x in seqs:
        ce = _ce_by_subset(model, x, positions)
        order_nll = []
        for order in itertools.permutations(positions):  # reveal order[0], order[1], ...
            hidden = [tuple(sorted(order[k:])) for k in range(len(order))]
            order_nll.append(sum(float(ce[h][i]) for h, i in zip(hidden, order, strict=True)))
        bound = exact_bound(model, x, positions)
        assert bound == pytest.approx(sum(order_nll) / len(order_nll), rel=1e-12)
        q_mix.append(sum(math.exp(-v) for v in order_nll) / len(order_nll))
        assert bound >= -math.log(q_mix[-1])
    assert sum(q_mix) == pytest.approx(1.0, rel=1e-12)


def test_bound_equals_nll_for_the_conditionals_of_a_joint_distribution():
    """A model whose conditionals p(x_i | unmasked) come from one joint p: B(x) = -log p(x)."""
    L = 4
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    joint = torch.softmax(torch.randn(len(seqs), generator=torch.Generator().manual_seed(1)).double(), 0)

    def model(noisy: torch.Tensor) -> torch.Tensor:
        seen = noisy != MASK_ID
        consistent = ((seqs[None] == noisy[:, None]) | ~seen[:, None]).all(-1)  # [N, 81]
        p = (consistent * joint).double()  # [N, 81]
        marg = torch.stack([p @ (seqs[:, i, None] == torch.arange(V)).double() for i in range(L)], 1)
        return torch.log(marg / marg.sum(-1, keepdim=True))

    for k in range(0, len(seqs), 7):
        assert exact_bound(model, seqs[k], list(range(L))) == pytest.approx(-math.log(joint[k]), rel=1e-10)


def test_bound_equals_nll_for_a_context_free_model():
    logp = torch.log_softmax(torch.randn(4, V, generator=torch.Generator().manual_seed(2)).double(), -1)
    model = lambda noisy: logp.expand(noisy.shape[0], -1, -1)
    x = torch.tensor([2, 0, 0, 1])
    nll = -sum(float(logp[i, x[i]]) for i in range(4))
    assert exact_bound(model, x, list(range(4))) == pytest.approx(nll, rel=1e-12)


# ---------------------------------------------------------------------------
# Monte Carlo estimates against it
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,num_draws", [("stratified", 4), ("stratified", 3), ("uniform", 4), ("antithetic_t", 4)]
)
def test_monte_carlo_mean_matches_the_exact_value(method, num_draws):
    model, positions = _mlp(), _positions()
    if method == "antithetic_t":
        exact = exact_truncated(model, X, positions, eps=1e-3)
    else:
        exact = exact_bound(model, X, positions)
    per_token, se = combine(sample_stats(*_draw_sums(model, method, 4000, num_draws)))
    exact /= len(positions)
    print(f"{method} D={num_draws}: exact {exact:.5f}, MC {float(per_token):.5f} +- {float(se):.5f}")
    assert abs(float(per_token) - exact) < K_SIGMA * float(se)


def test_antithetic_t_targets_the_same_bound_up_to_eps():
    """int_0^1 (1/t) Binomial(l; L, t) dt = 1/l: with eps = 0 the continuous-time estimator
    has exactly the discrete bound as expectation; eps > 0 shifts it by O(eps)."""
    model, positions = _mlp(), _positions()
    bound = exact_bound(model, X, positions)
    assert exact_truncated(model, X, positions, eps=0.0) == pytest.approx(bound, rel=1e-12)
    gap = exact_truncated(model, X, positions, eps=1e-3) - bound
    print(f"eps=1e-3 shifts the expectation by {gap:+.2e} nats on {bound:.4f}")
    assert abs(gap) < 1e-2 * bound


def _neighbour_model(strength: float = 3.0):
    """log p(x_i = v) proportional to exp(strength * [number of visible neighbours equal to v]):
    context lowers the cross entropy, as in a language model."""

    def model(noisy: torch.Tensor) -> torch.Tensor:
        seen = torch.nn.functional.one_hot(noisy, V + 1)[..., :V].double()  # MASK -> zeros
        context = torch.zeros_like(seen)
        context[:, 1:] += seen[:, :-1]
        context[:, :-1] += seen[:, 1:]
        return torch.log_softmax(strength * context, -1)

    return model


def test_stratification_reduces_the_monte_carlo_variance():
    """Variance of one sample's draw-averaged estimate (per token) over 500 replicates, D = 8.

    L = 256 and a model helped by context: the estimate then varies mostly with the number
    l of masked tokens, which stratification fixes per draw, and little with which l are
    chosen (that part shrinks like log(L) / L per token), as in a real language model."""
    L, n, num_draws = 256, 500, 8
    g = torch.Generator().manual_seed(0)
    x = torch.repeat_interleave(torch.randint(0, V, (L // 8,), generator=g), 8)  # runs of 8
    tokens, model = x.repeat(n, 1), _neighbour_model()
    variances = {}
    for method in ("uniform", "stratified", "antithetic_t"):
        sums = []
        for d in range(num_draws):
            noisy, is_masked, weight = eval_masks(
                tokens, torch.arange(n), seed=0, draw=d, num_draws=num_draws, mask_id=MASK_ID, method=method
            )
            sums.append(nll_sum(_ce(model, noisy, tokens)[is_masked], is_masked, weight)[0])
        variances[method] = float((torch.stack(sums).mean(0) / L).var())
    ratio = variances["uniform"] / variances["stratified"]
    print(f"per-token variance (D={num_draws}): {variances}; uniform / stratified {ratio:.1f}")
    assert ratio > 3.0


# ---------------------------------------------------------------------------
# eval_masks
# ---------------------------------------------------------------------------


def test_stratified_levels_cover_every_l_once_when_draws_equal_length():
    L, n = 6, 20
    tokens, maskable = torch.ones(n, L, dtype=torch.int64), torch.ones(n, L, dtype=torch.bool)
    maskable[:, -2:] = False  # L_b = 4 scoreable positions
    levels = []
    for d in range(4):
        noisy, is_masked, weight = eval_masks(
            tokens, torch.arange(n), seed=3, draw=d, num_draws=4, mask_id=MASK_ID, maskable=maskable
        )
        assert not is_masked[:, -2:].any()
        assert torch.equal(noisy == MASK_ID, is_masked)
        assert torch.equal(weight * is_masked.sum(1), torch.full((n,), 4.0, dtype=torch.float64))
        levels.append(is_masked.sum(1))
    assert all(sorted(row) == [1, 2, 3, 4] for row in torch.stack(levels, 1).tolist())
    assert len({tuple(row) for row in torch.stack(levels, 1).tolist()}) > 1  # strata are permuted


def test_a_level_rounded_up_to_one_masks_every_scoreable_position():
    maskable = torch.tensor([[True, True, False, True]])
    is_masked, weight = _mask_exactly(torch.rand(1, 4, dtype=torch.float64), torch.ones(1).double(), maskable)
    assert torch.equal(is_masked, maskable) and weight.tolist() == [1.0]


def test_a_row_without_scoreable_positions_contributes_nothing():
    tokens, maskable = torch.zeros(2, 3, dtype=torch.int64), torch.tensor([[True] * 3, [False] * 3])
    for method in ("stratified", "uniform", "antithetic_t"):
        _, is_masked, weight = eval_masks(
            tokens, torch.tensor([0, 1]), seed=0, draw=0, num_draws=2, mask_id=9, method=method,
            maskable=maskable,
        )  # fmt: skip
        sums, counts = nll_sum(torch.ones(int(is_masked.sum())), is_masked, weight, maskable)
        assert not is_masked[1].any() and float(sums[1]) == 0.0 and counts.tolist() == [3, 0]


@pytest.mark.parametrize("method", ["stratified", "uniform", "antithetic_t"])
def test_draws_depend_on_seed_index_and_draw_only(method):
    tokens = torch.arange(6 * 64).reshape(6, 64) % 50
    indices = torch.tensor([11, 4, 7, 30, 2, 9])
    kw = dict(mask_id=99, method=method, num_draws=8)
    full = eval_masks(tokens, indices, seed=5, draw=3, **kw)
    again = eval_masks(tokens, indices, seed=5, draw=3, **kw)
    assert all(torch.equal(a, b) for a, b in zip(full, again, strict=True))
    for rows in ([2], [4, 0], [5, 3, 1]):  # other batch sizes and positions
        part = eval_masks(tokens[rows], indices[rows], seed=5, draw=3, **kw)
        assert all(torch.equal(a, b[rows]) for a, b in zip(part, full, strict=True))
    assert not torch.equal(eval_masks(tokens, indices, seed=6, draw=3, **kw)[1], full[1])
    assert not torch.equal(eval_masks(tokens, indices, seed=5, draw=4, **kw)[1], full[1])


def test_rejects_bad_arguments():
    tokens, indices = torch.zeros(1, 4, dtype=torch.int64), torch.tensor([0])
    with pytest.raises(ValueError, match="method"):
        eval_masks(tokens, indices, seed=0, draw=0, num_draws=1, mask_id=9, method="bogus")
    with pytest.raises(ValueError, match="range"):
        eval_masks(tokens, indices, seed=0, draw=2, num_draws=2, mask_id=9)
    _, is_masked, weight = eval_masks(tokens, indices, seed=0, draw=0, num_draws=1, mask_id=9)
    with pytest.raises(ValueError, match="cross entropies"):
        nll_sum(torch.ones(int(is_masked.sum()) + 1), is_masked, weight)


# ---------------------------------------------------------------------------
# nll_sum, sample_stats, combine, bits_per_byte
# ---------------------------------------------------------------------------


def test_nll_sum_weights_each_row_and_counts_scoreable_tokens():
    is_masked = torch.tensor([[True, False, True], [False, True, False]])
    maskable = torch.tensor([[True, True, True], [False, True, True]])
    sums, counts = nll_sum(torch.tensor([1.0, 2.0, 4.0]), is_masked, torch.tensor([1.5, 2.0]), maskable)
    assert sums.tolist() == [4.5, 8.0] and counts.tolist() == [3, 2]


def test_combine_with_equal_lengths_is_the_standard_error_of_per_token_values():
    y = torch.tensor([[10.0, 12.0, 9.0, 15.0], [11.0, 13.0, 9.0, 14.0]])  # [D=2, B=4]
    per_token, se = combine(sample_stats(y, torch.full((4,), 5)))
    per_sample = y.double().mean(0) / 5
    assert float(per_token) == pytest.approx(float(per_sample.mean()), rel=1e-12)
    assert float(se) == pytest.approx(float(per_sample.std() / 2), rel=1e-12)


def test_combine_is_additive_over_ranks_and_matches_a_jackknife_with_unequal_lengths():
    g = torch.Generator().manual_seed(4)
    counts = torch.randint(1, 50, (400,), generator=g)
    y = counts * (2.0 + 0.3 * torch.randn(400, generator=g, dtype=torch.float64))
    stats = sample_stats(y, counts)
    ranks = sum(sample_stats(y[r::3], counts[r::3]) for r in range(3))
    assert torch.allclose(ranks, stats, rtol=1e-12)
    ratio, se = combine(stats)
    leave_one_out = (y.sum() - y) / (counts.sum() - counts)
    jackknife = math.sqrt((len(y) - 1) / len(y) * float(((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    assert float(se) == pytest.approx(jackknife, rel=0.02)
    assert math.isnan(float(combine(sample_stats(y[:1], counts[:1]))[1]))


def test_bits_per_byte():
    assert bits_per_byte(math.log(2.0) * 300, 100) == pytest.approx(3.0)
    assert float(bits_per_byte(torch.tensor(math.log(2.0)), torch.tensor(4))) == pytest.approx(0.25)


# ---------------------------------------------------------------------------
# Device discipline
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["stratified", "uniform", "antithetic_t"])
def test_runs_on_the_meta_device(method):
    meta = torch.device("meta")
    tokens = torch.zeros(3, 8, dtype=torch.int64, device=meta)
    maskable = torch.ones(3, 8, dtype=torch.bool, device=meta)
    noisy, is_masked, weight = eval_masks(
        tokens, torch.tensor([0, 5, 9]), seed=0, draw=1, num_draws=2, mask_id=9, method=method,
        maskable=maskable,
    )  # fmt: skip
    sums, counts = nll_sum(torch.empty(7, device=meta), is_masked, weight, maskable)
    stats = sample_stats(sums[None], counts)
    outputs = (noisy, is_masked, weight, sums, counts, stats, *combine(stats))
    assert all(t.device == meta for t in outputs)
