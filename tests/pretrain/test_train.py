"""The trainer end to end, as users launch it, under every layout.

One seed checkpoint gives every run the same initial weights. A single-process
reference run is the ground truth; TP=2, PP=2, DP=2 and TP2xPP2 runs must
reproduce its losses, gradient norms and final weights to fp32 tolerance; a
resumed run must reproduce it exactly; checkpoints saved at TP=2 must resume at
TP=1 and at DP=2 and continue identically. Each layout is launched once and all
its assertions share that launch.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.dist import QUIET, launch, read_metrics, spawn

pytestmark = pytest.mark.slow

STEPS = 6
# The harder options on purpose: 'masked' normalization must be exact over microbatches
# and data-parallel ranks; stratified t depends on the global batch; tied embeddings
# cross pipeline stages; QKV bias is the Qwen2 path. The curriculum uses every scheduled
# value: a moving t band, random-length steps (5 of the 6 with seed 7: lengths 40, 64,
# 22, 2, 42, 2 -- even, as sequence parallelism at tp=2 needs -- so pipeline shapes
# change per step), annealed noise on the MASK
# embedding, complementary pairs, causal-to-bidirectional attention annealing (a mask
# tensor on every stage); the resume at step 3 lands mid-schedule.
CURRICULUM = [
    "curriculum.t_min.values=[0.05,0.3]",
    "curriculum.t_min.at=[0,0.5]",
    "curriculum.t_min.interp=linear",
    "curriculum.random_length_prob.values=[0.3]",
    "curriculum.length_multiple=2",
    "curriculum.mask_noise_std.values=[0.5,0.0]",
    "curriculum.mask_noise_std.at=[0,0.5]",
    "curriculum.mask_noise_std.interp=cosine",
    "curriculum.complementary=true",
    "curriculum.bidirectional_ratio.values=[0.2,1.0]",
    "curriculum.bidirectional_ratio.at=[0,0.6]",
    "curriculum.bidirectional_ratio.interp=linear",
]
CONFIG = [
    "model=tiny",
    "model.num_layers=4",  # two model chunks of one layer per stage at pp=2 x vpp=2
    "model.tie_embeddings=true",
    "model.qkv_bias=true",
    "objective.normalization=masked",
    "objective.t_sampling=stratified",
    "data.max_bytes=300000",
    f"train.steps={STEPS}",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=2",
    "checkpoint.every=3",
    "checkpoint.keep=0",
    "seed=7",
    *CURRICULUM,
    *QUIET,
]
# Activation recompute must not change results either: exercised on two layouts. tp=2 runs
# with sequence parallelism (its default), dp=2 with the overlapped gradient reduction and
# parameter all-gather over small buckets (the model's ~50 tensors in ~25 buckets);
# tp2pp2vpp2 is megatron's interleaved schedule (2 model chunks per stage, 4 microbatches
# per step in groups of 2) under sequence parallelism; pp2uneven splits 1 + 3 layers.
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "model.recompute=selective"]),
    "dp2": (2, ["model.recompute=full", "parallel.bucket_size=10000"]),
    "tp2pp2vpp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2"]),
    "pp2uneven": (2, ["parallel.pp=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=3"]),
}
RTOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def seed_checkpoint(root) -> Path:
    launch(1, ["--seed-checkpoint", *CONFIG, f"run.dir={root / 'seed'}"])
    return root / "seed" / "checkpoints" / "step_0"


@pytest.fixture(scope="module")
def reference(root, seed_checkpoint) -> Path:
    run_dir = root / "reference"
    overrides = [
        *CONFIG,
        "logging.wandb=offline",
        f"run.dir={run_dir}",
        f"checkpoint.init_from={seed_checkpoint}",
    ]
    launch(1, overrides, env={"WANDB_API_KEY": "", "HOME": str(root)})  # offline: no key, no ~/.netrc
    return run_dir


@pytest.fixture(scope="module")
def layout_runs(root, seed_checkpoint) -> dict[str, Path]:
    runs = {}
    for name, (nproc, overrides) in LAYOUTS.items():
        run_dir = root / name
        launch(nproc, [*CONFIG, *overrides, f"run.dir={run_dir}", f"checkpoint.init_from={seed_checkpoint}"])
        runs[name] = run_dir
    return runs


def _resume_copy(source_run: Path, step: int, dest: Path) -> Path:
    """A run directory holding only `source_run`'s checkpoint of `step`."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(source_run / "checkpoints" / f"step_{step}", dest / "checkpoints" / f"step_{step}")
    (dest / "checkpoints" / "latest").write_text(f"step_{step}")
    return dest


