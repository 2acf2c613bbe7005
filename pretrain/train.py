"""`dlm train` / `python -m pretrain.train`: pretrain a masked diffusion LM.

    dlm train model=tiny train.steps=20 checkpoint.every=10 run.dir=/tmp/r1
    torchrun --nproc-per-node 2 -m pretrain.train model=tiny parallel.tp=2 run.dir=/tmp/r2

Resumes automatically when run.dir holds a checkpoint. See README.md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

import parallel  # megatron-core is imported on first use of the engine functions
from data import pipeline
from data.files import write_atomic
from data.shards import ShardFormatError
from parallel.topology import ConfigError, cause_line
from parallel.zero import check_checkpoint_engine
from pretrain.config import (
    Config,
    Derived,
    derive,
    layout_dims,
    load_config,
    model_dims,
    resolve_checkpoint,
    to_yaml,
)
from pretrain.curriculum import StepCurriculum, curriculum_at, eval_curriculum
from pretrain.engine_convert import dist_weights
from pretrain.likelihood import bits_per_byte, combine, eval_masks, nll_sum, sample_stats
from pretrain.masks import annealed_causal_mask, block_diffusion_mask
from pretrain.metrics import MetricsLogger, peak_flops_per_device
from pretrain.objective import (
    block_diffusion_inputs,
    block_t,
    diffusion_loss,
    logit_positions,
    mask_embedding_noise,
    mask_tokens,
    next_token_positions,
    sample_t,
    shift_maskable,
)
from pretrain.sample import LiveDenoiser, generate_ids
from pretrain.stop import EXIT_REQUEUE, StopSignals

EVAL_SEED_OFFSET = 0x5EED  # eval noise never coincides with training noise


@dataclass
class Run:
    cfg: Config
    derived: Derived
    topo: parallel.Topology
    engine: parallel.Engine
    data: pipeline.TrainData | None
    run_dir: Path
    step: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0  # differs from consumed_samples x seq_len after random-length steps
    logger: MetricsLogger | None = None
    peak_flops: float = 0.0
    stage_keys: tuple[str, ...] = ()  # what this pipeline stage needs of a microbatch
    reads_data: bool = False  # this rank reads for its tensor-parallel group
    token_bytes: torch.Tensor | None = None  # UTF-8 bytes per token id (bits per byte), if known

    @property
    def is_logging_rank(self) -> bool:
        return self.topo.rank == 0


# -- the objective, as megatron's forward_step / loss_func pair ----------------------------
def forward_step(run: Run, seed: int, plan: StepCurriculum, batch: dict, model):
    """Noise a microbatch (a function of seed, the step's curriculum and global sample
    indices only, so every tensor/pipeline rank draws the same masks) and run this
    pipeline stage. A middle stage gets no tokens (its input is the previous stage's
    output) and computes no loss."""
    attention = attention_inputs(run, seed, plan, batch)
    if "tokens" not in batch:
        return model(None, **attention), _no_loss
    tokens, index, shift = batch["tokens"], batch["index"], run.cfg.model.logit_shift
    t = noise_levels(run, seed, plan, index, tokens.shape[1]).to(tokens.device)
    maskable = shift_maskable(tokens.shape, tokens.device) if shift else None
    noisy, is_masked = mask_tokens(
        tokens,
        t,
        index,
        seed=seed,
        mask_id=run.derived.mask_id,
        maskable=maskable,
        complementary=plan.complementary,
    )
    positions = logit_positions(is_masked, shift=shift)
    if plan.two_copies:  # [x_t, x0]: diffusion logits from the noisy copy, AR ones from the clean
        noisy = block_diffusion_inputs(noisy, tokens, block_size=plan.block_size, shift=shift)
        clean = next_token_positions(tokens.shape, tokens.device) if plan.ar_weight > 0 else None
        positions = torch.cat([positions, clean if clean is not None else torch.zeros_like(positions)], 1)
    extra = {}
    if plan.mask_noise_std > 0 and run.topo.is_first_stage:
        extra["input_noise"] = mask_embedding_noise(
            noisy == run.derived.mask_id,
            index,
            seed=seed,
            std=plan.mask_noise_std,
            hidden_size=run.cfg.model.hidden_size,
        )
    if run.topo.cp > 1:  # this rank's part of every sequence, targets with their logits
        tokens, is_masked = context_part(run, tokens, is_masked, shift=shift)
        noisy, positions = context_part(run, noisy, positions)
        extra = {key: run.engine.context_part(value) for key, value in extra.items()}
    selected = positions if run.cfg.objective.logits == "masked" else None
    output = model(noisy, logit_positions=selected, **attention, **extra)
    return output, partial(loss_fn, run, plan, tokens, is_masked, positions, t)


def context_part(run: Run, *tensors: torch.Tensor, shift: bool = False) -> list[torch.Tensor]:
    """Context parallelism: this rank's zig-zag part of each [b, s] tensor (the masks, the
    noise and the indices are drawn for the whole sequence first, so every layout draws the
    same). `shift`: these are targets under a logit shift, where position i's logits predict
    token i + 1: moved one position left first (the last position predicts nothing), so
    that each rank's targets sit at its logits' positions."""
    if shift:
        tensors = [torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1) for t in tensors]
    return [run.engine.context_part(t) for t in tensors]


def noise_levels(run: Run, seed: int, plan: StepCurriculum, index: torch.Tensor, length: int) -> torch.Tensor:
    """t per sample ([b]), or per token under block diffusion (one t per block, [b, L])."""
    band = dict(t_min=plan.t_min, t_max=plan.t_max, complementary=plan.complementary)
    if plan.block_diffusion:
        return block_t(index, seed=seed, block_size=plan.block_size, length=length, **band)
    return sample_t(
        index,
        seed=seed,
        method=run.cfg.objective.t_sampling,
        global_batch_size=run.cfg.train.global_batch_size,
        **band,
    )


def attention_inputs(run: Run, seed: int, plan: StepCurriculum, batch: dict) -> dict:
    """What restricts attention this step, built on every pipeline stage from the step's
    curriculum, the sample indices and the segments alone: the block-diffusion mask over
    [x_t, x0] (with the rotary positions of both copies), or, while the curriculum anneals
    from causal to bidirectional, the annealed mask, or the document segments; block and
    annealed masks are intersected with the documents."""
    segments = batch.get("segments")
    on_device = [value for key, value in batch.items() if key != "index"]  # indices stay on the host
    device = on_device[0].device if on_device else run.topo.device
    if plan.two_copies:
        mask = block_diffusion_mask(
            segments,
            plan.block_size,
            length=plan.length,
            device=device,
            shift=run.cfg.model.logit_shift,
            clean_causal=plan.ar_weight > 0,
        )
        return {"attention_mask": mask, "rope_positions": torch.arange(plan.length, device=device).repeat(2)}
    if plan.bidirectional_ratio >= 1:
        return {"segments": segments}
    mask = annealed_causal_mask(
        batch["index"],
        seed=seed,
        ratio=plan.bidirectional_ratio,
        length=plan.length,
        segments=segments,
        device=device,
    )
    return {"attention_mask": mask}


def _no_loss(output):
    raise RuntimeError("a middle pipeline stage has no loss: megatron calls loss_fn on the last stage only")


def loss_fn(run: Run, plan: StepCurriculum, tokens, is_masked, positions, t, output):
    """The step's loss: dlm_weight x the diffusion loss (+ ar_weight x the clean copy's
    next-token loss, scaled so that both are divided by the same token count). Reports
    [loss_sum, count, correct, masked, ar_sum, ar_count]."""
    obj = run.cfg.objective
    logits = output if obj.logits == "masked" else output.transpose(0, 1)[positions]
    logits = logits.reshape(-1, logits.shape[-1])
    second_copy = torch.arange(positions.shape[1], device=positions.device) >= tokens.shape[1]
    from_clean = second_copy.expand_as(positions)[positions]  # logit rows of the clean copy (AR)
    denoised = logits[~from_clean] if plan.ar_weight > 0 else logits
    correct = run.engine.correct(denoised, tokens[is_masked]).sum()  # before the in-place CE
    loss_sum, count = diffusion_loss(
        denoised,
        tokens,
        is_masked,
        t,
        weighting=obj.weighting,
        normalization=obj.normalization,
        band=plan.t_max - plan.t_min,
        cross_entropy=run.engine.cross_entropy,
    )
    ar_sum, ar_count = torch.zeros_like(loss_sum), torch.zeros_like(count)
    if plan.ar_weight > 0:
        next_tokens = tokens[:, 1:].reshape(-1)
        ar_sum = run.engine.cross_entropy(logits[from_clean], next_tokens).sum()
        ar_count = next_tokens.numel()
    total = plan.dlm_weight * loss_sum + plan.ar_weight * ar_sum * (count / max(ar_count, 1))
    parts = [total, count, correct, is_masked.sum(), ar_sum, torch.as_tensor(ar_count, device=count.device)]
    return total, count, {"stats": torch.stack([part.detach().double() for part in parts])}


# -- one optimizer step ----------------------------------------------------------------------
def stage_data_keys(cfg: Config, topo: parallel.Topology) -> tuple[str, ...]:
    """What this rank's pipeline stage needs of a microbatch: tokens on the first (input)
    and last (targets) stage, segments on every stage under document attention."""
    keys = ("tokens",) if topo.is_first_stage or topo.is_last_stage else ()
    return keys + ("segments",) if cfg.model.attention == "document" else keys


def microbatches(run: Run, first_index: int, samples, plan: StepCurriculum):
    """This data-parallel rank's share of the global batch starting at `first_index`.
    One rank per tensor-parallel group reads (and only on stages that need data); the
    group receives its microbatch by broadcast, as in Megatron-LM. Under complementary
    masking each sample read fills two rows (global rows 2k, 2k+1 hold sample k)."""
    d, mbs = run.derived, run.cfg.train.micro_batch_size
    start = first_index + run.topo.dp_rank * d.samples_per_dp_rank
    rows_read = mbs // 2 if plan.complementary else mbs
    for index in torch.arange(start, start + d.samples_per_dp_rank, device="cpu").split(mbs):
        sample_index = index[0::2] // 2 if plan.complementary else index
        batch = samples(sample_index) if run.reads_data else None
        batch = run.engine.broadcast_batch(batch, run.stage_keys, (rows_read, run.cfg.data.seq_len))
        yield {**fit_to_plan(batch, plan), "index": index}


def fit_to_plan(batch: dict, plan: StepCurriculum) -> dict:
    """The step's rows: each sample twice under complementary masking, cut to the step's
    length (random-length steps)."""
    if plan.complementary:
        batch = {key: value.repeat_interleave(2, dim=0) for key, value in batch.items()}
    return {key: value[:, : plan.length] for key, value in batch.items()}


def sum_reports(reports: list[dict], device: torch.device) -> torch.Tensor:
    """This rank's microbatch statistics summed (zeros on stages without a loss)."""
    total = torch.zeros(6, dtype=torch.float64, device=device)
    for report in reports:
        total += report["stats"]
    return total


