"""A Monte Carlo upper bound on the per-token NLL of a masked diffusion LM (evaluation).

For a sample x with L scoreable ("maskable") positions, masked diffusion (LLaDA, MDLM)
bounds the negative log-likelihood by

    NLL(x) <= B(x) = sum_{l=1..L} (1/l) E_{M uniform, |M|=l} [ S(M) ],
    S(M)   = sum_{i in M} -log p(x_i | x with the positions M masked),

i.e. B(x) = E_{l ~ U{1..L}} E_M [ (L/l) S(M) ]; per token, B(x) / L. B(x) is also the
any-order autoregressive NLL averaged over uniformly random orders (l masked positions
left, the next one revealed is uniform among them), so it is exactly -log p(x) for a model
whose conditionals are those of one joint p, and in general >= the NLL of the sampler that
unmasks one uniformly chosen position at a time (Jensen over the orders).

One call of `eval_masks` makes one draw d of num_draws for each sample of a batch:

- 'stratified' (LLaDA's get_log_likelihood): the draws of a sample split [0, 1) into
  num_draws strata, draw d getting v_d = (u + pi(d)) / num_draws, one u ~ U(0, 1) and one
  permutation pi of range(num_draws) per sample; l_d = 1 + floor(v_d L) positions are
  masked, chosen uniformly, weight L / l_d. Averaged over the draws the estimate is
  unbiased (v over the strata is uniform on [0, 1), so l is uniform on 1..L); with pi each
  draw on its own is also unbiased (v_d marginally uniform), so a per-draw figure or a
  prefix of the draws means something, and every draw mixes small and large l across the
  batch (balanced work when logits are computed at masked positions only).
- 'uniform': l ~ U{1..L} independently per draw (same weight): the plain estimator.
- 'antithetic_t': the continuous-time ELBO. t_d = eps + (1 - eps) v_d with v_d
  stratified as above, each position masked independently with probability t_d, weight
  1/t_d. Given t, |M| ~ Binomial(L, t) and M is uniform given |M|, and
  int_0^1 (1/t) C(L,l) t^l (1-t)^(L-l) dt = C(L,l) B(l, L-l+1) = 1/l, so with eps = 0 its
  expectation is exactly B(x). But the variance of a draw is then infinite (one masked
  token at t -> 0 contributes ~ CE^2 L t / t^2, which is not integrable), hence eps > 0
  (LLaDA's 1e-3) by default: the expectation is then
  (1/(1-eps)) int_eps^1 (1/t) E[S | t] dt, which differs from B(x) by O(eps) and is not
  guaranteed to be an upper bound.

`nll_sum` turns per-masked-token cross entropies into per-sample weighted sums; the
sums of the draws of a sample, averaged, estimate B(x). `sample_stats` condenses a batch
into a 6-vector that data-parallel ranks all-reduce (sum), and `combine` turns it into the
per-token bound and its standard error.

Every tensor created here follows the device of the inputs; the noise is drawn by host
(CPU) generators keyed by (seed, global sample index[, draw]) and moved to the tokens'
device, so the masks of a sample do not depend on the batch it is in, the device or the
layout.
"""

from __future__ import annotations

import math

import torch

from pretrain.objective import mix_seed

METHODS = ("stratified", "uniform", "antithetic_t")

_STREAM_OFFSET = 0xE0F5  # u of a sample, shared by its draws ('stratified', 'antithetic_t')
_STREAM_STRATA = 0xE57A  # the permutation pi of a sample's strata
_STREAM_LEVEL = 0xE1E7  # v of one draw ('uniform')
_STREAM_POSITIONS = 0xE905  # which positions one draw masks


def _host_uniform(n: int, *key: int) -> torch.Tensor:
    """n float64 draws in [0, 1) from a host generator seeded by mix_seed(*key)."""
    g = torch.Generator().manual_seed(mix_seed(*key))
    return torch.rand(n, generator=g, dtype=torch.float64, device="cpu")


def _stratum(seed: int, index: int, draw: int, num_draws: int) -> int:
    """pi(draw): the stratum that draw `draw` of sample `index` covers."""
    g = torch.Generator().manual_seed(mix_seed(seed, _STREAM_STRATA, index))
    return int(torch.randperm(num_draws, generator=g, device="cpu")[draw])