def _final_weights(paths: list[Path], run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Every checkpoint's weights, loaded at TP=1/PP=1 in one process (resharding)."""
    return spawn(_load_weights, 1, [str(p) for p in paths], str(run_dir), timeout=600)[0]


def _load_weights(paths: list[str], run_dir: str) -> list[dict[str, torch.Tensor]]:
    from parallel import load_checkpoint, shutdown_distributed
    from pretrain.config import load_config
    from pretrain.train import setup

    run = setup(load_config([*CONFIG, f"run.dir={run_dir}"]))
    out = []
    for path in paths:
        load_checkpoint(Path(path), run.engine, load_optimizer=False)
        state = run.engine.module.state_dict()
        out.append(
            {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
        )
    run.logger.close()
    shutdown_distributed()
    return out


def _wandb_history(run_dir: Path) -> list[dict]:
    """History rows of an offline wandb run, read from its record stream (a ':W&B' header,
    then 32 KiB blocks of records: crc32, length, type FULL/FIRST/MIDDLE/LAST, protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, partial, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = payload if kind in (1, 2) else partial + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def _assert_same_steps(rows: list[dict], expected: list[dict], what: str) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in expected], what
    for got, want in zip(rows, expected, strict=True):
        for key in ("loss", "grad_norm", "masked_acc", "lr", "weight_decay"):
            assert math.isclose(got[key], want[key], rel_tol=RTOL, abs_tol=1e-7), (
                f"{what}: step {got['step']} {key} {got[key]!r} != {want[key]!r}"
            )
        curriculum = {k: v for k, v in want.items() if k.startswith("curriculum/")}
        assert curriculum and {k: got[k] for k in curriculum} == curriculum, f"{what}: step {got['step']}"


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff < 1e-5, f"{what}: {name} differs by {diff}"


def test_reference_run_writes_metrics_and_checkpoints(reference):
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "masked_acc", "grad_norm", "mfu"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert rows[0]["lr"] < rows[1]["lr"]  # warmup
    lengths = [r["curriculum/length"] for r in rows]
    assert 64 in lengths and min(lengths) < 64  # full and cut steps both exercised
    assert [r["tokens"] for r in rows] == [8 * sum(lengths[: i + 1]) for i in range(STEPS)]
    noise = [r["curriculum/mask_noise_std"] for r in rows]
    assert noise[0] == 0.5 and noise[-1] == 0.0 and noise == sorted(noise, reverse=True)
    ratio = [r["curriculum/bidirectional_ratio"] for r in rows]  # 0.2 -> 1 over 60%: annealed, then plain
    assert ratio[0] == 0.2 and 0.2 < ratio[2] < 1 and ratio[-1] == 1.0
    t_min = [r["curriculum/t_min"] for r in rows]  # linear 0.05 -> 0.3 over the first half
    assert t_min[0] == 0.05 and t_min[3:] == [0.3] * 3 and t_min[:4] == sorted(set(t_min[:4]))
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS}"
    for step in (3, STEPS):
        assert (ckpts / f"step_{step}" / "state.json").exists()
        assert (ckpts / f"step_{step}" / "config.yaml").read_text() == (reference / "config.yaml").read_text()
    assert not list(ckpts.glob("*.tmp"))


def test_reference_run_logs_to_wandb_offline(reference):
    history = [r for r in _wandb_history(reference) if "loss" in r]
    assert [h["_step"] for h in history] == [r["step"] for r in read_metrics(reference)]
    assert [h["loss"] for h in history] == [r["loss"] for r in read_metrics(reference)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, layout_runs):
    """Same losses, gradient norms and masked accuracy at every step as one process."""
    _assert_same_steps(read_metrics(layout_runs[layout]), read_metrics(reference), layout)


def test_layouts_end_with_the_same_weights(root, reference, layout_runs):
    names = list(LAYOUTS)
    paths = [root / "seed" / "checkpoints" / "step_0", reference / "checkpoints" / f"step_{STEPS}"]
    paths += [layout_runs[n] / "checkpoints" / f"step_{STEPS}" for n in names]
    seed, *weights = _final_weights(paths, root / "loader")
    moved = max((weights[0][k] - seed[k]).abs().max().item() for k in seed)
    assert moved > 1e-4, "training did not change the weights: the comparison would be vacuous"
    for name, w in zip(names, weights[1:], strict=True):
        _assert_same_weights(w, weights[0], name)


def test_initial_weights_are_a_function_of_the_seed_and_not_of_tp(root, seed_checkpoint):
    """`seed=` decides the initial weights: the same seed twice and at TP=2 (full master
    weights, then split) gives the same weights; another seed does not."""
    names = ("again", "tp2", "other_seed")
    for name, nproc, extra in zip(names, (1, 2, 1), ([], ["parallel.tp=2"], ["seed=1"]), strict=True):
        launch(nproc, ["--seed-checkpoint", *CONFIG, *extra, f"run.dir={root / ('init_' + name)}"])
    paths = [root / f"init_{n}" / "checkpoints" / "step_0" for n in names]
    first, *rest = _final_weights([seed_checkpoint, *paths], root / "init_load")
    got = dict(zip(names, rest, strict=True))
    for name in ("again", "tp2"):
        for key in first:
            assert torch.equal(got[name][key], first[key]), (name, key)
    random_init = [k for k in first if "weight" in k and "norm" not in k]
    assert random_init and all(not torch.equal(got["other_seed"][k], first[k]) for k in random_init)


def test_exact_resume(root, reference):
    """6 steps straight == 3 steps + save + resume + 3 steps (losses and weights)."""
    run_dir = _resume_copy(reference, 3, root / "resumed")
    proc = launch(1, [*CONFIG, f"run.dir={run_dir}"])
    assert "resumed from" in proc.stdout and "step_3" in proc.stdout
    rows = read_metrics(run_dir)
    _assert_same_steps(rows, read_metrics(reference)[3:], "resume")
    for got, want in zip(rows, read_metrics(reference)[3:], strict=True):
        assert got["loss"] == want["loss"], "a single-process resume must be bit-exact"
    a, b = _final_weights(
        [run_dir / "checkpoints" / f"step_{STEPS}", reference / "checkpoints" / f"step_{STEPS}"], root / "l2"
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _train_with_slow_background_writes(overrides: list[str], crash_at_step: int) -> list[tuple[str, int]]:
    """One rank of a run whose background checkpoint writers first sleep 2 s. Returns
    (checkpoint, step after which it was published) for each. At the start of step
    `crash_at_step` (0: never) the rank crashes, its writer process with it."""
    import time

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    import parallel
    from parallel import checkpoint
    from pretrain import train as trainer
    from pretrain.config import load_config

    write, train_step, published = (
        FileSystemWriterAsync.write_preloaded_data_multiproc,
        trainer.train_step,
        [],
    )
    record = trainer.checkpoint_published

    def slow_write(*args, **kwargs):
        time.sleep(2)
        return write(*args, **kwargs)

    def crashing_step(run):
        if run.step + 1 == crash_at_step:
            for call in checkpoint._BACKGROUND.async_calls:  # the writer dies mid-save too
                call.async_caller.process.kill()
            raise RuntimeError("injected crash")
        return train_step(run)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow_write)
    trainer.train_step = crashing_step
    trainer.checkpoint_published = lambda run, path: (
        published.append((path.name, run.step)),
        record(run, path),
    )
    try:
        trainer.train(load_config(overrides))
    finally:
        parallel.shutdown_distributed()
    return published


def test_background_saves_overlap_training_resume_exactly_and_survive_a_crash(
    root, seed_checkpoint, reference
):
    """checkpoint.async_save at DP=2 (fully parallel writes): steps go on while a checkpoint
    is written, training is unchanged; a crash while step 4's checkpoint is being written
    leaves `latest` on step 2 (written in the background), which resumes exactly."""
    base = [
        *CONFIG,
        "checkpoint.every=2",
        "checkpoint.async_save=true",
        f"checkpoint.init_from={seed_checkpoint}",
    ]
    steady, crashed = root / "async", root / "async_crash"
    published = spawn(_train_with_slow_background_writes, 2, [*base, f"run.dir={steady}"], 0, timeout=600)[0]
    assert [name for name, _ in published] == ["step_2", "step_4", "step_6"], published
    assert published[0][1] > 2, f"step 2's checkpoint was published after step {published[0][1]}: no overlap"
    _assert_same_steps(read_metrics(steady), read_metrics(reference), "async saves vs reference")

    with pytest.raises(AssertionError, match="injected crash"):
        spawn(_train_with_slow_background_writes, 2, [*base, f"run.dir={crashed}"], 5, timeout=600)
    checkpoints = crashed / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_2"
    assert (checkpoints / "step_4.tmp").is_dir() and not (checkpoints / "step_4").exists()
    proc = launch(2, [*base, "checkpoint.async_save=false", f"run.dir={crashed}"])
    assert "resumed from" in proc.stdout and "step_2" in proc.stdout
    _assert_same_steps(read_metrics(crashed)[-4:], read_metrics(reference)[2:], "resume after a crash")


BLOCK_DIFFUSION = [
    *(
        o
        for o in CONFIG
        if not o.startswith(("curriculum.bidirectional", "curriculum.random", "objective.t_s", "objective.n"))
    ),
    "curriculum.block_size.values=[1,4,8,0]",  # blocks of 1, 1, 4, 8 tokens, then the full sequence
    "curriculum.block_size.at=[0,0.3,0.5,0.6]",
    "curriculum.ar_weight.values=[0.0,1.0]",  # the hybrid loss from step 3: causal clean copy
    "curriculum.ar_weight.at=[0,0.3]",
    "curriculum.dlm_weight.values=[0.3]",
    "model.attention=document",
    "model.logit_shift=true",
]


def test_block_diffusion_schedule_under_tp2_and_pp2_equals_one_process(root, seed_checkpoint):
    """A block-size schedule over [x_t, x0] (2L tokens through the pipeline, block masks
    intersected with documents on every stage, rotary positions repeated, logit shift,
    complementary pairs, embedding noise) gives the single process's losses at TP=2 and
    PP=2, and switches to full-sequence steps when the schedule says so; from step 3 the
    hybrid loss adds the causal clean copy's next-token loss (still two copies when the
    blocks span the sequence)."""
    runs = {}
    for name, nproc, extra in (("one", 1, []), ("tp2", 2, ["parallel.tp=2"]), ("pp2", 2, ["parallel.pp=2"])):
        runs[name] = root / f"blocks_{name}"
        launch(
            nproc,
            [*BLOCK_DIFFUSION, *extra, f"run.dir={runs[name]}", f"checkpoint.init_from={seed_checkpoint}"],
        )
    one = read_metrics(runs["one"])
    assert [r["curriculum/block_size"] for r in one] == [1, 1, 4, 8, 64, 64]
    assert all(math.isfinite(r["loss"]) for r in one)
    assert ["ar_loss" in r for r in one] == [False, False, True, True, True, True]
    for name in ("tp2", "pp2"):
        ar_losses = [
            (r["ar_loss"], w["ar_loss"])
            for r, w in zip(read_metrics(runs[name]), one, strict=True)
            if "ar_loss" in w
        ]
        assert len(ar_losses) == 4 and all(math.isclose(a, b, rel_tol=RTOL) for a, b in ar_losses), ar_losses
    for name in ("tp2", "pp2"):
        _assert_same_steps(read_metrics(runs[name]), one, f"block diffusion {name}")


def _live_sample(checkpoint: str, run_dir: str, layout: list[str]) -> dict:
    """Load `checkpoint` under `layout`; the engine's full logits of fixed tokens and the
    sampler's ids on the live model, on this rank."""
    from parallel import load_checkpoint, shutdown_distributed
    from pretrain.config import load_config
    from pretrain.train import eval_samples, setup

    run = setup(
        load_config([*CONFIG, *layout, "eval.samples=2", "eval.sample_length=8", f"run.dir={run_dir}"])
    )
    load_checkpoint(Path(checkpoint), run.engine, load_optimizer=False)
    run.engine.train(False)
    tokens = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(5)).to(run.topo.device)
    logits = run.engine.forward_logits(tokens, vocab_size=run.derived.vocab_size).cpu()
    samples = eval_samples(run)
    if run.logger:
        run.logger.close()
    run.data.close()
    shutdown_distributed()
    return {"logits": logits, "samples": samples}


