"""The denoiser and its engine in fresh process groups (tests/dist.py spawn)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import spawn

DIMS = dict(
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    padded_vocab_size=256,
    max_seq_len=32,
)
TOPO_DIMS = dict(
    num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, padded_vocab=256
)


def _logit_changes(spec: str = "auto", bf16: bool = False) -> dict:
    """Change the token at position j and record how much each position's logits move,
    for the bidirectional denoiser and for the causal control."""
    from parallel import ModelDims, build_model, init_distributed, shutdown_distributed

    topo = init_distributed(tp=1, pp=1, dp=None, seed=1, model_dims=TOPO_DIMS)
    out = {}
    x = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0)).to(topo.device)
    j = 10
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % 250
    for causal in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelDims(**DIMS, causal=causal, spec=spec), topo, bf16=bf16).eval()
        with torch.no_grad():
            a, b = model(x).float(), model(y).float()  # [s, b, V]
            masked = torch.zeros(2, 16, dtype=torch.bool, device=topo.device)
            masked[0, 3] = masked[1, 12] = True
            sel = model(x, logit_positions=masked).float()  # [n, 1, V]
        out[causal] = {
            "per_position": (a - b).abs().amax(dim=(1, 2)).cpu(),
            "selected_vs_full": max(
                (sel[0, 0] - a[3, 0]).abs().max().item(), (sel[1, 0] - a[12, 1]).abs().max().item()
            ),
        }
    shutdown_distributed()
    return out


def _check_bidirectional(result: dict) -> None:
    j = 10
    bidir, causal = result[False]["per_position"], result[True]["per_position"]
    # Bidirectional: every position before j sees token j.
    assert (bidir[:j] > 1e-4).all(), bidir
    # Control: the same model made causal does not let earlier positions see token j,
    # so the check above could fail.
    assert (causal[:j] == 0).all(), causal
    assert (causal[j:] > 1e-4).all(), causal


def test_denoiser_is_bidirectional_and_scores_selected_positions():
    result = spawn(_logit_changes, 1)[0]
    _check_bidirectional(result)
    for causal in (False, True):
        assert result[causal]["selected_vs_full"] < 1e-5


@pytest.mark.gpu
def test_transformer_engine_spec_is_bidirectional_in_bf16():
    """Under TE the mask *type* (no_mask vs causal) decides, not a mask tensor."""
    result = spawn(_logit_changes, 1, "te", True, gpu=True)[0]
    _check_bidirectional(result)
    for causal in (False, True):
        assert result[causal]["selected_vs_full"] < 5e-2  # bf16


def _document_attention(spec: str = "local", bf16: bool = False) -> dict:
    """Logits of a packed batch with document attention (segments), gathered over
    tensor-parallel ranks; sample 0 holds two documents (positions 0-5 and 6-15),
    sample 1 a single one."""
    from parallel import ModelDims, build_model, init_distributed, shutdown_distributed

    topo = init_distributed(tp=int(os.environ["WORLD_SIZE"]), pp=1, dp=1, seed=1, model_dims=TOPO_DIMS)
    torch.manual_seed(0)
    dims = ModelDims(**DIMS, spec=spec, document_attention=True)
    model = build_model(dims, topo, bf16=bf16).eval()
    x = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0)).to(topo.device)
    segments = torch.zeros(2, 16, dtype=torch.long, device=topo.device)
    segments[0, 6:] = 1
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 250  # a token of sample 0's second document

    def logits(ids, seg=None):  # [b, s, V]: vocab shards gathered
        with torch.no_grad():
            out = model(ids, segments=seg).float().transpose(0, 1).contiguous()
        parts = [torch.empty_like(out) for _ in range(topo.tp)]
        torch.distributed.all_gather(parts, out)
        return torch.cat(parts, dim=-1).cpu()

    result = {
        "packed": logits(x, segments),
        "changed": logits(y, segments),
        "unmasked": logits(x),
        "doc0_alone": logits(x[:1, :6]),
        "doc1_alone": logits(x[:1, 6:]),
    }
    shutdown_distributed()
    return result


def test_document_attention_keeps_documents_apart():
    """model.attention=document: a token sees only its own document of a packed sample,
    so each document gets the logits it gets alone (RoPE is relative: doc 1 alone starts
    at position 0), a change in one document leaves the other bit-identical, a single
    document equals no mask; TP=2 gives the logits of one process."""
    one, two = spawn(_document_attention, 1)[0], spawn(_document_attention, 2)[0]
    _check_document_attention(one, atol=1e-5)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5)


def _check_document_attention(result: dict, atol: float) -> None:
    packed = result["packed"]
    moved = (result["changed"] - packed).abs().amax(dim=-1)  # [b, s]
    assert (moved[0, :6] == 0).all(), moved[0]  # the other document: exactly unaffected
    assert (moved[0, 6:] > 1e-4).all(), moved[0]  # its own document: bidirectional
    assert (moved[1] > 1e-4).all(), moved[1]  # one document: every position sees the change
    # Control: without segments the first document would have seen the change.
    assert (result["unmasked"][0, :6] - packed[0, :6]).abs().max() > 1e-4
    torch.testing.assert_close(packed[1], result["unmasked"][1], rtol=0, atol=atol)
    torch.testing.assert_close(packed[0, :6], result["doc0_alone"][0], rtol=0, atol=atol)
    torch.testing.assert_close(packed[0, 6:], result["doc1_alone"][0], rtol=0, atol=atol)


@pytest.mark.gpu
def test_transformer_engine_spec_applies_the_document_mask_in_bf16():
    """Under TE the 'arbitrary' mask type applies the [b, 1, s, s] document mask tensor."""
    _check_document_attention(spawn(_document_attention, 1, "te", True, gpu=True)[0], atol=5e-2)


def _optimizer_shards() -> dict:
    """One training step with DP=2: how much Adam state each rank holds."""
    from parallel import (
        ModelDims,
        OptimConfig,
        build_engine,
        build_model,
        init_distributed,
        shutdown_distributed,
    )

    topo = init_distributed(tp=1, pp=1, dp=None, seed=1, model_dims=TOPO_DIMS)
    model = build_model(ModelDims(**DIMS), topo)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, topo, OptimConfig(), train_steps=10)

    def forward_step(batch, model):
        logits = model(batch)
        targets = batch.transpose(0, 1).contiguous()
        return logits, lambda out: (
            engine.cross_entropy(out, targets).sum(),
            torch.tensor(targets.numel(), device=targets.device),
            {},
        )

    g = torch.Generator().manual_seed(topo.dp_rank)
    batches = [torch.randint(0, 250, (2, 16), generator=g)]
    engine.forward_backward(forward_step, batches, num_microbatches=1, seq_len=16, micro_batch_size=2)
    applied, grad_norm, *_ = engine.optimizer_step(1)
    state_numel = sum(
        t.numel()
        for s in engine.optimizer.chained_optimizers[0].optimizer.state.values()
        for k, t in s.items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    shutdown_distributed()
    return {"params": n_params, "state": state_numel, "applied": applied, "grad_norm": grad_norm}


def test_distributed_optimizer_shards_adam_states_over_data_parallel_ranks():
    ranks = spawn(_optimizer_shards, 2)
    params = ranks[0]["params"]
    assert all(r["applied"] for r in ranks)
    assert ranks[0]["grad_norm"] == pytest.approx(ranks[1]["grad_norm"], rel=1e-6)  # one global norm
    # ZeRO-1: two Adam moments per parameter, split over the 2 ranks (up to bucket padding).
    assert sum(r["state"] for r in ranks) == pytest.approx(2 * params, rel=0.02)
    for r in ranks:
        assert r["state"] < 1.1 * params


def _block_diffusion_logits() -> dict:
    """Logits of block diffusion's [x_t, x0] input under the block mask, against the
    models they must reduce to: block size 1 with a logit shift against the same weights
    run causally (next-token prediction), block size L against the plain bidirectional
    denoiser on x_t."""
    from parallel import ModelDims, build_model, init_distributed, shutdown_distributed
    from pretrain.masks import block_diffusion_mask
    from pretrain.objective import block_diffusion_inputs, logit_positions, mask_tokens, shift_maskable

    topo = init_distributed(tp=1, pp=1, dp=None, seed=1, model_dims=TOPO_DIMS)
    batch, length, mask_id = 2, 16, 255
    x = torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(0))
    rope = torch.arange(length).repeat(2)
    models = {}
    for causal in (False, True):
        torch.manual_seed(0)
        models[causal] = build_model(ModelDims(**DIMS, causal=causal, mask_tensors=True), topo).eval()
    out = {}
    with torch.no_grad():
        # block size 1 + shift: every target but position 0, predicted from the position before
        masked = shift_maskable(x.shape)
        positions = logit_positions(masked, shift=True)
        noisy = torch.where(masked, mask_id, x)
        inputs = block_diffusion_inputs(noisy, x, block_size=1, shift=True)
        mask = block_diffusion_mask(None, 1, length=length, shift=True)
        selected = torch.cat([positions, torch.zeros_like(positions)], dim=1)
        block = models[False](inputs, logit_positions=selected, attention_mask=mask, rope_positions=rope)
        causal = models[True](x).transpose(0, 1)[positions]  # [n, V]: position p predicts x[p + 1]
        out["shift_block1"] = (block[:, 0] - causal, x[masked], inputs, x)
        # the hybrid loss: blocks of 4 with a causal clean copy, whose logits are the AR model's
        mask = block_diffusion_mask(None, 4, length=length, shift=True, clean_causal=True)
        inputs = block_diffusion_inputs(noisy, x, block_size=4, shift=True)
        clean = torch.zeros(batch, 2 * length, dtype=torch.bool)
        clean[:, length:-1] = True
        hybrid = models[False](inputs, logit_positions=clean, attention_mask=mask, rope_positions=rope)
        out["causal_clean_copy"] = hybrid[:, 0] - models[True](x).transpose(0, 1)[:, :-1].reshape(-1, 256)
        # block size L, no shift: the noisy copy sees only itself, as the plain denoiser
        t = torch.tensor([0.3, 0.7])
        noisy, masked = mask_tokens(x, t, torch.arange(batch), seed=3, mask_id=mask_id)
        inputs = block_diffusion_inputs(noisy, x, block_size=length, shift=False)
        mask = block_diffusion_mask(None, length, length=length)
        selected = torch.cat([masked, torch.zeros_like(masked)], dim=1)
        block = models[False](inputs, logit_positions=selected, attention_mask=mask, rope_positions=rope)
        plain = models[False](noisy, logit_positions=masked)
        out["full_block"] = (block - plain, int(masked.sum()))
    shutdown_distributed()
    return out


def test_block_diffusion_reduces_to_next_token_prediction_and_to_plain_diffusion():
    """Block size 1 with the logit shift: the noisy copy is the clean sequence, each
    position sees itself and the clean tokens before it, and its logits are the causal
    model's (same weights) to 1e-6, so the loss is the autoregressive loss. Block size L:
    the noisy copy's logits are the plain denoiser's on x_t. A causal clean copy (the
    hybrid loss) gives the causal model's logits to 1e-6."""
    result = spawn(_block_diffusion_logits, 1)[0]
    delta, _targets, inputs, x = result["shift_block1"]
    assert torch.equal(inputs, torch.cat([x, x], dim=1))  # nothing left masked in the noisy copy
    assert delta.abs().max().item() < 1e-6
    full_delta, scored = result["full_block"]
    print(f"block 1 + shift vs causal {delta.abs().max():.2e}; block L vs plain {full_delta.abs().max():.2e}")
    assert scored > 0 and full_delta.abs().max().item() < 1e-5
    assert result["causal_clean_copy"].abs().max().item() < 1e-6
