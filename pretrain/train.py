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
from data.shards import ShardFormatError
from parallel.topology import ConfigError
from pretrain.config import Config, Derived, derive, load_config, model_dims, resolve_checkpoint, to_yaml
from pretrain.metrics import MetricsLogger, peak_flops_per_device
from pretrain.objective import diffusion_loss, logit_positions, mask_tokens, sample_t, shift_maskable

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
    logger: MetricsLogger | None = None
    peak_flops: float = 0.0
    stage_keys: tuple[str, ...] = ()  # what this pipeline stage needs of a microbatch
    reads_data: bool = False  # this rank reads for its tensor-parallel group

    @property
    def is_logging_rank(self) -> bool:
        return self.topo.rank == 0


# -- the objective, as megatron's forward_step / loss_func pair ----------------------------
def forward_step(run: Run, seed: int, batch: dict, model):
    """Noise a microbatch (a function of seed and global sample indices only, so every
    tensor/pipeline rank draws the same masks) and run this pipeline stage. A middle
    stage gets no tokens (its input is the previous stage's output) and computes no loss."""
    segments = batch.get("segments")
    if "tokens" not in batch:
        return model(None, segments=segments), _no_loss
    obj = run.cfg.objective
    tokens, index = batch["tokens"], batch["index"]
    t = sample_t(
        index,
        seed=seed,
        method=obj.t_sampling,
        eps=obj.eps,
        global_batch_size=run.cfg.train.global_batch_size,
    ).to(tokens.device)
    shift = run.cfg.model.logit_shift
    maskable = shift_maskable(tokens.shape, tokens.device) if shift else None
    noisy, is_masked = mask_tokens(
        tokens, t, index, seed=seed, mask_id=run.derived.mask_id, maskable=maskable
    )
    positions = logit_positions(is_masked, shift=shift)
    output = model(noisy, logit_positions=positions if obj.logits == "masked" else None, segments=segments)
    return output, partial(loss_fn, run, tokens, is_masked, positions, t)


def _no_loss(output):
    raise RuntimeError("a middle pipeline stage has no loss: megatron calls loss_fn on the last stage only")


def loss_fn(run: Run, tokens, is_masked, positions, t, output):
    obj = run.cfg.objective
    logits = output if obj.logits == "masked" else output.transpose(0, 1)[positions]
    logits = logits.reshape(-1, logits.shape[-1])
    correct = run.engine.correct(logits, tokens[is_masked]).sum()  # before the in-place CE
    loss_sum, count = diffusion_loss(
        logits,
        tokens,
        is_masked,
        t,
        weighting=obj.weighting,
        normalization=obj.normalization,
        cross_entropy=run.engine.cross_entropy,
    )
    stats = torch.stack(
        [loss_sum.detach().double(), count.double(), correct.double(), is_masked.sum().double()]
    )
    return loss_sum, count, {"stats": stats}


# -- one optimizer step ----------------------------------------------------------------------
def stage_data_keys(cfg: Config, topo: parallel.Topology) -> tuple[str, ...]:
    """What this rank's pipeline stage needs of a microbatch: tokens on the first (input)
    and last (targets) stage, segments on every stage under document attention."""
    keys = ("tokens",) if topo.is_first_stage or topo.is_last_stage else ()
    return keys + ("segments",) if cfg.model.attention == "document" else keys


def microbatches(run: Run, first_index: int, samples):
    """This data-parallel rank's share of the global batch starting at `first_index`.
    One rank per tensor-parallel group reads (and only on stages that need data); the
    group receives its microbatch by broadcast, as in Megatron-LM."""
    d, mbs = run.derived, run.cfg.train.micro_batch_size
    start = first_index + run.topo.dp_rank * d.samples_per_dp_rank
    shape = (mbs, run.cfg.data.seq_len)
    for index in torch.arange(start, start + d.samples_per_dp_rank, device="cpu").split(mbs):
        batch = samples(index) if run.reads_data else None
        yield {**run.engine.broadcast_batch(batch, run.stage_keys, shape), "index": index}


def sum_reports(reports: list[dict], device: torch.device) -> torch.Tensor:
    """This rank's microbatch statistics summed (zeros on stages without a loss)."""
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for report in reports:
        total += report["stats"]
    return total