def test_sampling_on_the_live_model_under_tp2_and_pp2_vpp2(root, reference):
    """engine.forward_logits (what the in-loop sampler runs on): every rank of a TP=2 and a
    PP=2 x VPP=2 layout (the checkpoint loaded into two model chunks per stage; the
    interleaved schedule runs its minimum group of microbatches) holds the same
    full-vocabulary logits, equal to one process's to fp32 tolerance, so every rank takes
    the same sampling steps; the samples are text of the requested length."""
    checkpoint = str(reference / "checkpoints" / f"step_{STEPS}")
    one = spawn(_live_sample, 1, checkpoint, str(root / "live_one"), [], timeout=600)[0]
    assert len(one["samples"]) == 2 and all(
        s["prompt"] and isinstance(s["completion"], str) for s in one["samples"]
    )
    for name, layout in (("tp2", ["parallel.tp=2"]), ("pp2vpp2", ["parallel.pp=2", "parallel.vpp=2"])):
        ranks = spawn(_live_sample, 2, checkpoint, str(root / f"live_{name}"), layout, timeout=600)
        assert torch.equal(ranks[0]["logits"], ranks[1]["logits"]), name
        assert ranks[0]["logits"].shape == one["logits"].shape
        torch.testing.assert_close(ranks[0]["logits"], one["logits"], rtol=1e-5, atol=1e-5)