def schedule(run: Run, first_index: int, samples, plan: StepCurriculum, step_fn, forward_only: bool):
    """Forward (and backward) over one global batch; this rank's microbatch reports."""
    return run.engine.forward_backward(
        step_fn,
        microbatches(run, first_index, samples, plan),
        num_microbatches=run.derived.num_microbatches,
        seq_len=plan.model_length,
        micro_batch_size=run.cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def run_schedule(run: Run, first_index: int, samples, seed: int, plan: StepCurriculum, forward_only: bool):
    """The objective over one global batch; returns global-sum statistics
    [loss_sum, loss_count, correct, masked]."""
    reports = schedule(run, first_index, samples, plan, partial(forward_step, run, seed, plan), forward_only)
    return run.engine.global_sum(sum_reports(reports, run.topo.device)).cpu()


def train_step(run: Run) -> dict:
    """One optimizer step over one global batch."""
    cfg, d = run.cfg, run.derived
    step = run.step + 1
    plan = step_plan(cfg, step)
    start = time.perf_counter()
    run.engine.train(True)
    stats = run_schedule(run, run.consumed_samples, run.data.train, cfg.seed, plan, False)
    update = run.engine.optimizer_step(step)
    elapsed = time.perf_counter() - start
    tokens = cfg.train.global_batch_size * plan.length
    processed = cfg.train.global_batch_size * plan.model_length  # 2L per row under block diffusion
    per_token = d.flops_per_token + d.attention_flops_per_position * (plan.model_length - cfg.data.seq_len)
    run.step, run.consumed_samples = step, run.consumed_samples + cfg.train.global_batch_size
    run.tokens_seen += tokens

    loss_sum, count, correct, masked, ar_sum, ar_count = stats.tolist()
    scored = masked + ar_count if cfg.objective.logits == "masked" else processed
    flops = processed * per_token + scored * d.flops_per_scored_token
    return {
        "step": step,
        "loss": loss_sum / max(count, 1),
        "masked_acc": correct / max(masked, 1),
        "masked_frac": masked / tokens,
        "grad_norm": update.grad_norm,
        "lr": update.lr,
        "weight_decay": update.weight_decay,
        "update_applied": update.applied,
        "tokens": run.tokens_seen,
        "step_time": elapsed,
        "tokens_per_s": tokens / elapsed,
        "mfu": flops / elapsed / (run.peak_flops * d.world_size),
        **({"ar_loss": ar_sum / ar_count} if ar_count else {}),  # the hybrid loss's next-token part
        **plan.metrics(),
        **run.data.source_metrics(samples_read(run)),  # tokens and epochs per source, all ranks (rank 0 logs)
    }


def samples_read(run: Run) -> int:
    """Samples read so far by all ranks (a sample fills two rows under complementary masking)."""
    return run.consumed_samples // run.cfg.train.micro_batch_size * run.derived.data_micro_batch_size


def step_plan(cfg: Config, step: int) -> StepCurriculum:
    """The curriculum's decisions for optimizer step `step` (pure: every rank agrees)."""
    return curriculum_at(
        cfg.curriculum,
        step=step,
        total_steps=cfg.train.steps,
        seed=cfg.seed,
        seq_len=cfg.data.seq_len,
        min_length=2 if cfg.model.logit_shift else 1,  # position 0 is never masked under a shift
    )


def eval_samples(run: Run) -> list[dict]:
    """eval.samples texts from the live model (LLaDA's sampler, pretrain/sample.py), each
    prompted by the start of a held-out sample; every rank takes part (the model's
    forward passes are collective) and gets the same ids; rank 0 decodes them."""
    ev, vocab = run.cfg.eval, run.derived.vocab_size
    read = None
    if run.topo.rank == 0:  # the first stage's reading rank
        read = run.data.eval(torch.arange(ev.samples, device="cpu"))["tokens"][:, : ev.sample_prompt]
    prompts = run.engine.broadcast_tokens(read, (ev.samples, ev.sample_prompt))
    model = LiveDenoiser(partial(run.engine.forward_logits, vocab_size=vocab), run.topo.device)
    run.engine.train(False)
    ids = generate_ids(
        model,
        prompts,
        gen_length=ev.sample_length,
        steps=ev.sample_length,
        block_length=sample_block_length(ev.sample_length),
        mask_token_id=run.derived.mask_id,
        logit_shift=run.cfg.model.logit_shift,
        vocab_size=vocab,
    ).cpu()
    decode = pipeline.decoder(run.cfg.data) if run.is_logging_rank else None
    text = decode or (lambda row: " ".join(map(str, row)))
    split = ev.sample_prompt
    return [{"prompt": text(row[:split].tolist()), "completion": text(row[split:].tolist())} for row in ids]


def sample_block_length(length: int) -> int:
    """LLaDA's semi-autoregressive blocks: 32 tokens, or the largest divisor of `length`
    up to 32."""
    return max(size for size in range(1, min(32, length) + 1) if length % size == 0)


def evaluate(run: Run) -> dict:
    """Held-out samples with fixed noise (the same every evaluation): the training loss
    and the Monte Carlo bound on the per-token NLL."""
    run.engine.train(False)
    total = torch.zeros(6, dtype=torch.float64, device="cpu")
    gbs = run.cfg.train.global_batch_size
    plan = eval_curriculum(run.cfg.curriculum, run.cfg.data.seq_len)
    with torch.no_grad():
        for b in range(run.cfg.train.eval_batches):
            total += run_schedule(run, b * gbs, run.data.eval, run.cfg.seed + EVAL_SEED_OFFSET, plan, True)
    loss_sum, count, correct, masked, _, _ = total.tolist()
    return {
        "step": run.step,
        "eval_loss": loss_sum / max(count, 1),
        "eval_masked_acc": correct / max(masked, 1),
        **likelihood(run),
    }


# -- the likelihood bound (pretrain/likelihood.py) through the same schedule ----------------
def likelihood(run: Run) -> dict:
    """The NLL bound per token (nats) over eval.batches global batches of held-out
    samples, eval.draws masks each, its standard error, and bits per byte where the
    tokenizer's byte lengths are known. Exactly the same for two calls on one model."""
    cfg, gbs = run.cfg, run.cfg.train.global_batch_size
    plan = eval_curriculum(cfg.curriculum, cfg.data.seq_len)
    stats = torch.zeros(7, dtype=torch.float64, device="cpu")
    run.engine.train(False)
    with torch.no_grad():
        for b in range(cfg.eval.batches or cfg.train.eval_batches):
            stats += likelihood_batch(run, b * gbs, plan)
    bound, stderr = combine(stats[:6])
    result = {"eval_nll": float(bound), "eval_nll_stderr": float(stderr), "eval_samples": int(stats[3])}
    if stats[6] > 0:  # the bytes are known (on the last stage, which sent them here)
        result["eval_bpb"] = float(bits_per_byte(stats[0], stats[6]))
    return result


def likelihood_batch(run: Run, first_index: int, plan: StepCurriculum) -> torch.Tensor:
    """One global batch, every draw: [sample_stats..., bytes] summed over replicas."""
    per_draw = []
    for draw in range(run.cfg.eval.draws):
        step_fn = partial(likelihood_forward_step, run, draw)
        per_draw.append(schedule(run, first_index, run.data.eval, plan, step_fn, True))
    stats = torch.zeros(7, dtype=torch.float64, device=run.topo.device)
    if per_draw[0]:  # the last pipeline stage
        sums = torch.stack([torch.cat([r["nll_sums"] for r in reports]) for reports in per_draw])
        counts = torch.cat([r["counts"] for r in per_draw[0]])
        scored_bytes = sum(r["bytes"] for r in per_draw[0])
        # context parallelism: each rank scored its part of every sample; whole samples
        # first (the statistics are not additive), then counted once
        sums, counts, scored_bytes = (run.engine.context_sum(x) for x in (sums, counts, scored_bytes))
        stats = torch.cat([sample_stats(sums, counts), scored_bytes.reshape(1)]) * (run.topo.cp_rank == 0)
    return run.engine.global_sum(stats).cpu()


def likelihood_forward_step(run: Run, draw: int, batch: dict, model):
    """Draw `draw` of the estimator's masks (a function of the eval seed and the global
    sample indices, as in training) and run this pipeline stage."""
    if "tokens" not in batch:
        return model(None, segments=batch.get("segments")), _no_loss
    tokens, index, ev = batch["tokens"], batch["index"], run.cfg.eval
    maskable = shift_maskable(tokens.shape, tokens.device) if run.cfg.model.logit_shift else None
    noisy, is_masked, weight = eval_masks(
        tokens,
        index,
        seed=run.cfg.seed + EVAL_SEED_OFFSET,
        draw=draw,
        num_draws=ev.draws,
        mask_id=run.derived.mask_id,
        method=ev.method,
        maskable=maskable,
    )
    positions = logit_positions(is_masked, shift=run.cfg.model.logit_shift)
    if run.topo.cp > 1:  # this rank's part of every sequence, targets with their logits
        maskable = maskable if maskable is not None else torch.ones_like(is_masked)
        tokens, is_masked, maskable = context_part(
            run, tokens, is_masked, maskable, shift=run.cfg.model.logit_shift
        )
        noisy, positions = context_part(run, noisy, positions)
    output = model(noisy, logit_positions=positions, segments=batch.get("segments"))
    return output, partial(likelihood_loss_fn, run, tokens, is_masked, weight, maskable)


def likelihood_loss_fn(run: Run, tokens, is_masked, weight, maskable, output):
    """Per-sample weighted sums of the masked tokens' cross entropy (the estimate of each
    sample's bound), their scoreable-token counts and bytes."""
    ce = run.engine.cross_entropy(output.reshape(-1, output.shape[-1]), tokens[is_masked])
    sums, counts = nll_sum(ce, is_masked, weight, maskable)
    report = {"nll_sums": sums.detach(), "counts": counts, "bytes": scored_bytes(run, tokens, maskable)}
    return sums.sum(), counts.sum(), report


def scored_bytes(run: Run, tokens: torch.Tensor, maskable: torch.Tensor | None) -> torch.Tensor:
    """UTF-8 bytes of the scoreable tokens (0 when the tokenizer's are unknown)."""
    if run.token_bytes is None:
        return torch.zeros((), dtype=torch.float64, device=tokens.device)
    per_token = run.token_bytes[tokens]
    return (per_token if maskable is None else per_token * maskable).sum()


# -- set-up, checkpoints, loop -------------------------------------------------------------
def preflight(cfg: Config, world_size: int | None = None) -> tuple[pipeline.Vocabulary, Derived, dict]:
    """Every check that needs no process group and reads no data beyond dataset
    manifests, so a bad config or layout fails in seconds, naming the key. world_size:
    this launch's (None), or a job's to be submitted."""
    try:
        vocab = pipeline.describe(cfg.data)
    except (pipeline.DataConfigError, ShardFormatError) as e:
        raise ConfigError(str(e)) from e
    check_checkpoints(cfg)
    world_size = world_size or parallel.LaunchEnv.detect().world_size
    derived = derive(cfg, world_size, vocab_size=vocab.vocab_size, mask_id=vocab.mask_id)
    try:
        pipeline.check_layout(
            cfg.data,
            vocab,
            seed=cfg.seed,
            micro_batch_size=derived.data_micro_batch_size,
            dp_size=derived.dp,
            run_samples=derived.run_samples,
        )
    except pipeline.DataConfigError as e:
        raise ConfigError(str(e)) from e
    layout = layout_dims(cfg, derived.padded_vocab_size)
    parallel.Topology.build(world_size, **topology_settings(derived), **layout)
    if derived.parallel.tp_comm_overlap and not (torch.cuda.is_available() and parallel.HAVE_TE):
        raise ConfigError(
            "parallel.tp_comm_overlap=true needs GPUs with Transformer Engine (its userbuffers)"
        )
    return vocab, derived, layout


def topology_settings(derived: Derived) -> dict:
    """Topology.build's layout keywords, from the parallel section as the run resolved it."""
    p = derived.parallel
    pipeline = parallel.PipelineLayout.of(p)
    return dict(
        tp=p.tp,
        pp=p.pp,
        dp=p.dp,
        cp=p.cp,
        sequence_parallel=p.sequence_parallel,
        tp_comm_overlap=p.tp_comm_overlap,
        pipeline=pipeline,
    )


def check_checkpoints(cfg: Config) -> None:
    """The checkpoint the run would resume from (run.dir's latest) or start from
    (checkpoint.init_from) exists, is complete and suits parallel.engine."""
    engine = cfg.parallel.engine
    if cfg.checkpoint.resume and (Path(cfg.run.dir) / "checkpoints" / "latest").exists():
        path = resolve_checkpoint(Path(cfg.run.dir), "run.dir")
        where, stage = f"run.dir's latest ({path})", cfg.zero.stage
        check_checkpoint_engine(read_state(path), engine, where=where, resuming=True, zero_stage=stage)
    elif cfg.checkpoint.init_from:
        path = resolve_checkpoint(Path(cfg.checkpoint.init_from))  # exists, names a complete checkpoint
        where = f"checkpoint.init_from={path}"
        check_checkpoint_engine(read_state(path), engine, where=where, resuming=False)


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def setup(cfg: Config) -> Run:
    """Everything a training run needs: process groups, model, engine, the checkpoint to
    continue from, data, the run directory's logs."""
    run, vocab = build_run(cfg)
    run.data = build_data(run, vocab, resume(run))
    run.engine.barrier()  # ranks measure the matmul peak together, as they will train
    run.peak_flops, peak_source = peak_flops_per_device(cfg.cluster.peak_tflops)
    param_groups = run.engine.describe_param_groups()  # collective
    if run.is_logging_rank:
        start_logging(run, f"peak {run.peak_flops / 1e12:.3f} TFLOP/s/device ({peak_source})", param_groups)
    return run


def build_run(cfg: Config) -> tuple[Run, pipeline.Vocabulary]:
    """Process groups, this rank's model stage and engine; no data, nothing loaded."""
    vocab, derived, layout = preflight(cfg)
    topo = parallel.init_distributed(**topology_settings(derived), seed=cfg.seed, model_dims=layout)
    bf16 = derived.precision == "bf16"
    deepspeed = parallel.deepspeed_run(
        cfg.parallel.engine,
        cfg.zero,
        micro_batch_size=cfg.train.micro_batch_size,
        num_microbatches=derived.num_microbatches,
        dp=topo.dp,
        clip_grad=cfg.optim.clip_grad,
        bf16=bf16,
    )  # None with parallel.engine=megatron
    if topo.tp_comm_overlap:
        parallel.start_tp_comm_overlap(
            topo,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            hidden_size=cfg.model.hidden_size,
            config_path=cfg.parallel.tp_comm_overlap_config,
        )
    with parallel.model_context(deepspeed):  # DeepSpeed ZeRO-3: each rank builds only its partitions
        model = parallel.build_model_chunks(model_dims(cfg, derived.padded_vocab_size), topo, bf16=bf16)
    engine = parallel.build_engine(
        model,
        topo,
        cfg.optim,
        train_steps=cfg.train.steps,
        parallel=derived.parallel,
        deepspeed=deepspeed,
    )
    run = Run(cfg, derived, topo, engine, None, Path(cfg.run.dir))
    run.stage_keys = stage_data_keys(cfg, topo)
    run.reads_data = topo.tp_rank == 0 and bool(run.stage_keys)
    if topo.is_last_stage:
        lengths = pipeline.token_byte_lengths(cfg.data)
        run.token_bytes = lengths.to(topo.device) if lengths is not None else None
    return run, vocab


def build_data(run: Run, vocab: pipeline.Vocabulary, data_state: dict | None) -> pipeline.TrainData:
    """The data stream on ranks that read for their tensor-parallel group, else nothing
    (every rank calls it: building megatron's sample index is collective)."""
    return pipeline.build(
        run.cfg.data,
        vocab,
        seed=run.cfg.seed,
        micro_batch_size=run.derived.data_micro_batch_size,
        dp_rank=run.topo.dp_rank,
        dp_size=run.topo.dp,
        state=data_state,
        run_samples=run.derived.run_samples,
        reads=run.reads_data,
        cache_dir=run.cfg.data.cache_dir or str(run.run_dir / "megatron_index"),
    )


def objective_note(obj) -> str:
    """The objective, as the start line states it (which estimator the loss is)."""
    note = f"objective: t {obj.t_sampling}, weighting {obj.weighting}, normalization {obj.normalization}"
    if obj.normalization == "masked":
        note += " (a ratio estimator sum(w*CE)/#masked, not the ELBO; normalization=tokens gives the ELBO)"
    return note


def start_logging(run: Run, peak: str, param_groups: str) -> None:
    """Rank 0: the run directory's config files, the metrics logger and the start lines."""
    cfg, derived = run.cfg, run.derived
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run.run_dir / "config.yaml", to_yaml(cfg))
    write_atomic(run.run_dir / "derived.json", json.dumps(derived.as_dict(), indent=2))
    for name, text in run.engine.run_files().items():  # e.g. the generated DeepSpeed config
        write_atomic(run.run_dir / name, text)
    run.logger = MetricsLogger(
        run.run_dir,
        start_step=run.step,
        total_steps=cfg.train.steps,
        log_every=cfg.train.log_every,
        progress=cfg.logging.progress,
        wandb_setting=cfg.logging.wandb,
        project=cfg.logging.project,
        config={"config": asdict(cfg), "derived": derived.as_dict()},
    )
    run.logger.write(start_lines(run, peak, param_groups))