def run_schedule(run: Run, first_index: int, samples, seed: int, forward_only: bool):
    """Forward (and backward) over one global batch; returns global-sum statistics
    [loss_sum, loss_count, correct, masked]."""
    reports = run.engine.forward_backward(
        partial(forward_step, run, seed),
        microbatches(run, first_index, samples),
        num_microbatches=run.derived.num_microbatches,
        seq_len=run.cfg.data.seq_len,
        micro_batch_size=run.cfg.train.micro_batch_size,
        forward_only=forward_only,
    )
    return run.engine.global_sum(sum_reports(reports, run.topo.device)).cpu()


def train_step(run: Run) -> dict:
    """One optimizer step over one global batch."""
    cfg, d = run.cfg, run.derived
    step = run.step + 1
    start = time.perf_counter()
    run.engine.train(True)
    stats = run_schedule(run, run.consumed_samples, run.data.train, cfg.seed, False)
    update = run.engine.optimizer_step(step)
    elapsed = time.perf_counter() - start
    run.step, run.consumed_samples = step, run.consumed_samples + cfg.train.global_batch_size

    loss_sum, count, correct, masked = stats.tolist()
    scored = masked if cfg.objective.logits == "masked" else d.tokens_per_step
    flops = d.tokens_per_step * d.flops_per_token + scored * d.flops_per_scored_token
    return {
        "step": step,
        "loss": loss_sum / max(count, 1),
        "masked_acc": correct / max(masked, 1),
        "masked_frac": masked / d.tokens_per_step,
        "grad_norm": update.grad_norm,
        "lr": update.lr,
        "weight_decay": update.weight_decay,
        "update_applied": update.applied,
        "tokens": run.consumed_samples * cfg.data.seq_len,
        "step_time": elapsed,
        "tokens_per_s": d.tokens_per_step / elapsed,
        "mfu": flops / elapsed / (run.peak_flops * d.world_size),
    }


def evaluate(run: Run) -> dict:
    """Loss on held-out windows with fixed noise (the same every evaluation)."""
    run.engine.train(False)
    total = torch.zeros(4, dtype=torch.float64, device="cpu")
    gbs = run.cfg.train.global_batch_size
    with torch.no_grad():
        for b in range(run.cfg.train.eval_batches):
            total += run_schedule(run, b * gbs, run.data.eval, run.cfg.seed + EVAL_SEED_OFFSET, True)
    loss_sum, count, correct, masked = total.tolist()
    return {
        "step": run.step,
        "eval_loss": loss_sum / max(count, 1),
        "eval_masked_acc": correct / max(masked, 1),
    }


# -- set-up, checkpoints, loop -------------------------------------------------------------
def preflight(cfg: Config) -> tuple[pipeline.Vocabulary, Derived, dict]:
    """Every check that needs no process group and reads no data beyond dataset
    manifests, so a bad config or layout fails in seconds, naming the key."""
    try:
        vocab = pipeline.describe(cfg.data)
    except (pipeline.DataConfigError, ShardFormatError) as e:
        raise ConfigError(str(e)) from e
    if cfg.checkpoint.init_from:
        resolve_checkpoint(Path(cfg.checkpoint.init_from))  # exists, names a complete checkpoint
    world_size = parallel.LaunchEnv.detect().world_size
    derived = derive(cfg, world_size, vocab_size=vocab.vocab_size, mask_id=vocab.mask_id)
    try:
        pipeline.check_layout(
            cfg.data, vocab, seed=cfg.seed, micro_batch_size=cfg.train.micro_batch_size, dp_size=derived.dp
        )
    except pipeline.DataConfigError as e:
        raise ConfigError(str(e)) from e
    m = cfg.model
    layout = dict(
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        padded_vocab=derived.padded_vocab_size,
    )
    parallel.Topology.build(world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp, **layout)
    return vocab, derived, layout