def test_dlm_eval_is_exact_twice_and_the_same_at_tp2_and_pp2(root, reference):
    """`dlm eval` of one checkpoint: the NLL bound, its standard error and the held-out
    training loss are bit-identical on a second evaluation and equal at TP=2 and PP=2."""
    checkpoint = root / "eval_checkpoint"
    shutil.copytree(reference / "checkpoints" / f"step_{STEPS}", checkpoint)
    results = {}
    for name, nproc, extra in (
        ("once", 1, []),
        ("again", 1, []),
        ("tp2", 2, ["parallel.tp=2"]),
        ("pp2", 2, ["parallel.pp=2"]),
    ):
        proc = launch(nproc, [f"checkpoint={checkpoint}", *extra], module="pretrain.evaluate")
        assert "NLL bound" in proc.stdout and "bits/byte" in proc.stdout
        results[name] = json.loads((checkpoint / "eval.json").read_text())
    once = results["once"]
    assert once["step"] == STEPS and once["eval_samples"] == 2 * 8  # train.eval_batches x global batch
    assert math.isfinite(once["eval_nll"]) and 0 < once["eval_nll_stderr"] < once["eval_nll"]
    # byte tokens: one byte each, except the few EOS tokens (no bytes, still scored)
    assert once["eval_nll"] / math.log(2) <= once["eval_bpb"] < 1.05 * once["eval_nll"] / math.log(2)
    assert results["again"] == once
    for name in ("tp2", "pp2"):
        for key in ("eval_nll", "eval_nll_stderr", "eval_loss", "eval_bpb"):
            assert results[name][key] == pytest.approx(once[key], rel=RTOL), (name, key)