def start_lines(run: Run, peak: str, param_groups: str) -> str:
    """What the run is: layout, model, data (epochs), objective, optimizer, batch."""
    cfg, derived, p = run.cfg, run.derived, run.derived.params
    layers = "te" if parallel.use_transformer_engine(cfg.model.spec) else "local"
    return (
        f"dlm train: {run.topo.describe()} {derived.precision}, layers {layers}  model {cfg.model.name} "
        f"({p['total'] / 1e6:.2f}M params, {p['layers'] / 1e6:.2f}M in layers)  "
        f"data {cfg.data.name}: {run.data.summary}, seq {cfg.data.seq_len}\n"
        f"  {run.data.epoch_report(derived.run_samples)}\n"
        f"  {objective_note(cfg.objective)}\n"
        f"  optimizer: AdamW, {cfg.optim.schedule} schedule; {param_groups}\n"
        f"  global batch {cfg.train.global_batch_size} = {derived.num_microbatches} microbatches x "
        f"{cfg.train.micro_batch_size} x dp {derived.dp}  |  {peak}  |  run dir {run.run_dir}"
    )


def resume(run: Run) -> dict | None:
    """Continue from run.dir's latest checkpoint, or start from checkpoint.init_from's
    weights, or from scratch. Returns the data loader state to continue from."""
    ckpt_cfg = run.cfg.checkpoint
    latest = parallel.latest_checkpoint(run.run_dir / "checkpoints") if ckpt_cfg.resume else None
    data_state = None
    if latest is not None:
        state = parallel.load_checkpoint(latest, run.engine)
        run.step, run.consumed_samples = state["step"], state["consumed_samples"]
        run.tokens_seen = state.get("tokens_seen", run.consumed_samples * run.cfg.data.seq_len)
        data_state = state.get("data_state")
        source = f"resumed from {latest} (step {run.step})"
        if state.get("schedule_changes"):
            source += "; the LR/weight-decay schedule follows this config: " + ", ".join(
                state["schedule_changes"]
            )
    elif ckpt_cfg.init_from:
        path = resolve_checkpoint(Path(ckpt_cfg.init_from))
        # weights are read from dist checkpoints (resharded to any layout, either engine):
        # a DeepSpeed checkpoint's converted copy
        parallel.load_checkpoint(dist_weights(path), run.engine, load_optimizer=False)
        source = f"initialised from the weights of {path}"
    else:
        return None
    if run.is_logging_rank:
        print(f"dlm train: {source}", flush=True)
    return data_state


