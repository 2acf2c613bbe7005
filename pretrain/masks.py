"""Attention masks for block diffusion and causal-to-bidirectional annealing, as pure
functions (no config, no communication).

Every mask follows megatron's convention, the one of `parallel.model.document_attention_mask`:
a bool tensor [b, 1, q, k], True where query q may NOT attend to key k (the scores there are
filled with a large negative value before the softmax); False = allowed link.

- `block_diffusion_mask`: BD3-LM's mask over the concatenation [x_t, x0] (length 2L):
  block-diagonal within the noisy copy, offset block-causal from noisy to clean, block-causal
  within the clean copy; the clean copy never sees the noisy one.
- `block_causal_mask`: the block-causal mask on one copy (block size 1 = causal,
  block size L = bidirectional): the attention of LLaDA2.0's block-size warmup/decay.
- `annealed_causal_mask`: DiffuLLaMA's attention-mask annealing, causal links plus each
  non-causal link with probability `ratio`.

Blocks are counted from the start of the packed sample (p // block_size), not from the
start of each document; `segments` (document numbers, [b, L]) only cut links between
documents. Every position may always attend to itself, so no row is fully blocked.

Outputs are on `device` (default: the device of `segments`, else CPU). The random links
are drawn by host (CPU) generators keyed by (seed, global sample index), then moved to the
device, so every rank, layout and device draws the same mask for the same sample.
"""

from __future__ import annotations

import torch

from pretrain.objective import mix_seed

_STREAM_ATTN = 0xA77E

Device = torch.device | str | None


def block_diffusion_mask(
    segments: torch.Tensor | None,
    block_size: int,
    *,
    length: int,
    device: Device = None,
    shift: bool = False,
    clean_causal: bool = False,
) -> torch.Tensor:
    """BD3-LM mask for the input [x_t, x0]: positions [0, L) the noisy copy, [L, 2L) the clean
    copy, block of a position p within its copy = p // block_size (the last block may be short).
    `shift` (a logit shift: position p predicts token p+1): the block of p is that of the
    token it predicts, (p + 1) // block_size, so block k's queries are positions
    k*bs - 1 .. k*bs + bs - 2 (see pretrain/objective.py, block_diffusion_inputs); a block
    of the whole length is one block either way (the noisy copy sees all of itself).
    `clean_causal`: the clean copy attends causally (k <= q) instead of block-causally, so
    that its logits are next-token predictions (the hybrid AR + diffusion loss).

    Allowed (False) links: noisy q -> noisy k iff same block; noisy q -> clean k iff
    block(k) < block(q); clean q -> clean k iff block(k) <= block(q); clean q -> noisy k
    never. With `segments` [b, L] (the same documents in both copies) also segment(q) ==
    segment(k). Returns bool [b, 1, 2L, 2L] (True = blocked), or [1, 1, 2L, 2L] (broadcast
    over the batch) when `segments` is None."""
    segments, device = _resolve(segments, length, device)
    _check_block_size(block_size)
    blocks = _block_ids(length, block_size, device, shift=shift).repeat(2)
    clean = torch.arange(2 * length, device=device) >= length
    bq, bk, cq, ck = blocks[:, None], blocks[None, :], clean[:, None], clean[None, :]
    noisy_to_noisy = ~cq & ~ck & (bk == bq)
    noisy_to_clean = ~cq & ck & (bk < bq)
    positions = torch.arange(2 * length, device=device)
    before = positions[None, :] <= positions[:, None] if clean_causal else bk <= bq
    clean_to_clean = cq & ck & before
    blocked = ~(noisy_to_noisy | noisy_to_clean | clean_to_clean)
    if segments is None:
        return blocked[None, None]
    return blocked | _document_blocked(segments.repeat(1, 2))


