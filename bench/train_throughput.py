"""Training throughput of our trainer against a plain PyTorch reference, on the CPU.

    .venv/bin/python bench/train_throughput.py [--steps 10] [--warmup 3] [--threads N]

One process, no GPU. Prints figures; asserts nothing about time.

Ours: `pretrain.train.setup(cfg)` then `train_step(run)` (megatron-core GPTModel denoiser,
DDP + DistributedOptimizer, our masked-diffusion objective), in two configurations:
objective.logits=masked (output layer on masked positions only, the default) and
objective.logits=all (output layer on every position, like the reference).

Reference: transformers LlamaForCausalLM with the same dimensions, bidirectional
attention (config.is_causal=False), the LLaDA loss (t ~ U(eps, 1), mask with
probability t, CE at masked positions / t, summed and divided by B*L), torch AdamW and
gradient clipping at 1.0, on the same token windows.

Both see the same torch thread count. The machine's speed drifts (shared host), so the
configurations are interleaved step by step (order ABC, then CBA, ...) after a warm-up,
and besides the median step time the script prints the median over rounds of the
per-round time ratio, which cancels drift between rounds.

FLOPs per step, for every configuration: derived.flops_per_token * tokens +
derived.flops_per_scored_token * scored positions (masked positions for
logits=masked; all positions for logits=all and for the reference). MFU is against
this machine's fp32 matmul peak, measured once (pretrain.metrics.measure_peak_flops).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from data.corpus import ByteTokenizer, WindowDataset, load_byte_corpus
from parallel.topology import shutdown_distributed
from pretrain.config import Config, load_config
from pretrain.metrics import measure_peak_flops

MODEL_OVERRIDES = [
    "model.name=bench",
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=688",
    "model.max_seq_len=256",
    "model.vocab_size=8000",  # the byte tokenizer has 260; an 8k output layer as in a real model
    "data.seq_len=256",
    "data.max_bytes=3000000",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.steps=1000000",  # never reached: train() is not called, so no checkpoint is written
    "checkpoint.every=0",
    "logging.wandb=disabled",
    "logging.progress=false",
]

REF_ATTENTION = ("sdpa", "eager", "sdpa_mask4d")


# -- the plain PyTorch reference -------------------------------------------------------------
def adamw_groups(model: torch.nn.Module, optim) -> list[dict]:
    """The engine's parameter groups (optim.no_decay) for torch's AdamW."""
    from parallel.optim import excluded_from_decay

    named = list(model.named_parameters())
    no_decay = [p for n, p in named if excluded_from_decay(optim.no_decay, n, p.dim())]
    decay = [p for n, p in named if not excluded_from_decay(optim.no_decay, n, p.dim())]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class Reference:
    """transformers Llama + LLaDA loss + torch AdamW, one optimizer step per call."""

    def __init__(self, cfg: Config, padded_vocab: int, attention: str):
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        lcfg = LlamaConfig(
            vocab_size=padded_vocab,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups,
            max_position_embeddings=m.max_seq_len,
            rope_theta=m.rope_base,
            rms_norm_eps=m.norm_eps,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            initializer_range=m.init_std,
        )
        lcfg._attn_implementation = "eager" if attention == "eager" else "sdpa"
        # transformers' switch for decoder models with full attention: create_causal_mask
        # falls back to create_bidirectional_mask (no mask tensor -> SDPA without is_causal).
        lcfg.is_causal = False
        self.attention = attention
        torch.manual_seed(cfg.seed)
        self.model = LlamaForCausalLM(lcfg)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            adamw_groups(self.model, o),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
        self.clip_grad = o.clip_grad
        self.eps = cfg.curriculum.t_min.values[0]
        self.mask_id = ByteTokenizer.mask_id
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.full_mask: torch.Tensor | None = None

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.attention == "sdpa_mask4d":  # an explicit all-True [B, 1, L, L] mask, used as is
            B, L = tokens.shape
            if self.full_mask is None or self.full_mask.shape[0] != B:
                self.full_mask = torch.ones(B, 1, L, L, dtype=torch.bool)
            kwargs["attention_mask"] = self.full_mask
        return self.model(tokens, **kwargs).logits

    def step(self, tokens: torch.Tensor) -> tuple[float, int]:
        """One optimizer step on tokens [B, L]. Returns (loss, masked positions)."""
        self.model.train()
        B, L = tokens.shape
        t = self.eps + (1 - self.eps) * torch.rand(B, generator=self.generator)
        p_mask = t[:, None].expand(B, L)
        is_masked = torch.rand(B, L, generator=self.generator) < p_mask
        noisy = torch.where(is_masked, self.mask_id, tokens)
        logits = self.logits(noisy)  # [B, L, V]: every position, as in LLaDA's reference code
        ce = F.cross_entropy(logits[is_masked], tokens[is_masked], reduction="none") / p_mask[is_masked]
        loss = ce.sum() / (B * L)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        return loss.item(), int(is_masked.sum())

    @torch.no_grad()
    def bidirectional_check(self, tokens: torch.Tensor) -> float:
        """max |change of position-0 logits| when only the last token changes (0 if causal)."""
        self.model.eval()
        other = tokens.clone()
        other[:, -1] = (other[:, -1] + 1) % 256
        delta = (self.logits(tokens)[:, 0] - self.logits(other)[:, 0]).abs().max().item()
        self.model.train()
        return delta


@contextlib.contextmanager
def without_cpu_shim():
    """Run the reference outside parallel/cpu.py's process-wide TorchFunctionMode (which
    setup() installs on CPU and which costs Python overhead on every torch call): a plain
    PyTorch program does not pay it."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    if not _get_current_function_mode_stack():
        yield
        return
    with _pop_mode_temporarily():
        yield


