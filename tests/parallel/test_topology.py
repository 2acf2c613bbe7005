"""Process layout validation and launch detection (pure Python: no torch.distributed)."""

from __future__ import annotations

import itertools
import os
import re
import socket

import pytest
import torch

from parallel.topology import (
    ConfigError,
    LaunchEnv,
    PipelineLayout,
    Topology,
    _slurm_first_host,
    check_interleaving,
    context_parallel_positions,
    padded_vocab_size,
    select_device,
    stage_layer_counts,
)

# Divisible by every tp in VALID (1, 2, 3, 4, 8) and layers by every pp (1, 2, 4, 8).
DIMS = dict(num_layers=8, num_attention_heads=24, num_query_groups=24, ffn_hidden_size=240, padded_vocab=384)

VALID = [
    (1, 1, 1),
    (2, 2, 1),
    (2, 1, 2),
    (8, 1, 1),
    (8, 2, 2),
    (8, 8, 1),
    (8, 1, 8),
    (12, 3, 2),
    (16, 2, 4),
    (32, 4, 2),
]


def _build(world, **kw):
    dims = {**DIMS, **{k: kw.pop(k) for k in list(kw) if k in DIMS}}
    return Topology.build(world, **kw, **dims)


# -- valid layouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("world", "tp", "pp"), VALID)
def test_valid_layout_ranks(world, tp, pp):
    dp = world // (tp * pp)
    seen = set()
    for rank in range(world):
        topo = _build(world, tp=tp, pp=pp, rank=rank, local_rank=rank % 4)
        assert (topo.world_size, topo.tp, topo.pp, topo.dp) == (world, tp, pp, dp)
        assert topo.local_rank == rank % 4
        coords = (topo.tp_rank, topo.dp_rank, topo.pp_rank)
        assert 0 <= topo.tp_rank < tp and 0 <= topo.dp_rank < dp and 0 <= topo.pp_rank < pp
        # megatron-core default order 'tp-cp-ep-dp-pp': tp fastest, then dp, then pp
        assert rank == topo.tp_rank + tp * (topo.dp_rank + dp * topo.pp_rank)
        assert topo.is_first_stage == (topo.pp_rank == 0)
        assert topo.is_last_stage == (topo.pp_rank == pp - 1)
        seen.add(coords)
    assert seen == set(itertools.product(range(tp), range(dp), range(pp)))  # a bijection


def test_world8_tp2_pp2_gives_dp2():
    topo = _build(8, tp=2, pp=2)
    assert topo.dp == 2
    assert "dp=2" in topo.describe()
    assert _build(8, tp=2, pp=2, dp=2).dp == 2  # an explicit, consistent dp is accepted