def block_causal_mask(
    segments: torch.Tensor | None, block_size: int, *, length: int, device: Device = None
) -> torch.Tensor:
    """Block-causal mask on one sequence: q may attend to k iff k // block_size <=
    q // block_size (and, with `segments` [b, L], both are in the same document).
    block_size 1 is the causal mask, block_size >= L the bidirectional one. Returns bool
    [b, 1, L, L] (True = blocked), or [1, 1, L, L] when `segments` is None."""
    segments, device = _resolve(segments, length, device)
    _check_block_size(block_size)
    blocks = _block_ids(length, block_size, device)
    blocked = blocks[None, :] > blocks[:, None]
    if segments is None:
        return blocked[None, None]
    return blocked | _document_blocked(segments)


def annealed_causal_mask(
    indices: torch.Tensor,
    *,
    seed: int,
    ratio: float,
    length: int,
    segments: torch.Tensor | None = None,
    device: Device = None,
) -> torch.Tensor:
    """DiffuLLaMA's attention-mask annealing: q may attend to k if k <= q (causal), and
    each non-causal link (k > q) independently with probability `ratio` (0: causal;
    >= 1: bidirectional); with `segments` [b, L] only within a document.

    `indices` [b] are global sample indices, readable on the host. A sample's links come
    from one uniform u[q, k] per link, drawn from (seed, its index) alone, allowed when
    u < ratio: the same sample gets the same mask in any batch, and raising the ratio only
    adds links. Returns bool [b, 1, L, L] (True = blocked); without `segments` and with
    ratio <= 0 or >= 1 it is a broadcast view of one [L, L] pattern (no per-sample storage)."""
    segments, device = _resolve(segments, length, device)
    idx = [int(i) for i in indices.tolist()]
    if segments is not None and segments.shape[0] != len(idx):
        raise ValueError(f"{len(idx)} sample indices for {segments.shape[0]} rows of segments")
    causal_blocked = block_causal_mask(None, 1, length=length, device=device)[0, 0]
    if ratio <= 0:
        blocked = causal_blocked.expand(len(idx), 1, length, length)
    elif ratio >= 1:
        blocked = torch.zeros((1, 1, length, length), dtype=torch.bool, device=device)
        blocked = blocked.expand(len(idx), 1, length, length)
    else:
        extra = torch.stack([_random_links(seed, i, length, ratio) for i in idx]).to(device)
        blocked = (causal_blocked & ~extra)[:, None]
    if segments is None:
        return blocked
    return blocked | _document_blocked(segments)


def mask_density(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of allowed links (False entries) of a megatron-convention mask, as a 0-dim
    float32 tensor on the mask's device (no host sync; `.item()` it for logging). A
    broadcast [1, 1, q, k] mask gives the density of its one pattern."""
    blocked = torch.count_nonzero(mask).to(torch.float32)
    return 1.0 - blocked / mask.numel()


def _random_links(seed: int, index: int, length: int, ratio: float) -> torch.Tensor:
    """[L, L] bool on the host: u[q, k] < ratio with u drawn from (seed, index) alone."""
    g = torch.Generator().manual_seed(mix_seed(seed, _STREAM_ATTN, index))
    u = torch.rand((length, length), generator=g, dtype=torch.float32, device="cpu")
    return u < ratio


def _document_blocked(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] document numbers -> [b, 1, s, s] bool, True across documents (as
    parallel.model.document_attention_mask, without importing megatron)."""
    return segments[:, None, :, None] != segments[:, None, None, :]


def _block_ids(length: int, block_size: int, device: Device, shift: bool = False) -> torch.Tensor:
    if block_size >= length:  # one block: no window to shift
        return torch.zeros(length, dtype=torch.long, device=device)
    return (torch.arange(length, device=device) + int(shift)) // block_size


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _resolve(
    segments: torch.Tensor | None, length: int, device: Device
) -> tuple[torch.Tensor | None, torch.device]:
    """(segments on the output device, the output device): `device` if given, else the
    device of `segments`, else CPU; `segments` must be [b, length]."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if segments is None:
        return None, torch.device(device or "cpu")
    if segments.dim() != 2 or segments.shape[1] != length:
        raise ValueError(f"segments of shape {tuple(segments.shape)}, expected [b, {length}]")
    device = torch.device(device) if device is not None else segments.device
    return segments.to(device), device