def _level(seed: int, index: int, draw: int, num_draws: int, method: str) -> float:
    """v in [0, 1) of one draw of one sample: l = 1 + floor(v L), or t = eps + (1-eps) v."""
    if method == "uniform":
        return float(_host_uniform(1, seed, _STREAM_LEVEL, index, draw)[0])
    u = float(_host_uniform(1, seed, _STREAM_OFFSET, index)[0])
    return (u + _stratum(seed, index, draw, num_draws)) / num_draws


def _mask_exactly(u: torch.Tensor, v: torch.Tensor, maskable: torch.Tensor):
    """Mask exactly l_b = 1 + floor(v_b L_b) of the L_b maskable positions of row b (the
    l_b with the smallest u, a uniform subset); weight L_b / l_b (0 for L_b = 0). l_b is
    clamped to L_b: float rounding can make (u + k) / D or v L_b reach the upper end."""
    scoreable = maskable.sum(1)
    level = torch.minimum(1 + torch.floor(v * scoreable).to(torch.int64), scoreable)
    rank = torch.where(maskable, u, 2.0).argsort(1).argsort(1)
    weight = torch.where(level > 0, scoreable.to(torch.float64) / level.clamp(min=1), 0.0)
    return rank < level[:, None], weight


def _mask_bernoulli(u: torch.Tensor, v: torch.Tensor, maskable: torch.Tensor, eps: float):
    """Mask each maskable position of row b with probability t_b = eps + (1-eps) v_b;
    weight 1/t_b (0 where t_b = 0, which only eps = 0 allows and then masks nothing)."""
    t = eps + (1.0 - eps) * v
    weight = torch.where(t > 0, 1.0 / t, 0.0)
    return (u < t[:, None]) & maskable, weight


def _check(method: str, draw: int, num_draws: int, eps: float) -> None:
    if method not in METHODS:
        raise ValueError(f"likelihood method {method!r} is not one of {METHODS}")
    if not 0 <= draw < num_draws:
        raise ValueError(f"draw {draw} is not in range(num_draws={num_draws})")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps {eps} is not in [0, 1)")