@pytest.mark.parametrize("target", ["tp1", "dp2"])
def test_reshard_tp2_checkpoint(target, root, reference, layout_runs):
    """A checkpoint saved at TP=2 resumes at TP=1 and at DP=2 (model and optimizer)."""
    run_dir = _resume_copy(layout_runs["tp2"], 3, root / f"reshard_{target}")
    launch(1 if target == "tp1" else 2, [*CONFIG, f"run.dir={run_dir}"])
    _assert_same_steps(read_metrics(run_dir), read_metrics(reference)[3:], f"tp2 -> {target}")


def test_cli_resume_and_leftover_tmp(root, seed_checkpoint):
    """`dlm train` twice in one run dir: the second run resumes; a half-written
    checkpoint (crash during save) is ignored."""
    run_dir = root / "cli"
    base = ["train", *CONFIG, "checkpoint.every=2", f"run.dir={run_dir}"]
    launch(1, [*base, "train.steps=2"], module="pretrain.cli")
    crashed = run_dir / "checkpoints" / "step_3.tmp"
    crashed.mkdir()
    (crashed / "garbage").write_text("half a checkpoint")
    proc = launch(1, [*base, "train.steps=4"], module="pretrain.cli")
    assert "resumed from" in proc.stdout and "step_2" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_4"
    proc = launch(1, [*base, "train.steps=4"], module="pretrain.cli")
    assert "already at step 4" in proc.stdout