def save(run: Run, *, include_optimizer: bool = True) -> Path | None:
    """A checkpoint of this step; None when it is being written in the background
    (checkpoint.async_save: `checkpoint_published` follows once it is complete)."""
    ckpt = run.cfg.checkpoint
    in_background = ckpt.async_save and include_optimizer
    path = parallel.save_checkpoint(
        run.run_dir / "checkpoints" / f"step_{run.step}",
        run.engine,
        state={
            "step": run.step,
            "consumed_samples": run.consumed_samples,
            "tokens_seen": run.tokens_seen,
            "data_state": run.data.state_dict(),
            "derived": run.derived.as_dict(),
        },
        config_yaml=to_yaml(run.cfg),
        include_optimizer=include_optimizer,
        fully_parallel=ckpt.fully_parallel_save,
        in_background=partial(checkpoint_published, run) if in_background else None,
    )
    if path is not None:
        parallel.prune_checkpoints(run.run_dir / "checkpoints", ckpt.keep)
    return path


def checkpoint_published(run: Run, path: Path) -> None:
    """Every rank, once a checkpoint written in the background is complete and `latest`
    names it."""
    parallel.prune_checkpoints(run.run_dir / "checkpoints", run.cfg.checkpoint.keep)
    if run.logger:
        run.logger.write(f"checkpoint: {path} (written in the background; published after step {run.step})")


