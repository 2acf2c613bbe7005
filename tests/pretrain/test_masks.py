"""Attention masks (pretrain/masks.py): megatron convention, True = blocked.

Expected patterns are written out by hand as 0/1 "allowed" matrices (1 = may attend) or
computed here by explicit loops over (q, k) from the definitions (BD3-LM's three parts,
DiffuLLaMA's causal-or-random rule); statistical bounds from the binomial distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.masks import (
    annealed_causal_mask,
    block_causal_mask,
    block_diffusion_mask,
    mask_density,
)

META = torch.device("meta")


def _allowed(rows: list[str]) -> torch.Tensor:
    """Hand-written rows such as "1100 0000" -> [q, k] bool, True = allowed."""
    return torch.tensor([[c == "1" for c in row.replace(" ", "")] for row in rows])


def _blocked(rows: list[str]) -> torch.Tensor:
    return ~_allowed(rows)[None, None]


def _reference_block_diffusion(segments: list[int], block_size: int) -> torch.Tensor:
    """[2L, 2L] blocked, by a loop over the definition."""
    L = len(segments)
    out = torch.ones(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            bq, bk = (q % L) // block_size, (k % L) // block_size
            q_clean, k_clean = q >= L, k >= L
            if not q_clean and not k_clean:
                ok = bq == bk
            elif not q_clean:
                ok = bk < bq
            else:
                ok = k_clean and bk <= bq
            out[q, k] = not (ok and segments[q % L] == segments[k % L])
    return out


# ---------------------------------------------------------------------------
# block_diffusion_mask: hand-written patterns
# ---------------------------------------------------------------------------


def test_block_diffusion_L4_block2_by_hand():
    expected = _blocked(
        [  # noisy keys | clean keys
            "1100 0000",
            "1100 0000",
            "0011 1100",
            "0011 1100",
            "0000 1100",  # clean queries
            "0000 1100",
            "0000 1111",
            "0000 1111",
        ]
    )
    mask = block_diffusion_mask(None, 2, length=4)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 8, 8)
    assert torch.equal(mask, expected)


def test_block_diffusion_block_not_dividing_length_by_hand():
    # L=5, block_size=2: blocks 0,0,1,1,2 (the last one short).
    expected = _blocked(
        [
            "11000 00000",
            "11000 00000",
            "00110 11000",
            "00110 11000",
            "00001 11110",
            "00000 11000",
            "00000 11000",
            "00000 11110",
            "00000 11110",
            "00000 11111",
        ]
    )
    assert torch.equal(block_diffusion_mask(None, 2, length=5), expected)


def test_block_diffusion_with_documents_by_hand():
    # Documents 0,0,1,1,1 (the second one starts on a block boundary).
    expected = _blocked(
        [
            "11000 00000",
            "11000 00000",
            "00110 00000",
            "00110 00000",
            "00001 00110",
            "00000 11000",
            "00000 11000",
            "00000 00110",
            "00000 00110",
            "00000 00111",
        ]
    )
    segments = torch.tensor([[0, 0, 1, 1, 1]])
    mask = block_diffusion_mask(segments, 2, length=5)
    assert mask.shape == (1, 1, 10, 10)
    assert torch.equal(mask, expected)


def test_block_diffusion_document_straddling_a_block_by_hand():
    # Documents 0,0,0,1,1: block 1 (positions 2, 3) holds the end of one document and the
    # start of the next; blocks count from the sample start, documents only cut links.
    expected = _blocked(
        [
            "11000 00000",
            "11000 00000",
            "00100 11000",
            "00010 00000",
            "00001 00010",
            "00000 11000",
            "00000 11000",
            "00000 11100",
            "00000 00010",
            "00000 00011",
        ]
    )
    segments = torch.tensor([[0, 0, 0, 1, 1]])
    assert torch.equal(block_diffusion_mask(segments, 2, length=5), expected)


def test_block_size_one_is_autoregression():
    L = 6
    mask = block_diffusion_mask(None, 1, length=L)[0, 0]
    eye = torch.eye(L, dtype=torch.bool)
    strictly_lower = torch.ones(L, L, dtype=torch.bool).tril(-1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    # Noisy token i: only itself among noisy tokens, clean tokens < i.
    assert torch.equal(~mask[:L, :L], eye)
    assert torch.equal(~mask[:L, L:], strictly_lower)
    # Clean copy: exactly causal, and blind to the noisy copy.
    assert torch.equal(~mask[L:, L:], causal)
    assert mask[L:, :L].all()


@pytest.mark.parametrize("block_size", [5, 8])
def test_block_size_at_least_length_is_bidirectional(block_size):
    L = 5
    mask = block_diffusion_mask(None, block_size, length=L)[0, 0]
    assert not mask[:L, :L].any()  # noisy copy fully bidirectional
    assert mask[:L, L:].all()  # and sees no clean token
    assert not mask[L:, L:].any()  # clean copy fully bidirectional
    assert mask[L:, :L].all()


def test_block_diffusion_matches_loop_reference_on_random_documents():
    g = torch.Generator().manual_seed(0)
    L = 11
    for block_size in (1, 2, 3, 4, 11, 16):
        segments = torch.sort(torch.randint(0, 3, (3, L), generator=g), dim=1).values
        mask = block_diffusion_mask(segments, block_size, length=L)
        assert mask.shape == (3, 1, 2 * L, 2 * L)
        for b in range(3):
            expected = _reference_block_diffusion(segments[b].tolist(), block_size)
            assert torch.equal(mask[b, 0], expected), (block_size, b)


def test_block_diffusion_every_position_sees_itself():
    segments = torch.tensor([[0, 1, 1, 2, 2, 2, 3]])
    mask = block_diffusion_mask(segments, 3, length=7)[0, 0]
    assert not mask.diagonal().any()


def test_block_diffusion_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        block_diffusion_mask(None, 0, length=4)
    with pytest.raises(ValueError, match="segments"):
        block_diffusion_mask(torch.zeros(1, 3, dtype=torch.long), 2, length=4)


# ---------------------------------------------------------------------------
# block_causal_mask
# ---------------------------------------------------------------------------


def test_block_causal_by_hand():
    expected = _blocked(["11000", "11000", "11110", "11110", "11111"])
    assert torch.equal(block_causal_mask(None, 2, length=5), expected)


def test_block_causal_is_the_clean_copy_of_block_diffusion():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    for block_size in (1, 2, 3, 7):
        single = block_causal_mask(segments, block_size, length=7)
        both = block_diffusion_mask(segments, block_size, length=7)
        assert torch.equal(single, both[:, :, 7:, 7:])


def test_block_causal_extremes():
    L = 6
    causal = ~torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(block_causal_mask(None, 1, length=L)[0, 0], causal)
    assert not block_causal_mask(None, L, length=L).any()


# ---------------------------------------------------------------------------
# annealed_causal_mask
# ---------------------------------------------------------------------------


def _causal_blocked(L: int) -> torch.Tensor:
    return ~torch.ones(L, L, dtype=torch.bool).tril()


def test_annealed_ratio_zero_is_causal():
    L = 7
    mask = annealed_causal_mask(torch.arange(3), seed=1, ratio=0.0, length=L)
    assert mask.shape == (3, 1, L, L)
    assert torch.equal(mask, _causal_blocked(L).expand(3, 1, L, L))


@pytest.mark.parametrize("ratio", [1.0, 1.5])
def test_annealed_ratio_one_is_bidirectional(ratio):
    mask = annealed_causal_mask(torch.arange(2), seed=1, ratio=ratio, length=7)
    assert mask.shape == (2, 1, 7, 7)
    assert not mask.any()


def test_annealed_random_ratio_edges_agree_with_fast_paths():
    # The nested rule u < ratio with u in [0, 1) gives causal at 0 and all links at 1;
    # a ratio just inside (0, 1) must be close to them.
    L = 16
    near_zero = annealed_causal_mask(torch.arange(2), seed=4, ratio=1e-9, length=L)
    near_one = annealed_causal_mask(torch.arange(2), seed=4, ratio=1 - 1e-9, length=L)
    assert torch.equal(near_zero, _causal_blocked(L).expand(2, 1, L, L))
    assert not near_one.any()


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_annealed_always_allows_causal_links(ratio):
    L = 32
    mask = annealed_causal_mask(torch.arange(4), seed=2, ratio=ratio, length=L)
    lower = torch.ones(L, L, dtype=torch.bool).tril()
    assert not mask[:, :, lower].any()


def test_annealed_is_nested_in_ratio():
    indices = torch.tensor([0, 5, 123456789])
    masks = [annealed_causal_mask(indices, seed=3, ratio=r, length=48) for r in (0.0, 0.2, 0.5, 0.8, 1.0)]
    for low, high in zip(masks[:-1], masks[1:], strict=True):
        allowed_low, allowed_high = ~low, ~high
        assert not (allowed_low & ~allowed_high).any()  # low's links are a subset of high's
        assert (allowed_high & ~allowed_low).any()  # and high adds some


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.7])
def test_annealed_non_causal_density_matches_ratio(ratio):
    B, L = 2, 256
    mask = annealed_causal_mask(torch.arange(10, 10 + B), seed=7, ratio=ratio, length=L)
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    n = B * L * (L - 1) // 2
    density = (~mask[:, 0][:, upper]).sum().item() / n
    assert abs(density - ratio) < 5 * math.sqrt(ratio * (1 - ratio) / n)


def test_annealed_depends_only_on_seed_and_index():
    L = 20
    a = annealed_causal_mask(torch.tensor([3, 7]), seed=11, ratio=0.4, length=L)
    b = annealed_causal_mask(torch.tensor([7, 42, 3]), seed=11, ratio=0.4, length=L)
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])  # different samples, different links
    c = annealed_causal_mask(torch.tensor([3]), seed=12, ratio=0.4, length=L)
    assert not torch.equal(a[0], c[0])  # different seed, different links


def test_annealed_intersects_documents():
    L = 9
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9])
    indices = torch.tensor([4, 5])
    plain = annealed_causal_mask(indices, seed=5, ratio=0.5, length=L)
    with_docs = annealed_causal_mask(indices, seed=5, ratio=0.5, length=L, segments=segments)
    for b in range(2):
        for q in range(L):
            for k in range(L):
                same_doc = segments[b, q] == segments[b, k]
                assert with_docs[b, 0, q, k] == (plain[b, 0, q, k] or not same_doc)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_annealed_fast_paths_intersect_documents(ratio):
    segments = torch.tensor([[0, 0, 1, 1]])
    mask = annealed_causal_mask(torch.tensor([0]), seed=0, ratio=ratio, length=4, segments=segments)
    if ratio == 0.0:
        expected = _blocked(["1000", "1100", "0010", "0011"])
    else:
        expected = _blocked(["1100", "1100", "0011", "0011"])
    assert torch.equal(mask, expected)


def test_annealed_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="sample indices"):
        annealed_causal_mask(
            torch.arange(3), seed=0, ratio=0.5, length=4, segments=torch.zeros(2, 4, dtype=torch.long)
        )


# ---------------------------------------------------------------------------
# mask_density
# ---------------------------------------------------------------------------


def test_mask_density_counts_allowed_links():
    # L=4, block 2: allowed per row 2,2,4,4,2,2,4,4 -> 24 of 64.
    assert mask_density(block_diffusion_mask(None, 2, length=4)).item() == pytest.approx(24 / 64)
    assert mask_density(block_causal_mask(None, 1, length=4)).item() == pytest.approx(10 / 16)
    assert mask_density(torch.zeros(2, 1, 3, 3, dtype=torch.bool)).item() == 1.0
    density = mask_density(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    assert density.dim() == 0 and density.item() == 0.0


# ---------------------------------------------------------------------------
# Devices: everything is built on the device asked for (meta: no storage, no kernels)
# ---------------------------------------------------------------------------


def test_masks_follow_the_device():
    segments = torch.tensor([[0, 0, 1, 1, 1]], device=META)
    cases = [
        block_diffusion_mask(segments, 2, length=5),
        block_diffusion_mask(None, 2, length=5, device=META),
        block_causal_mask(segments, 2, length=5),
        block_causal_mask(None, 2, length=5, device=META),
        annealed_causal_mask(torch.tensor([0]), seed=0, ratio=0.5, length=5, segments=segments),
        annealed_causal_mask(torch.tensor([0]), seed=0, ratio=0.5, length=5, device=META),
        annealed_causal_mask(torch.tensor([0]), seed=0, ratio=0.0, length=5, device=META),
        annealed_causal_mask(torch.tensor([0]), seed=0, ratio=1.0, length=5, device=META),
    ]
    for mask in cases:
        assert mask.device.type == "meta" and mask.dtype == torch.bool
    assert cases[0].shape == (1, 1, 10, 10) and cases[4].shape == (1, 1, 5, 5)
    assert mask_density(cases[0]).device.type == "meta"


def test_explicit_device_moves_segments():
    segments = torch.tensor([[0, 0, 1]])
    mask = block_diffusion_mask(segments, 2, length=3, device=META)
    assert mask.device.type == "meta" and mask.shape == (1, 1, 6, 6)