# -- measurement -----------------------------------------------------------------------------
@dataclasses.dataclass
class Series:
    name: str
    times: list[float] = dataclasses.field(default_factory=list)
    flops: list[float] = dataclasses.field(default_factory=list)
    scored: list[int] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--ref-attention",
        choices=REF_ATTENTION,
        default="sdpa",
        help="reference attention: sdpa without a mask tensor (fastest on CPU), eager, "
        "or sdpa with an explicit all-True 4D bool mask",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    from pretrain.train import setup, train_step

    peak = measure_peak_flops()
    print(f"torch {torch.__version__}  threads {torch.get_num_threads()}  (same for ours and the reference)")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (used for every MFU below)")

    run_dir = tempfile.mkdtemp(prefix="dlm-bench-")
    common = MODEL_OVERRIDES + [f"run.dir={run_dir}", f"cluster.peak_tflops={peak / 1e12!r}"]
    cfg_masked = load_config(common + ["objective.logits=masked"])
    cfg_all = load_config(common + ["objective.logits=all"])

    # setup() cannot run twice in one process (init_distributed re-initialises
    # megatron's parallel_state, which asserts), so logits=all is a second Run over the
    # same engine (weights, optimizer), dataset and topology with its own config and
    # step counter: train_step reads objective.logits from run.cfg every step.
    run_masked = setup(cfg_masked)
    run_all = dataclasses.replace(run_masked, cfg=cfg_all, step=0, consumed_samples=0, logger=None)
    d = run_masked.derived
    B, L = cfg_masked.train.global_batch_size, cfg_masked.data.seq_len
    tokens_per_step = d.tokens_per_step
    assert tokens_per_step == B * L

    # Reference: same dims, padded vocabulary and data (its own load of the same windows).
    ref = Reference(cfg_masked, d.padded_vocab_size, args.ref_attention)
    corpus, _ = load_byte_corpus(cfg_masked.data.source, cfg_masked.data.paths, cfg_masked.data.max_bytes)
    ref_data = WindowDataset(corpus, L, seed=cfg_masked.seed, eval_fraction=cfg_masked.data.eval_fraction)
    assert int(ref_data.train_samples(torch.arange(B)).max()) < d.padded_vocab_size
    n_ours = sum(p.numel() for p in run_masked.engine.module.parameters())
    n_ref = sum(p.numel() for p in ref.model.parameters())
    print(
        f"model: hidden {cfg_masked.model.hidden_size}, {cfg_masked.model.num_layers} layers, "
        f"{cfg_masked.model.num_attention_heads} heads / {cfg_masked.model.num_query_groups} KV groups, "
        f"ffn {cfg_masked.model.ffn_hidden_size}, vocab {d.vocab_size} -> padded {d.padded_vocab_size}, "
        f"seq {L}, batch {B} ({tokens_per_step} tokens/step)"
    )
    print(f"parameters: ours {n_ours:,}  reference {n_ref:,}  (derived total {d.params['total']:,})")
    with without_cpu_shim():
        delta = ref.bidirectional_check(ref_data.train_samples(torch.arange(2)))
    print(
        f"reference attention: {args.ref_attention}; bidirectional check: changing the last token "
        f"changes position-0 logits by max |d| = {delta:.3e} "
        f"({'bidirectional' if delta > 0 else 'NOT bidirectional'})"
    )

    ref_consumed = 0

    def ours_step(run, series: Series | None):
        start = time.perf_counter()
        m = train_step(run)
        elapsed = time.perf_counter() - start
        if series is not None:
            scored = (
                round(m["masked_frac"] * tokens_per_step)
                if run.cfg.objective.logits == "masked"
                else (tokens_per_step)
            )
            series.times.append(elapsed)
            series.scored.append(scored)
            series.flops.append(tokens_per_step * d.flops_per_token + scored * d.flops_per_scored_token)
            series.losses.append(m["loss"])

    def ref_step(series: Series | None):
        nonlocal ref_consumed
        with without_cpu_shim():
            start = time.perf_counter()
            tokens = ref_data.train_samples(torch.arange(ref_consumed, ref_consumed + B))
            loss, _ = ref.step(tokens)
            elapsed = time.perf_counter() - start
        ref_consumed += B
        if series is not None:
            series.times.append(elapsed)
            series.scored.append(tokens_per_step)
            series.flops.append(tokens_per_step * (d.flops_per_token + d.flops_per_scored_token))
            series.losses.append(loss)

    masked = Series("ours logits=masked")
    full = Series("ours logits=all")
    refs = Series(f"reference ({args.ref_attention})")
    systems = [
        (masked, lambda s: ours_step(run_masked, s)),
        (full, lambda s: ours_step(run_all, s)),
        (refs, ref_step),
    ]
    print(
        f"warm-up {args.warmup} steps each, then {args.steps} timed rounds (order ABC, CBA, ...)", flush=True
    )
    for _ in range(args.warmup):
        for _, step in systems:
            step(None)
    for r in range(args.steps):
        for series, step in systems if r % 2 == 0 else systems[::-1]:
            step(series)

    # -- report ----------------------------------------------------------------------------
    ref_med = statistics.median(refs.times)
    print()
    header = (
        f"{'configuration':<22} {'median s':>9} {'min s':>7} {'max s':>7} {'tokens/s':>9} "
        f"{'scored/step':>11} {'GFLOP/step':>10} {'MFU':>7} {'ours/ref':>9} {'paired':>7} "
        f"{'loss first->last':>17}"
    )
    print(header)
    print("-" * len(header))
    best_mfu = 0.0
    for s in (masked, full, refs):
        med = statistics.median(s.times)
        mfu = statistics.median(f / t for f, t in zip(s.flops, s.times, strict=True)) / peak
        best_mfu = max(best_mfu, mfu)
        paired = statistics.median(rt / t for rt, t in zip(refs.times, s.times, strict=True))
        print(
            f"{s.name:<22} {med:>9.3f} {min(s.times):>7.3f} {max(s.times):>7.3f} "
            f"{tokens_per_step / med:>9.0f} {statistics.mean(s.scored):>11.0f} "
            f"{statistics.mean(s.flops) / 1e9:>10.2f} {100 * mfu:>6.2f}% {ref_med / med:>9.3f} "
            f"{paired:>7.3f} {s.losses[0]:>8.3f}->{s.losses[-1]:.3f}"
        )
    print(
        "\nours/ref = reference median step time / ours (= tokens/s ratio); paired = median over "
        "rounds of the same ratio within a round.\nMFU = median over steps of (FLOPs of the step / "
        "its time) / peak. FLOPs per token: layers+attention "
        f"{d.flops_per_token / 1e6:.2f}M, output layer {d.flops_per_scored_token / 1e6:.2f}M per scored "
        "position."
    )
    drift = measure_peak_flops()
    print(
        f"drift check (not used for MFU): matmul peak at the end {drift / 1e9:.1f} GFLOP/s vs "
        f"{peak / 1e9:.1f} at the start;  wall time {time.perf_counter() - wall:.0f} s"
    )
    if best_mfu > 1:
        print(
            "note: MFU > 100% means the training steps ran faster than the single peak measurement "
            "(1024^2 fp32 mm for 0.5 s) -- this host's speed drifts; compare ratios, not MFU."
        )
    if run_masked.logger:
        run_masked.logger.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutdown_distributed()
    sys.exit(code)