def train(cfg: Config) -> Run:
    """Train to train.steps, or until a stop signal (pretrain/stop.py): then the run
    stops after the same step on every rank with a checkpoint of it, short of train.steps."""
    run = setup(cfg)
    t = cfg.train
    try:
        if run.step >= t.steps and run.is_logging_rank:
            run.logger.write(f"dlm train: already at step {run.step} >= train.steps={t.steps}")
        last_eval = None
        with StopSignals() as stop:
            while run.step < t.steps:
                last_eval = step_and_log(run) or last_eval
                if run.step < t.steps and stop.agreed():
                    stop_early(run, stop.received)
                    break
            parallel.finish_checkpoints(blocking=True)  # a checkpoint written in the background
        if run.logger and run.step >= t.steps:
            run.logger.write(done_line(run, last_eval))
    finally:
        run.data.close()
        if run.logger:
            run.logger.close()
    return run


def step_and_log(run: Run) -> dict | None:
    """One optimizer step, its metrics, and the evaluation and checkpoint due after it;
    returns the evaluation's metrics if one ran."""
    parallel.finish_checkpoints(blocking=False)  # publishes a background save once written everywhere
    metrics, eval_metrics = train_step(run), None
    if run.logger:
        run.logger.log(metrics)
    if run.cfg.train.eval_every and run.step % run.cfg.train.eval_every == 0:
        eval_metrics = evaluate(run)
        samples = eval_samples(run) if run.cfg.eval.samples else []
        if run.logger:
            run.logger.log(eval_metrics)
            if samples:
                run.logger.log_samples(run.step, samples)
    every = run.cfg.checkpoint.every
    if (every and run.step % every == 0) or run.step == run.cfg.train.steps:
        save_and_log(run)
    return eval_metrics