def test_logit_shift_masked_only_under_tp2_equals_all_logits_in_one_process(root, seed_checkpoint, reference):
    """model.logit_shift (AR-initialised DLMs): the masked-only output projection at the
    shifted positions, vocab-parallel under TP=2, gives the losses of scoring every
    position in one process; and the shift changes the objective."""
    runs = {}
    for name, nproc, extra in (("all", 1, ["objective.logits=all"]), ("tp2", 2, ["parallel.tp=2"])):
        runs[name] = root / f"shift_{name}"
        launch(
            nproc,
            [
                *CONFIG,
                "model.logit_shift=true",
                "train.steps=3",
                *extra,
                f"run.dir={runs[name]}",
                f"checkpoint.init_from={seed_checkpoint}",
            ],
        )
    shifted = read_metrics(runs["all"])
    _assert_same_steps(read_metrics(runs["tp2"]), shifted, "logit shift: tp2 masked vs all")
    assert shifted[0]["loss"] != pytest.approx(read_metrics(reference)[0]["loss"], rel=1e-4)


CONTEXT_PARALLEL = [
    *(o for o in CONFIG if not o.startswith("curriculum.bidirectional")),  # no mask tensors
    "curriculum.length_multiple=4",  # random lengths split into 2 x cp chunks (and over tp)
    "model.logit_shift=true",  # targets one position right of their logits, across chunks
    "train.eval_every=3",
    "train.eval_batches=1",
    "eval.batches=1",
    "eval.samples=2",
    "eval.sample_prompt=8",
    "eval.sample_length=8",
]