def eval_masks(
    tokens: torch.Tensor,
    indices: torch.Tensor,
    *,
    seed: int,
    draw: int,
    num_draws: int,
    mask_id: int,
    method: str = "stratified",
    maskable: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `draw` (of num_draws) of the likelihood estimator for each sample of a batch.

    tokens [B, L] int; indices [B] global sample indices (host values are read); maskable
    [B, L] bool marks the scoreable positions (default: all; exclude padding, a prompt,
    position 0 under a logit shift), L_b = maskable[b].sum(). Returns (noisy tokens [B, L],
    is_masked [B, L] bool, weight [B] float64) with weight = L_b / l_b for 'stratified' and
    'uniform' (l_b = number masked) and 1/t_b for 'antithetic_t' (`eps` is used by that
    method only). weight_b * sum_{masked} CE is then an estimate of the sample's bound B(x)
    (in nats, not per token), unbiased for the first two methods, see the module doc.
    """
    _check(method, draw, num_draws, eps)
    B, L = tokens.shape
    if maskable is None:
        maskable = torch.ones_like(tokens, dtype=torch.bool)
    idx = [int(i) for i in indices.tolist()]
    levels = [_level(seed, i, draw, num_draws, method) for i in idx]
    v = torch.tensor(levels, dtype=torch.float64, device="cpu")  # host draws, moved below
    u = [_host_uniform(L, seed, _STREAM_POSITIONS, i, draw) for i in idx]
    u = torch.stack(u) if idx else torch.empty(0, L, dtype=torch.float64, device="cpu")
    v, u = v.to(tokens.device), u.to(tokens.device)
    if method == "antithetic_t":
        is_masked, weight = _mask_bernoulli(u, v, maskable, eps)
    else:
        is_masked, weight = _mask_exactly(u, v, maskable)
    noisy = torch.where(is_masked, torch.full_like(tokens, mask_id), tokens)
    return noisy, is_masked, weight


def nll_sum(
    ce_masked: torch.Tensor,
    is_masked: torch.Tensor,
    weight: torch.Tensor,
    maskable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample weighted sum [B] float64, per-sample token count [B] int64) of one draw.

    ce_masked [n]: -log p(x_i | x_noisy) at the n masked positions in row-major order of
    is_masked [B, L]; weight [B] from `eval_masks`. sum_b = weight_b * sum_{i masked in b}
    CE_i estimates the sample's bound B(x_b) in nats; count_b = L_b, its maskable tokens
    (pass the `maskable` given to eval_masks). sum.sum() / count.sum() is the batch's
    per-token estimate for this draw; `sample_stats` averages the draws per sample.
    (The length check is skipped on the meta device, where it cannot be evaluated.)
    """
    if not is_masked.is_meta and ce_masked.numel() != int(is_masked.sum()):
        raise ValueError(f"{ce_masked.numel()} cross entropies for {int(is_masked.sum())} masked positions")
    ce = torch.zeros(is_masked.shape, dtype=torch.float64, device=is_masked.device)
    ce = ce.masked_scatter(is_masked, ce_masked.reshape(-1).to(torch.float64))
    scored = maskable if maskable is not None else torch.ones_like(is_masked)
    return ce.sum(1) * weight.to(torch.float64), scored.sum(1)


def sample_stats(draw_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The additive statistics of a batch, a float64 vector to all-reduce (sum) over ranks.

    draw_sums [D, B] (or [B] for D = 1): `nll_sum` sums of draws 0..D-1 of each sample;
    counts [B]: L_b. With Y_b = the mean over the draws (the sample's estimate of B(x_b))
    and samples with L_b = 0 left out, returns
    [sum Y_b, sum Y_b^2, sum L_b, n, sum Y_b L_b, sum L_b^2]. The two last entries let
    `combine` give the standard error of a ratio when the L_b differ.
    """
    y = draw_sums.reshape(-1, draw_sums.shape[-1]).to(torch.float64).mean(0)
    n_tokens = counts.to(torch.float64)
    keep = (n_tokens > 0).to(torch.float64)
    y, n_tokens = y * keep, n_tokens * keep
    parts = (y, y * y, n_tokens, keep, y * n_tokens, n_tokens * n_tokens)
    return torch.stack([p.sum() for p in parts])


def combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token bound R, its standard error) from summed `sample_stats` vectors.

    R = sum Y_b / sum L_b: total estimated nats over total tokens (the corpus per-token
    NLL bound; exp(R) bounds the perplexity). The standard error is the delta-method one
    of a ratio over n independent samples,
        se = sqrt( sum_b (Y_b - R L_b)^2 / (n (n-1)) ) / mean(L_b),
    which for equal L_b is std(Y_b / L_b) / sqrt(n). Since Y_b is the draw-averaged
    estimate of one sample, its spread across samples holds both the data variance and the
    Monte Carlo variance (divided by D, reduced by stratification): se measures how well R
    estimates the per-token bound of the data distribution, not the Monte Carlo error
    around the exact bound of this fixed evaluation set (which is smaller). nan for n < 2.
    """
    sum_y, sum_yy, sum_l, n, sum_yl, sum_ll = stats.to(torch.float64).unbind()
    ratio = sum_y / sum_l
    residual_ss = (sum_yy - 2 * ratio * sum_yl + ratio * ratio * sum_ll).clamp(min=0)
    variance = residual_ss / (n * (n - 1))
    stderr = torch.where(n > 1, variance.sqrt() / (sum_l / n), math.nan)
    return ratio, stderr


def bits_per_byte(nll_sum_nats, num_bytes):
    """Bits per UTF-8 byte, nll_sum_nats / (ln 2 * num_bytes): tokenizer-independent.

    nll_sum_nats: total nats over the scored tokens (R * sum L_b, i.e. stats[0]);
    num_bytes: the bytes of the text those tokens decode to. Floats or tensors
    (element-wise; a standard error in nats converts the same way).
    """
    return nll_sum_nats / (math.log(2.0) * num_bytes)