def save_and_log(run: Run) -> Path | None:
    path = save(run)
    if run.logger:
        where = path or f"step_{run.step} being written in the background"
        run.logger.write(f"checkpoint: {where}")
    return path


def stop_early(run: Run, received: str | None) -> None:
    """After an agreed stop: a checkpoint of this step (unless one was just saved)."""
    every = run.cfg.checkpoint.every
    if not (every and run.step % every == 0):
        save_and_log(run)
    if run.logger:
        why = received or "a stop signal (on another rank)"
        run.logger.write(
            f"stopped at step {run.step} of {run.cfg.train.steps} on {why}: run again (or requeue) to resume "
            f"from the checkpoint; exit code {EXIT_REQUEUE}"
        )


def done_line(run: Run, last_eval: dict | None) -> str:
    line = f"done: step {run.step}, {run.tokens_seen:,} tokens seen"
    if last_eval:
        line += (
            f"; held-out NLL bound {last_eval['eval_nll']:.4f} ± {last_eval['eval_nll_stderr']:.4f} "
            f"nats/token at step {last_eval['step']}"
        )
        if "eval_bpb" in last_eval:
            line += f" ({last_eval['eval_bpb']:.3f} bits/byte)"
    return line + f"; checkpoints in {run.run_dir / 'checkpoints'}, metrics in {run.logger.path}"


def create_seed_checkpoint(cfg: Config) -> Path:
    """Write step_0 with freshly initialised weights (no optimizer) and stop: any
    layout started with checkpoint.init_from=<it> begins from identical weights."""
    run = setup(cfg)
    path = save(run, include_optimizer=False)
    run.data.close()
    if run.logger:
        run.logger.write(f"seed checkpoint: {path}")
        run.logger.close()
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    seed_only = "--seed-checkpoint" in argv
    overrides = [a for a in argv if a != "--seed-checkpoint"]
    try:
        cfg = load_config(overrides)
        preflight(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"dlm train: invalid configuration: {e}{cause_line(e)}", file=sys.stderr)
        return 2
    try:
        if seed_only:
            create_seed_checkpoint(cfg)
            return 0
        run = train(cfg)
    finally:
        parallel.shutdown_distributed()
    return EXIT_REQUEUE if run.step < cfg.train.steps else 0


if __name__ == "__main__":  # python -m pretrain.train: the `dlm train` application
    from pretrain.cli import main as dlm

    sys.exit(dlm(["train", *sys.argv[1:]]))