def test_context_parallel_cp2_and_tp2_cp2_equal_one_process(root, seed_checkpoint):
    """parallel.cp=2 (zig-zag halves of every sequence, megatron's RoPE per CP rank, keys and
    values of the whole sequence through the CPU stand-in for TE's CP attention, gradients
    reduced over dp x cp) and TP=2 x SP x CP=2 give one process's losses, gradient norms,
    held-out loss and NLL bound (per-sample sums whole before their statistics), with a logit
    shift (targets cross chunk borders) and random lengths; the live sampler runs on it."""
    runs = {}
    for name, nproc, extra in (
        ("one", 1, []),
        ("cp2", 2, ["parallel.cp=2"]),
        ("tp2cp2", 4, ["parallel.tp=2", "parallel.cp=2"]),
    ):
        runs[name] = root / f"context_{name}"
        launch(
            nproc,
            [*CONTEXT_PARALLEL, *extra, f"run.dir={runs[name]}", f"checkpoint.init_from={seed_checkpoint}"],
        )
    one = read_metrics(runs["one"])
    steps = [r for r in one if "loss" in r]
    evals = [r for r in one if "eval_nll" in r]
    assert len(steps) == STEPS and len(evals) == 2
    for name in ("cp2", "tp2cp2"):
        rows = read_metrics(runs[name])
        _assert_same_steps([r for r in rows if "loss" in r], steps, f"context parallel {name}")
        for got, want in zip([r for r in rows if "eval_nll" in r], evals, strict=True):
            for key in ("eval_loss", "eval_nll", "eval_nll_stderr"):
                assert math.isclose(got[key], want[key], rel_tol=RTOL), (name, key, got[key], want[key])


def test_document_attention_under_pp2_tp2_equals_one_process(root, seed_checkpoint):
    """model.attention=document on many short documents (several per 64-token sample):
    the pipeline stages each build the mask from the batch's segments; TP2xPP2 (here
    without sequence parallelism, the megatron engine's other tensor-parallel path) gives
    the losses of one process, and the mask changes them (it was applied)."""
    docs = root / "short_docs"
    docs.mkdir()
    rng = random.Random(0)
    words = "def class return import lambda yield async await with assert".split()
    for i in range(300):
        (docs / f"{i:03d}.txt").write_text(" ".join(rng.choices(words, k=rng.randint(3, 12))))
    base = [
        *CONFIG,
        "data=text",
        f"data.paths=[{docs}]",
        "train.steps=3",
        f"checkpoint.init_from={seed_checkpoint}",
    ]
    runs = {}
    for name, nproc, extra in (
        ("one", 1, ["model.attention=document"]),
        (
            "tp2pp2",
            4,
            [
                "model.attention=document",
                "parallel.tp=2",
                "parallel.pp=2",
                "parallel.sequence_parallel=false",
            ],
        ),
        ("full", 1, []),
    ):
        runs[name] = root / f"document_{name}"
        launch(nproc, [*base, *extra, f"run.dir={runs[name]}"])
    one = read_metrics(runs["one"])
    _assert_same_steps(read_metrics(runs["tp2pp2"]), one, "document attention: tp2xpp2 vs one process")
    # The mask was applied: measured 3.6e-4 at step 2 (36x the layout tolerance); the
    # effect is small at initialisation, where attention is nearly uniform.
    full = read_metrics(runs["full"])
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(one, full, strict=True)) > 1e-4


@pytest.fixture(scope="module")
def bf16_run(root, seed_checkpoint) -> Path:
    run_dir = root / "bf16"
    launch(
        1, [*CONFIG, "train.precision=bf16", f"run.dir={run_dir}", f"checkpoint.init_from={seed_checkpoint}"]
    )
    return run_dir


def test_bf16_mixed_precision_tracks_fp32(bf16_run, reference):
    """bf16 weights and activations (Float16Module) with fp32 main params and Adam states
    in the DistributedOptimizer: the path GPUs take by default, runnable on CPU. Started
    from checkpoint.init_from, so the optimizer's fp32 main params must be refreshed from
    the loaded weights (else its first step copies the build-time weights back)."""
    rows, ref = read_metrics(bf16_run), read_metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    assert rows[0]["loss"] != ref[0]["loss"]  # really ran in bf16
    assert all(r["update_applied"] for r in rows)
    # Measured: every step within 3e-4 of fp32 (losses and grad norms); a run whose main
    # params were not refreshed drifted 3-4% from step 2 on.
    for got, want in zip(rows, ref, strict=True):
        assert math.isclose(got["loss"], want["loss"], rel_tol=2e-3), (got["step"], got["loss"], want["loss"])
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=2e-2), (got["step"], got, want)


