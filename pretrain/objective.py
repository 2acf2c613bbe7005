"""The masked-diffusion objective as pure functions (no config, no communication).

Forward process (LLaDA, MDLM): a sample x0 gets a masking level t in [t_min, t_max]
(the curriculum's band; LLaDA: [1e-3, 1]) and each token is replaced by MASK
independently with probability t. The model sees
x_t and predicts x0 at the masked positions; the loss is

    sum_{i masked} w(t) * CE_i / N

with w(t) = (t_max - t_min)/t ('elbo', the ELBO weight of the log-linear schedule,
times the band's width so that the sum estimates the band's part of the ELBO) or 1
('uniform'), and N = number of tokens B*L ('tokens', LLaDA) or number of masked
tokens ('masked'). `diffusion_loss` returns the sum and N separately so that the
trainer can normalise over the whole global batch.

Only 'elbo' with 'tokens' is the (negative) ELBO, an unbiased estimate of a bound on the
per-token NLL. Dividing by the masked count instead ('masked') makes a ratio
estimator, sum(w CE) / #masked: biased, and not a bound, whatever the weighting
(MDLM-style runs use it for a steadier loss scale).

Every tensor created here follows the device of the inputs it is combined with; the
noise is drawn by host (CPU) generators keyed by the sample and moved to the tokens'
device, so a GPU run draws the same masks as a CPU run.

Noise is a function of (seed, global sample index) only: each sample gets its own
counter-based generator, so every tensor/pipeline rank and every layout draws
the same t and the same mask for the same sample.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

T_SAMPLING = ("uniform", "stratified")
WEIGHTINGS = ("elbo", "uniform")
NORMALIZATIONS = ("tokens", "masked")

_STREAM_T = 0x7A11
_STREAM_MASK = 0x3A5C
_STREAM_STRATA = 0x57A7
_STREAM_NOISE = 0x2015E
_STREAM_BLOCK_T = 0xB10C
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over each part)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _uniform(seed: int, stream: int, index: int, n: int) -> torch.Tensor:
    """Host-side draws (a CPU generator keyed by the sample, so every device and layout
    draws the same numbers); callers move the result to their tensors' device."""
    g = torch.Generator().manual_seed(mix_seed(seed, stream, index))
    return torch.rand(n, generator=g, dtype=torch.float64, device="cpu")


def _stratified_u(seed: int, index: int, size: int) -> torch.Tensor:
    """u of global sample `index`: its batch's offset + its stratum / size, mod 1."""
    batch, position = divmod(index, size)
    return (_uniform(seed, _STREAM_T, batch, 1)[0] + _strata(seed, batch, size)[position] / size) % 1.0


@lru_cache(maxsize=64)
def _strata(seed: int, batch: int, size: int) -> tuple[int, ...]:
    """Which stratum each sample of global batch `batch` gets: a permutation of
    range(size) from (seed, batch), so a data-parallel rank's contiguous share of the
    batch holds strata from all over [0, 1), not one band."""
    g = torch.Generator().manual_seed(mix_seed(seed, _STREAM_STRATA, batch))
    return tuple(torch.randperm(size, generator=g, device="cpu").tolist())


def sample_t(
    indices: torch.Tensor,
    *,
    seed: int,
    method: str = "uniform",
    t_min: float = 1e-3,
    t_max: float = 1.0,
    global_batch_size: int | None = None,
    complementary: bool = False,
) -> torch.Tensor:
    """Masking level t in [t_min, t_max) for each global sample index ([b] -> [b] float32).

    'uniform': t = t_min + (t_max - t_min) u with u ~ U(0, 1) per sample (LLaDA).
    'stratified': antithetic over the global batch (MDLM): sample k of global batch s
    gets u = (u_s + pi_s(k) / B) mod 1, one u_s per batch and pi_s a permutation of
    range(B) from (seed, s), so each global batch covers [0, 1) evenly and every
    data-parallel share of it draws strata from the whole range (with masked-only
    logits the work per rank grows with t: contiguous strata would make one rank the
    slowest every step). Both depend on the global index only, not on the layout.
    `complementary`: rows come in pairs (2k, 2k+1); the second gets 1 - t of the first
    (it is masked where the first is not, see mask_tokens)."""
    if method not in T_SAMPLING:
        raise ValueError(f"t sampling {method!r} is not one of {T_SAMPLING}")
    base = _pair_base(indices) if complementary else indices
    idx = [int(i) for i in base.tolist()]
    if method == "uniform":
        u = torch.cat([_uniform(seed, _STREAM_T, i, 1) for i in idx])
    else:
        if not global_batch_size:
            raise ValueError("stratified t sampling needs global_batch_size")
        u = torch.stack([_stratified_u(seed, i, global_batch_size) for i in idx])
    t = t_min + (t_max - t_min) * u
    if complementary:
        t = torch.where(_is_second_of_pair(indices), 1.0 - t, t)
    return t.float()