def test_groups_match_megatron_docstring():
    """megatron.core.parallel_state.initialize_model_parallel's documented example:
    16 GPUs, tensor parallel 2, pipeline parallel 4 (so data parallel 2)."""
    tensor = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    data = [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    pipeline = [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    topos = [_build(16, tp=2, pp=4, rank=r) for r in range(16)]

    def groups(varying: str) -> list[list[int]]:
        fixed = [a for a in ("tp_rank", "dp_rank", "pp_rank") if a != varying]
        out: dict[tuple, list[int]] = {}
        for t in topos:
            out.setdefault(tuple(getattr(t, a) for a in fixed), []).append(t.rank)
        return sorted(sorted(g) for g in out.values())

    assert groups("tp_rank") == sorted(tensor)
    assert groups("dp_rank") == sorted(data)
    assert groups("pp_rank") == sorted(pipeline)
    for g in pipeline:  # stage order within a pipeline group follows the rank
        assert [topos[r].pp_rank for r in g] == [0, 1, 2, 3]


# -- invalid layouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("world", "kw", "keys"),
    [
        (
            8,
            dict(tp=8, num_attention_heads=12, num_query_groups=4),
            ["parallel.tp", "model.num_attention_heads"],
        ),
        (
            6,
            dict(tp=3, num_attention_heads=4, num_query_groups=4),
            ["parallel.tp", "model.num_attention_heads"],
        ),
        (4, dict(tp=4, num_attention_heads=8, num_query_groups=2), ["parallel.tp", "model.num_query_groups"]),
        (4, dict(tp=4, ffn_hidden_size=250), ["parallel.tp", "model.ffn_hidden_size"]),
        (8, dict(tp=8, padded_vocab=260), ["parallel.tp", "model.make_vocab_size_divisible_by"]),
        (2, dict(pp=2, num_layers=3), ["parallel.pp", "model.num_layers"]),
        (8, dict(pp=8, num_layers=12), ["parallel.pp", "model.num_layers"]),
        (6, dict(tp=2, pp=2), ["parallel.tp", "parallel.pp"]),
        (4, dict(tp=8), ["parallel.tp"]),
        (8, dict(tp=2, dp=3), ["parallel.dp"]),
        (8, dict(tp=2, pp=2, dp=4), ["parallel.dp"]),
        (8, dict(tp=0), ["parallel.tp"]),
        (8, dict(tp=-2), ["parallel.tp"]),
        (8, dict(pp=0), ["parallel.pp"]),
    ],
)
def test_invalid_layout_names_keys(world, kw, keys):
    with pytest.raises(ConfigError) as e:
        _build(world, **kw)
    for key in keys:
        assert key in str(e.value), str(e.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# -- padded vocabulary ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("vocab", "div", "expected"),
    [
        (260, 128, 384),
        (256, 128, 256),
        (257, 128, 384),
        (1, 1, 1),
        (50257, 128, 50304),
        (128256, 128, 128256),
    ],
)
def test_padded_vocab_size_examples(vocab, div, expected):
    assert padded_vocab_size(vocab, div) == expected


def test_padded_vocab_size_is_smallest_multiple():
    for vocab in range(1, 600, 7):
        for div in (1, 2, 3, 8, 64, 128):
            p = padded_vocab_size(vocab, div)
            assert p % div == 0 and vocab <= p < vocab + div


# -- launch detection ------------------------------------------------------------------------------------
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name in LAUNCH_VARS or name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_detect_torchrun(clean_env):
    for name, value in dict(
        RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node3", MASTER_PORT="1234"
    ).items():
        clean_env.setenv(name, value)
    assert LaunchEnv.detect() == LaunchEnv(
        rank=5, world_size=8, local_rank=1, master_addr="node3", master_port=1234
    )


def test_detect_torchrun_defaults(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    env = LaunchEnv.detect()
    assert (env.rank, env.world_size, env.local_rank) == (0, 2, 0)
    assert env.master_addr == "127.0.0.1"
    assert 0 < env.master_port < 65536


def test_torchrun_wins_over_slurm(clean_env):
    """torchrun started by srun: the per-process torchrun variables are the truth."""
    for name, value in dict(
        RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="a", MASTER_PORT="2000",
        SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_NODELIST="b[1-2]", SLURM_JOB_ID="9",
    ).items():  # fmt: skip
        clean_env.setenv(name, value)
    assert LaunchEnv.detect() == LaunchEnv(3, 4, 3, "a", 2000)


def _slurm(env, procid, job="123456", nodelist="gpu[003-010,12],cpu1"):
    env.setenv("SLURM_PROCID", str(procid))
    env.setenv("SLURM_NTASKS", "16")
    env.setenv("SLURM_LOCALID", str(procid % 8))
    env.setenv("SLURM_JOB_NODELIST", nodelist)
    env.setenv("SLURM_JOB_ID", job)
    return LaunchEnv.detect()


def test_detect_slurm_without_master_addr(clean_env):
    env = _slurm(clean_env, 11)
    assert (env.rank, env.world_size, env.local_rank) == (11, 16, 3)
    assert env.master_addr == "gpu003"
    assert 1024 <= env.master_port < 65536
    # every task of the job derives the same rendezvous address and port
    assert _slurm(clean_env, 0) == LaunchEnv(0, 16, 0, env.master_addr, env.master_port)
    # another job (e.g. a second job on the same node) gets another port
    assert _slurm(clean_env, 0, job="123457").master_port != env.master_port


def test_detect_slurm_with_master_addr(clean_env):
    clean_env.setenv("MASTER_ADDR", "10.0.0.7")
    clean_env.setenv("MASTER_PORT", "29999")
    env = _slurm(clean_env, 2)
    assert env == LaunchEnv(2, 16, 2, "10.0.0.7", 29999)


def test_detect_single_process(clean_env):
    env = LaunchEnv.detect()
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert env.master_addr == "127.0.0.1"
    with socket.socket() as s:  # the port is free to bind
        s.bind(("127.0.0.1", env.master_port))


def test_partial_launch_env_is_single_process(clean_env):
    clean_env.setenv("RANK", "1")  # no WORLD_SIZE
    clean_env.setenv("SLURM_PROCID", "1")  # no SLURM_NTASKS
    env = LaunchEnv.detect()
    assert (env.rank, env.world_size) == (0, 1)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("gpu[003-010,12],cpu1", "gpu003"),
        ("node7", "node7"),
        ("a[1,3]", "a1"),
        ("", "127.0.0.1"),
        ("cpu1,gpu[1-2]", "cpu1"),
        ("gpu-node[07-09]", "gpu-node07"),
        ("x[5]", "x5"),
    ],
)
def test_slurm_first_host(nodelist, first):
    assert _slurm_first_host(nodelist) == first