def setup(cfg: Config) -> Run:
    vocab, derived, layout = preflight(cfg)
    topo = parallel.init_distributed(
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp, seed=cfg.seed, model_dims=layout
    )
    bf16 = derived.precision == "bf16"
    model = parallel.build_model(model_dims(cfg, derived.padded_vocab_size), topo, bf16=bf16)
    engine = parallel.build_engine(
        model, topo, cfg.optim, train_steps=cfg.train.steps, distributed=cfg.parallel.distributed_optimizer
    )
    run = Run(cfg, derived, topo, engine, None, Path(cfg.run.dir))
    run.stage_keys = stage_data_keys(cfg, topo)
    run.reads_data = topo.tp_rank == 0 and bool(run.stage_keys)
    run.data = build_data(run, vocab, resume(run))
    engine.barrier()  # ranks measure the matmul peak together, as they will train
    run.peak_flops, peak_source = peak_flops_per_device(cfg.cluster.peak_tflops)
    param_groups = engine.describe_param_groups()  # collective
    if run.is_logging_rank:
        start_logging(run, f"peak {run.peak_flops / 1e12:.3f} TFLOP/s/device ({peak_source})", param_groups)
    return run


def build_data(run: Run, vocab: pipeline.Vocabulary, data_state: dict | None) -> pipeline.TrainData:
    """The data stream on ranks that read for their tensor-parallel group, else nothing."""
    if not run.reads_data:
        return pipeline.NoData()
    return pipeline.build(
        run.cfg.data,
        vocab,
        seed=run.cfg.seed,
        micro_batch_size=run.cfg.train.micro_batch_size,
        dp_rank=run.topo.dp_rank,
        dp_size=run.topo.dp,
        state=data_state,
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
    (run.run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run.run_dir / "derived.json").write_text(json.dumps(derived.as_dict(), indent=2))
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
    total_samples = cfg.train.steps * cfg.train.global_batch_size
    return (
        f"dlm train: {run.topo.describe()} {derived.precision}, layers {layers}  model {cfg.model.name} "
        f"({p['total'] / 1e6:.2f}M params, {p['layers'] / 1e6:.2f}M in layers)  "
        f"data {cfg.data.name}: {run.data.summary}, seq {cfg.data.seq_len}\n"
        f"  {run.data.epoch_report(total_samples)}\n"
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
        data_state = state.get("data_state")
        source = f"resumed from {latest} (step {run.step})"
        if state["schedule_changes"]:
            source += "; the LR/weight-decay schedule follows this config: " + ", ".join(
                state["schedule_changes"]
            )
    elif ckpt_cfg.init_from:
        path = resolve_checkpoint(Path(ckpt_cfg.init_from))
        parallel.load_checkpoint(path, run.engine, load_optimizer=False)
        source = f"initialised from the weights of {path}"
    else:
        return None
    if run.is_logging_rank:
        print(f"dlm train: {source}", flush=True)
    return data_state


def save(run: Run, *, include_optimizer: bool = True) -> Path:
    ckpt_dir = run.run_dir / "checkpoints"
    path = parallel.save_checkpoint(
        ckpt_dir / f"step_{run.step}",
        run.engine,
        state={
            "step": run.step,
            "consumed_samples": run.consumed_samples,
            "data_state": run.data.state_dict(),
            "derived": run.derived.as_dict(),
        },
        config_yaml=to_yaml(run.cfg),
        include_optimizer=include_optimizer,
    )
    parallel.prune_checkpoints(ckpt_dir, run.cfg.checkpoint.keep)
    return path


def train(cfg: Config) -> Run:
    run = setup(cfg)
    t = cfg.train
    try:
        if run.step >= t.steps and run.is_logging_rank:
            run.logger.write(f"dlm train: already at step {run.step} >= train.steps={t.steps}")
        while run.step < t.steps:
            metrics = train_step(run)
            if run.logger:
                run.logger.log(metrics)
            if t.eval_every and run.step % t.eval_every == 0:
                eval_metrics = evaluate(run)
                if run.logger:
                    run.logger.log(eval_metrics)
            every = cfg.checkpoint.every
            if (every and run.step % every == 0) or run.step == t.steps:
                path = save(run)
                if run.logger:
                    run.logger.write(f"checkpoint: {path}")
        if run.logger:
            run.logger.write(
                f"done: step {run.step}, {run.consumed_samples * cfg.data.seq_len:,} tokens seen; "
                f"checkpoints in {run.run_dir / 'checkpoints'}, metrics in {run.logger.path}"
            )
    finally:
        run.data.close()
        if run.logger:
            run.logger.close()
    return run


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
        cause = f"\n  {e.__cause__}" if e.__cause__ else ""
        print(f"dlm train: invalid configuration: {e}{cause}", file=sys.stderr)
        return 2
    try:
        if seed_only:
            create_seed_checkpoint(cfg)
        else:
            train(cfg)
    finally:
        parallel.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