def block_t(
    indices: torch.Tensor,
    *,
    seed: int,
    block_size: int,
    length: int,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    complementary: bool = False,
) -> torch.Tensor:
    """[B, L] masking levels for block diffusion (BD3-LM): one t ~ U[t_min, t_max) per block
    of `block_size` tokens (the last block may be shorter), token j getting the t of block
    j // block_size; drawn from (seed, global sample index). `complementary`: the second
    row of a pair gets 1 - t of the first, block by block (as sample_t)."""
    base = _pair_base(indices) if complementary else indices
    num_blocks = -(-length // block_size)
    u = [_uniform(seed, _STREAM_BLOCK_T, int(i), num_blocks) for i in base.tolist()]
    t = t_min + (t_max - t_min) * torch.stack(u)
    if complementary:
        t = torch.where(_is_second_of_pair(indices)[:, None], 1.0 - t, t)
    return t.repeat_interleave(block_size, dim=1)[:, :length].float()


def block_diffusion_inputs(noisy: torch.Tensor, tokens: torch.Tensor, *, block_size: int, shift: bool):
    """The model input of block diffusion: [x_t, x0] ([B, 2L]), the noisy copy first. Under
    a logit shift block k is predicted from positions k*bs - 1 .. k*bs + bs - 2 (each
    predicts the next token), so the first of them holds its clean token: the last token
    of block k-1, which block k is conditioned on. With block size 1 the noisy copy is
    then the clean sequence and block diffusion is next-token prediction. A block of the
    whole sequence is plain masked diffusion on the noisy copy."""
    if shift and block_size < tokens.shape[1]:
        window_start = (torch.arange(tokens.shape[1], device=tokens.device) + 1) % block_size == 0
        noisy = torch.where(window_start, tokens, noisy)
    return torch.cat([noisy, tokens], dim=1)


def next_token_positions(shape: tuple[int, int], device=None) -> torch.Tensor:
    """[B, L] bool: the positions of the clean copy that predict a next token (all but the
    last), for the autoregressive part of the hybrid loss."""
    positions = torch.ones(shape, dtype=torch.bool, device=device)
    positions[:, -1] = False
    return positions


def _pair_base(indices: torch.Tensor) -> torch.Tensor:
    """The first index of each row's complementary pair (2k for rows 2k and 2k+1)."""
    return indices - indices % 2


def _is_second_of_pair(indices: torch.Tensor) -> torch.Tensor:
    return (indices % 2).bool()


def _complement_pairs(is_masked: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each second row of a pair takes the complement of the first row's mask (exactly:
    not a fresh draw at 1 - t). Pairs must be adjacent rows of the batch."""
    firsts, seconds = indices[0::2], indices[1::2]
    if len(indices) % 2 or bool((firsts % 2).any()) or bool((seconds - firsts != 1).any()):
        raise ValueError("complementary masking needs whole pairs (2k, 2k+1) in adjacent rows")
    first = is_masked[0::2]
    return torch.stack([first, ~first], dim=1).reshape(is_masked.shape)


def mask_tokens(
    tokens: torch.Tensor,
    t: torch.Tensor,
    indices: torch.Tensor,
    *,
    seed: int,
    mask_id: int,
    maskable: torch.Tensor | None = None,
    complementary: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token of sample b independently with probability t[b].

    tokens [B, L] int, t [B] (or [B, L]: a level per token, block_t), indices [B] global
    sample indices. `maskable` [B, L]
    bool excludes positions (e.g. padding, a prompt). `complementary`: row 2k+1 (which
    holds the same sample as row 2k) is masked exactly where row 2k is not, its t being
    1 - t of row 2k (sample_t). Returns (x_t, is_masked)."""
    L = tokens.shape[1]
    u = torch.stack([_uniform(seed, _STREAM_MASK, int(i), L) for i in indices.tolist()])
    level = t.to(torch.float64).to(tokens.device)
    is_masked = u.to(tokens.device) < (level[:, None] if level.dim() == 1 else level)
    if complementary:
        is_masked = _complement_pairs(is_masked, indices)
    if maskable is not None:
        is_masked &= maskable
    noisy = torch.where(is_masked, torch.full_like(tokens, mask_id), tokens)
    return noisy, is_masked


def mask_embedding_noise(
    is_masked: torch.Tensor, indices: torch.Tensor, *, seed: int, std: float, hidden_size: int
) -> torch.Tensor:
    """[B, L, hidden] Gaussian noise of std `std` at masked positions, zero elsewhere, to
    add to the MASK token's input embedding (LLaDA2.0). Drawn on the tokens' device by a
    generator keyed by (seed, sample index), so every tensor-parallel rank and layout adds
    the same noise to the same sample (on one device type)."""
    rows = []
    for row, index in zip(is_masked, indices.tolist(), strict=True):
        generator = torch.Generator(device=is_masked.device).manual_seed(mix_seed(seed, _STREAM_NOISE, index))
        rows.append(torch.randn(row.shape[0], hidden_size, generator=generator, device=is_masked.device))
    return torch.stack(rows) * std * is_masked.unsqueeze(-1)


def logit_positions(is_masked: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """[B, L] bool: the positions whose logits predict the masked tokens, in the same
    row-major order. Without a shift, the masked positions themselves. With a logit
    shift (DiffuLLaMA/Dream: position i predicts token i+1, as in the AR model a DLM was
    initialised from), the positions just before them; position 0 then has no
    predictor and must not be masked (`shift_maskable`)."""
    if not shift:
        return is_masked
    if is_masked[:, 0].any():
        raise ValueError("with a logit shift, position 0 cannot be masked (nothing predicts it)")
    positions = torch.zeros_like(is_masked)
    positions[:, :-1] = is_masked[:, 1:]
    return positions


def shift_maskable(shape: tuple[int, int], device=None) -> torch.Tensor:
    """[B, L] bool for mask_tokens(maskable=...) under a logit shift: all but position 0."""
    maskable = torch.ones(shape, dtype=torch.bool, device=device)
    maskable[:, 0] = False
    return maskable


def diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    is_masked: torch.Tensor,
    t: torch.Tensor,
    *,
    weighting: str = "elbo",
    normalization: str = "tokens",
    band: float = 1.0,
    valid: torch.Tensor | None = None,
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss sum, normaliser) for one batch; the loss is sum / normaliser.

    logits: [B, L, V] for every position, or [n, V] / [n, 1, V] for the n masked
    positions only (in row-major order of `is_masked`). targets, is_masked: [B, L];
    t: [B] (or [B, L], a level per token). `band` = t_max - t_min of the range t was
    drawn from: the ELBO weight is band / t, so the loss is the band's part of the ELBO
    integral (1/t alone would make it the band's average, which grows as the band
    narrows). `valid` [B, L] marks tokens that count (default: all).
    `cross_entropy(logits [n, V], targets [n]) -> [n]` defaults to torch's; pass a
    vocab-parallel one for tensor-parallel logits."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is not one of {NORMALIZATIONS}")
    if logits.dim() == 3 and logits.shape[:2] == targets.shape:
        logits = logits[is_masked]
    logits = logits.reshape(-1, logits.shape[-1])
    n = int(is_masked.sum())
    if logits.shape[0] != n:
        raise ValueError(f"{logits.shape[0]} logit rows for {n} masked positions")
    ce_fn = cross_entropy or (lambda lg, tg: F.cross_entropy(lg.float(), tg, reduction="none"))
    ce = ce_fn(logits, targets[is_masked])
    if weighting == "elbo":
        level = t[:, None].expand_as(targets) if t.dim() == 1 else t
        ce = ce * band / level[is_masked].to(ce.dtype)
    loss_sum = ce.sum()
    if normalization == "masked":
        count = is_masked.sum()
    else:
        count = valid.sum() if valid is not None else torch.tensor(targets.numel(), device=targets.device)
    return loss_sum, count.to(torch.int64).reshape(())