def test_bf16_exact_resume(root, bf16_run):
    """bf16 resume restores the fp32 main params and Adam states from the checkpoint:
    3 steps + resume + 3 steps == 6 steps, bit-exact in one process."""
    run_dir = _resume_copy(bf16_run, 3, root / "bf16_resumed")
    launch(1, [*CONFIG, "train.precision=bf16", f"run.dir={run_dir}"])
    rows, straight = read_metrics(run_dir), read_metrics(bf16_run)[3:]
    assert [r["step"] for r in rows] == [r["step"] for r in straight] == [4, 5, 6]
    for got, want in zip(rows, straight, strict=True):
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"]), got["step"]


@pytest.mark.gpu
def test_gpu_nccl_tp2_bf16_run_tracks_the_cpu_reference(root, seed_checkpoint, reference):
    """On a machine with >= 2 GPUs: NCCL, Transformer Engine layers (when installed), bf16
    (the GPU default), from the same seed checkpoint as the fp32 CPU reference run."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    run_dir = root / "gpu_tp2"
    overrides = [*CONFIG, "parallel.tp=2", f"run.dir={run_dir}", f"checkpoint.init_from={seed_checkpoint}"]
    proc = launch(2, overrides, gpu=True)
    assert "nccl" in proc.stdout and "bf16" in proc.stdout, proc.stdout[-2000:]
    rows, ref = read_metrics(run_dir), read_metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    # bf16 on CPU tracks fp32 within 3e-4 per step (test_bf16_mixed_precision_tracks_fp32)
    for got, want in zip(rows, ref, strict=True):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-2), (got["step"], got["loss"], want["loss"])


@pytest.mark.gpu
def test_gpu_context_parallel_through_transformer_engine_tracks_one_cpu_process(root, seed_checkpoint):
    """On a machine with >= 2 GPUs and Transformer Engine: parallel.cp=2 runs TE's
    context-parallel attention (the CPU stand-in is not applied with CUDA), NCCL, bf16, and
    tracks the fp32 single-process CPU run of the same config within bf16 tolerance."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    base = [*CONTEXT_PARALLEL, f"checkpoint.init_from={seed_checkpoint}"]
    launch(1, [*base, f"run.dir={root / 'gpu_cp_reference'}"])
    proc = launch(2, [*base, "parallel.cp=2", "model.spec=te", f"run.dir={root / 'gpu_cp2'}"], gpu=True)
    assert "nccl" in proc.stdout and "cp=2" in proc.stdout and "layers te" in proc.stdout, proc.stdout[-2000:]
    rows = [r for r in read_metrics(root / "gpu_cp2") if "loss" in r]
    ref = [r for r in read_metrics(root / "gpu_cp_reference") if "loss" in r]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for got, want in zip(rows, ref, strict=True):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-2), (got["step"], got["loss"], want["loss"])


@pytest.mark.gpu
def test_gpu_tp_comm_overlap_through_transformer_engine_userbuffers_tracks_tp2(root, seed_checkpoint):
    """On a machine with >= 2 GPUs and Transformer Engine: parallel.tp_comm_overlap=true
    (userbuffers sized for data.seq_len x micro batch) trains like the same TP=2 run without
    it, within bf16 tolerance."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    fixed = [o for o in CONFIG if not o.startswith("curriculum.random")]  # one batch shape
    base = [
        *fixed,
        "parallel.tp=2",
        "model.spec=te",
        "eval.samples=0",
        f"checkpoint.init_from={seed_checkpoint}",
    ]
    launch(2, [*base, f"run.dir={root / 'gpu_tp2_plain'}"], gpu=True)
    launch(2, [*base, "parallel.tp_comm_overlap=true", f"run.dir={root / 'gpu_tp2_overlap'}"], gpu=True)
    rows, ref = read_metrics(root / "gpu_tp2_overlap"), read_metrics(root / "gpu_tp2_plain")
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for got, want in zip(rows, ref, strict=True):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-2), (got["step"], got["loss"], want["loss"])