@pytest.mark.parametrize(
    ("visible", "expected"), [(1, [0, 0, 0, 0, 0]), (4, [0, 1, 2, 3, 0]), (2, [0, 1, 0, 1, 0])]
)
def test_each_process_binds_its_local_rank_modulo_the_visible_gpus(monkeypatch, visible, expected):
    """Under Slurm with --gpus-per-task=1 a process sees one GPU (index 0) whatever its local
    rank; torch.cuda.set_device(local_rank) would fail from local rank 1 on."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for local_rank in range(5):
        select_device(local_rank)
    assert chosen == expected


# -- the pipeline split (parallel.vpp, first/last_stage_layers, embedding/loss_as_layer) ------
def test_stage_layer_counts_equal_megatrons_split_and_refuse_what_it_refuses():
    """Our pure check agrees with megatron-core's get_num_layers_to_build (and the checks of
    TransformerConfig) on every combination below: the same layers per model chunk, or both
    refuse. (At pp=1 an uneven first/last stage or vpp > 1, which megatron lets through
    meaning nothing, is refused here.)"""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    grid = itertools.product(
        [4, 6, 12], [1, 2, 3, 4], [1, 2, 3], [None, 1, 4], [None, 2, 3], [False, True], [False, True]
    )
    compared = refused = 0
    for layers, pp, vpp, first, last, embedding, loss in grid:
        if pp == 1 and (first or last or vpp > 1):
            continue
        split = dict(first=first, last=last, embedding_as_layer=embedding, loss_as_layer=loss)
        try:
            ours = stage_layer_counts(layers, pp, vpp, **split)
        except ConfigError:
            ours = None
        try:
            config = TransformerConfig(
                num_layers=layers,
                hidden_size=8,
                num_attention_heads=2,
                pipeline_model_parallel_size=pp,
                pipeline_dtype=torch.float32,
                virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                num_layers_in_first_pipeline_stage=first,
                num_layers_in_last_pipeline_stage=last,
                account_for_embedding_in_pipeline_split=embedding,
                account_for_loss_in_pipeline_split=loss,
            )
            chunks = [None] if vpp == 1 else range(vpp)
            theirs = [
                [get_num_layers_to_build(config, vp_stage=v, pp_rank=r) for v in chunks] for r in range(pp)
            ]
            theirs = theirs if min(map(min, theirs)) >= 0 else None
        except (ValueError, AssertionError):
            theirs = None
        assert ours == theirs, (layers, pp, vpp, split, ours, theirs)
        compared, refused = compared + 1, refused + (ours is None)
    assert compared > 500 and 0 < refused < compared  # both kinds of case were exercised


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        (dict(pp=1, pipeline=PipelineLayout(vpp=2)), "parallel.vpp=2"),
        (dict(pp=2, pipeline=PipelineLayout(vpp=3)), "parallel.vpp=3"),
        (dict(pp=2, pipeline=PipelineLayout(first_stage_layers=9)), "first_stage_layers=9"),
        (
            dict(pp=2, pipeline=PipelineLayout(first_stage_layers=2, embedding_as_layer=True)),
            "embedding_as_layer",
        ),
    ],
)
def test_pipeline_splits_that_cannot_be_built_name_their_keys(kw, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        Topology.build(2, **kw, **DIMS)


def test_interleaved_schedule_needs_whole_microbatch_groups():
    check_interleaving(pp=2, vpp=2, group_size=None, num_microbatches=4)  # groups of 2: fine
    check_interleaving(pp=2, vpp=2, group_size=3, num_microbatches=5)  # 3 + 2 >= pp: fine
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        check_interleaving(pp=4, vpp=2, group_size=None, num_microbatches=2)
    with pytest.raises(ConfigError, match="a group of 1 < pp"):
        check_interleaving(pp=2, vpp=2, group_size=3, num_microbatches=4)


# -- context parallelism (parallel.cp) ---------------------------------------------------------
def test_context_parallel_ranks_follow_megatrons_tp_cp_dp_pp_order():
    """world 16 = tp 2 x cp 2 x dp 2 x pp 2: tp fastest, then cp, dp, pp."""
    ranks = [Topology.build(16, tp=2, pp=2, cp=2, rank=r, **DIMS) for r in range(16)]
    assert ranks[0].dp == 2
    assert [(t.tp_rank, t.cp_rank, t.dp_rank, t.pp_rank) for t in ranks[:8:3]] == [
        (0, 0, 0, 0),
        (1, 1, 0, 0),
        (0, 1, 1, 0),
    ]
    assert [t.pp_rank for t in ranks] == [0] * 8 + [1] * 8
    with pytest.raises(ConfigError, match=r"parallel\.cp=4"):
        Topology.build(12, tp=2, cp=4, **DIMS)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_context_parallel_positions_are_zig_zag_halves_covering_the_sequence_once(cp):
    """Rank r holds chunks r and 2cp-1-r of 2cp: together every position exactly once, and
    under a causal mask each rank would attend to the same number of keys."""
    length = 32
    parts = [context_parallel_positions(length, cp, rank) for rank in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(length))
    chunk = length // (2 * cp)
    assert parts[0][:chunk].tolist() == list(range(chunk)) and parts[0][-1].item() == length - 1
    causal_work = {int((positions + 1).sum()) for positions in parts}
    assert len(causal_work) == 1
