"""`dlm mixture show [RECIPE] [overrides]`: what each source of a run's data mixture
contributes, before any GPU is allocated.

RECIPE is a conf/mixture/ preset (the same as the override mixture=RECIPE); the overrides are
the training run's (train.steps, train.global_batch_size, data.seq_len, cluster.*, ...). Reads
the sources' manifests only, lays the stream out for the run's data-parallel size (cluster.nodes
x tasks per node, as `dlm slurm submit` would launch it) and prints, per source: its fraction of
the run's samples, its tokens, samples per epoch, the epochs the run goes through it and its
max_epochs; then which source runs out first and when. Exit 1 when a source would exceed its
max_epochs (the run would be refused), 2 for an invalid configuration.
"""

from __future__ import annotations

import sys

USAGE = "usage: dlm mixture show [RECIPE] [key=value ...]   (RECIPE: a conf/mixture/ preset)"


def show(overrides: list[str]) -> int:
    from data import mixture, pipeline
    from pretrain.config import derive, load_config
    from pretrain.slurm import tasks_per_node

    cfg = load_config(overrides)
    if cfg.data.source not in ("shards", "megatron"):
        print(
            f"dlm mixture: data.source={cfg.data.source}: a mixture needs data.source=shards or megatron",
            file=sys.stderr,
        )
        return 2
    vocab = pipeline.describe(cfg.data)
    world_size = cfg.cluster.nodes * tasks_per_node(cfg)
    derived = derive(cfg, world_size, vocab_size=vocab.vocab_size, mask_id=vocab.mask_id)
    shares = layout_shares(cfg, vocab, derived)
    samples_per_step = derived.run_samples // cfg.train.steps
    print(
        f"dlm mixture: {cfg.data.name}, {cfg.train.steps:,} steps x {samples_per_step:,} samples of "
        f"{cfg.data.seq_len} tokens = {derived.run_samples * cfg.data.seq_len:,} tokens "
        f"(dp {derived.dp}; fractions and epochs are expectations)"
    )
    print(mixture.table(shares, cfg.data.seq_len, samples_per_step))
    try:
        mixture.check(shares)
    except mixture.MixtureError as e:
        print(f"dlm mixture: the run would be refused: {e}", file=sys.stderr)
        return 1
    return 0


def layout_shares(cfg, vocab, derived):
    """The mixture's plan for this run: the loader laid out as the run's, its epoch sizes."""
    from data import pipeline
    from data.loader import build_train_loader

    if cfg.data.source == "megatron":
        return pipeline.mixture_plan(
            cfg.data, pipeline.megatron_samples_per_epoch(cfg.data), derived.run_samples
        )
    loader = build_train_loader(
        pipeline.weighted_sources(cfg.data, derived.run_samples),
        seq_len=cfg.data.seq_len,
        micro_batch_size=derived.data_micro_batch_size,
        dp_rank=0,
        dp_size=derived.dp,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        shuffle_shards=cfg.data.shuffle_shards,
        tokenizer_sha256=vocab.tokenizer_sha256,
    )
    return pipeline.mixture_plan(cfg.data, loader.samples_per_epoch, derived.run_samples)


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from data.loader import LoaderConfigError
    from data.pipeline import DataConfigError
    from data.shards import ShardFormatError
    from parallel.topology import ConfigError

    if not argv or argv[0] != "show":
        print(USAGE, file=sys.stderr)
        return 2
    args = argv[1:]
    overrides = [f"mixture={args[0]}", *args[1:]] if args and "=" not in args[0] else args
    try:
        return show(overrides)
    except (ConfigError, HydraException, OmegaConfBaseException, DataConfigError, LoaderConfigError) as e:
        print(f"dlm mixture: invalid configuration: {e}", file=sys.stderr)
        return 2
    except ShardFormatError as e:
        print(f"dlm mixture: {e}", file=sys.stderr)
        return 2
