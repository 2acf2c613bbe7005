"""parallel/checkpoint.py: a save that crashes at any filesystem call leaves `latest` naming a
complete checkpoint (the previous one or the new one), and the next save and pruning clean up."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from data import files
from parallel import checkpoint
from tests.dist import spawn

# What the ranks write into the staging directory before rank 0 publishes it.
PAYLOAD = ("__0_0.distcp", ".metadata", "common.pt", "metadata.json", "rng/rank_0.safetensors")
CONTENT = {*PAYLOAD, "state.json", "config.yaml"}
# Every filesystem function a save reaches (shutil.rmtree itself and the os calls inside it).
FILESYSTEM_CALLS = [
    (os, "replace"),
    (os, "rename"),
    (os, "mkdir"),
    (os, "open"),
    (os, "fsync"),
    (os, "unlink"),
    (os, "rmdir"),
    (shutil, "rmtree"),
    (files, "open"),  # the builtin open, as data/files.py's write_atomic calls it
    (checkpoint, "write_atomic"),
    (checkpoint, "fsync_dir"),
]


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """fsync makes data survive a power loss, which these tests do not simulate: skip the
    flush (it costs seconds on a busy disk), keep the call as a crash point."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


class SimulatedCrash(BaseException):
    """The process dies: a BaseException, so no `except Exception` or ignore_errors absorbs it."""


@contextmanager
def crash_when(should_crash):
    """Run the functions of FILESYSTEM_CALLS through a wrapper that raises SimulatedCrash
    (naming the call) at the first call for which `should_crash(number, name, args)` holds."""
    number = itertools.count(1)

    def wrap(fn, name):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if should_crash(next(number), name, args):
                raise SimulatedCrash(name, args)
            return fn(*args, **kwargs)

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        for owner, name in FILESYSTEM_CALLS:
            mp.setattr(owner, name, wrap(getattr(owner, name, None) or open, name), raising=False)
        yield


def fake_save(ckpt_dir: Path, step: int, version: str) -> Path:
    """A save as the ranks do it, with files standing for the shards: rank 0 stages, the
    ranks write, rank 0 publishes."""
    path = ckpt_dir / f"step_{step}"
    staging = checkpoint.stage_checkpoint(path)
    (staging / "rng").mkdir(exist_ok=True)
    for name in PAYLOAD:
        (staging / name).write_text(f"{version}: {name}")
    return checkpoint.publish_checkpoint(
        staging, path, meta={"step": step, "version": version}, config_yaml=f"version: {version}\n"
    )


def write_checkpoint(path: Path, version: str) -> None:
    """A complete checkpoint directory as a save publishes it (for setting up a directory)."""
    (path / "rng").mkdir(parents=True)
    for name in PAYLOAD:
        (path / name).write_text(f"{version}: {name}")
    (path / "config.yaml").write_text(f"version: {version}\n")
    (path / "state.json").write_text(json.dumps({"version": version}))


def version_of(path: Path, context: str = "") -> str:
    """The version a checkpoint directory holds; fails (naming `context`) unless its
    content is complete and of one save."""
    assert (path / "state.json").exists(), f"{context}: {path.name} has no state.json"
    version = json.loads((path / "state.json").read_text())["version"]
    found = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert found == CONTENT, f"{context}: {path.name} holds {sorted(found)}"
    assert (path / "config.yaml").read_text() == f"version: {version}\n", f"{context}: {path.name}"
    for name in PAYLOAD:
        assert (path / name).read_text() == f"{version}: {name}", f"{context}: {path.name}/{name} mixed"
    return version


def checkpoint_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.iterdir() if checkpoint.checkpoint_name_key(p.name))


@dataclass(frozen=True)
class Case:
    id: str
    before: tuple[tuple[int, str], ...]  # saves done before the one that crashes
    step: int  # the step saved again


CASES = [
    Case("first_save_of_a_step", ((1, "v1"),), 2),
    Case("resave_of_the_step_latest_names", ((1, "v1"), (2, "v2")), 2),
    Case("resave_of_an_older_step", ((1, "v1"), (2, "v2")), 1),
    Case("resave_of_a_resaved_step", ((1, "v1"), (2, "v2"), (2, "v2b")), 2),
]


def crash_save_at_call(ckpt_dir: Path, case: Case, k: int) -> SimulatedCrash | None:
    """Make case.before's saves, then save case.step with a crash at filesystem call k."""
    for step, version in case.before:
        fake_save(ckpt_dir, step, version)
    with crash_when(lambda n, name, args: n == k):
        try:
            fake_save(ckpt_dir, case.step, "new")
        except SimulatedCrash as crash:
            return crash
    return None


def check_recovers(ckpt_dir: Path, case: Case) -> None:
    """The next save of the step succeeds and becomes `latest`; pruning leaves one complete
    checkpoint per step and nothing else."""
    path = fake_save(ckpt_dir, case.step, "retry")
    assert checkpoint.latest_checkpoint(ckpt_dir) == path
    assert version_of(path) == "retry"
    checkpoint.prune_checkpoints(ckpt_dir, keep=2)
    steps = sorted({step for step, _ in case.before} | {case.step})
    assert sorted(p.name for p in ckpt_dir.iterdir() if not checkpoint.checkpoint_name_key(p.name)) == [
        "latest"
    ]
    assert [checkpoint.checkpoint_name_key(p.name)[0] for p in checkpoint_dirs(ckpt_dir)] == steps
    for p in checkpoint_dirs(ckpt_dir):
        version_of(p)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_crash_at_any_filesystem_call_of_a_save_leaves_latest_complete(tmp_path, case):
    previous = case.before[-1][1]  # the version `latest` names before the save
    outcomes, crashed_in = [], set()
    for k in itertools.count(1):
        ckpt_dir = tmp_path / f"crash_at_{k}"
        crash = crash_save_at_call(ckpt_dir, case, k)
        context = f"crash at call {k} {crash.args if crash else '(none: the save completed)'}"
        assert (ckpt_dir / "latest").exists(), context
        version = version_of(ckpt_dir / (ckpt_dir / "latest").read_text(), context)
        assert checkpoint.latest_checkpoint(ckpt_dir).name == (ckpt_dir / "latest").read_text()
        if crash is None:
            assert version == "new"
            break
        assert version in (previous, "new"), f"{context}: latest holds {version}"
        for p in checkpoint_dirs(ckpt_dir):  # what a reader sorting the steps would pick
            version_of(p, context)
        outcomes.append(version)
        crashed_in.add(crash.args[0])
        check_recovers(ckpt_dir, case)
    # Crashes at the early calls keep the previous checkpoint, at the last ones the new one.
    assert outcomes[0] == previous and outcomes[-1] == "new", outcomes
    assert {"mkdir", "write_atomic", "open", "fsync", "fsync_dir", "replace"} <= crashed_in
    if case.id.startswith("resave"):  # a superseded copy is deleted
        assert {"rmtree", "unlink", "rmdir"} <= crashed_in
    check_recovers(ckpt_dir, case)


def test_the_newest_copy_of_a_step_is_step_n_then_step_n_k(tmp_path):
    names = [fake_save(tmp_path, 3, f"v{i}").name for i in range(3)]
    assert names == ["step_3", "step_3_1", "step_3_2"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_3_2"]  # superseded copies deleted
    assert fake_save(tmp_path, 30, "v").name == "step_30"  # step_3's copies are not step 30's


def test_pruning_sorts_steps_numerically_and_deletes_leftovers(tmp_path):
    for name in ("step_2", "step_5", "step_9", "step_10", "step_10_7"):  # step_10_7: newest copy
        write_checkpoint(tmp_path / name, name)
    (tmp_path / "latest").write_text("step_2")  # e.g. a run resumed from step 2
    for leftover in ("step_11.tmp/rng", "step_4_1.old.tmp"):
        (tmp_path / leftover).mkdir(parents=True)
    (tmp_path / "latest.tmp").write_text("step_11")

    removed = checkpoint.prune_checkpoints(tmp_path, keep=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_10_7", "step_2", "step_9"]
    assert {p.name for p in removed} == {
        "step_11.tmp",
        "step_4_1.old.tmp",
        "latest.tmp",
        "step_10",
        "step_5",
    }
    assert version_of(tmp_path / "step_10_7") == "step_10_7"
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_2"


# -- through the real collective save and load (1-process gloo group) --------------------

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


def _crash_resaves_then_load(ckpt_dir: str) -> dict:
    """Save step 1, train, re-save step 1 crashing (a) at the rename of the staging
    directory, (b) at the first filesystem call after `latest` changed; load after each."""
    from parallel import (
        ModelDims,
        OptimConfig,
        build_engine,
        build_model,
        init_distributed,
        shutdown_distributed,
    )

    ckpt_dir = Path(ckpt_dir)
    topo = init_distributed(tp=1, pp=1, dp=None, seed=1, model_dims=TOPO_DIMS)
    optim = OptimConfig(lr=1e-2, min_lr=0.0, warmup_steps=0, schedule="constant")
    engine = build_engine(build_model(ModelDims(**DIMS), topo), topo, optim, train_steps=10)
    batch = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))

    def train_step():
        def forward_step(batch, model):
            targets = batch.transpose(0, 1).contiguous()
            loss = lambda out: (engine.cross_entropy(out, targets).sum(), torch.tensor(targets.numel()), {})
            return model(batch), loss

        engine.forward_backward(forward_step, [batch], num_microbatches=1, seq_len=16, micro_batch_size=2)
        engine.optimizer_step(engine.scheduler.num_steps + 1)
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}

    def distance(weights):
        now = engine.module.state_dict()
        return max((now[k] - v).abs().max().item() for k, v in weights.items())

    def save(version):
        return checkpoint.save_checkpoint(
            ckpt_dir / "step_1", engine, state={"step": 1, "version": version}, config_yaml=""
        )

    def load_latest():
        latest = checkpoint.latest_checkpoint(ckpt_dir)
        return latest.name, checkpoint.load_checkpoint(latest, engine)["version"]

    def staging_renamed(number, name, args):  # os.replace(.../step_1.tmp, ...)
        return name == "replace" and Path(args[0]).name == "step_1.tmp"

    def latest_changed(number, name, args):
        return (ckpt_dir / "latest").read_text() != before.name

    out = {}
    first = train_step()
    out["first_save"] = save("first").name
    second = train_step()
    with crash_when(staging_renamed):
        with pytest.raises(SimulatedCrash):
            save("second")
    out["after_crash_a"] = load_latest()
    out["distance_a"] = (distance(first), distance(second))

    third = train_step()
    before = checkpoint.latest_checkpoint(ckpt_dir)
    with crash_when(latest_changed):
        with pytest.raises(SimulatedCrash):
            save("third")
    out["after_crash_b"] = load_latest()
    out["distance_b"] = (distance(third), distance(first))

    train_step()
    out["retry"] = save("retry").name
    checkpoint.prune_checkpoints(ckpt_dir, keep=3)
    out["listing"] = sorted(p.name for p in ckpt_dir.iterdir())
    shutdown_distributed()
    return out


def test_a_crashed_resave_loads_the_old_or_new_checkpoint_through_the_collective_path(tmp_path):
    out = spawn(_crash_resaves_then_load, 1, str(tmp_path / "checkpoints"))[0]
    assert out["first_save"] == "step_1"
    # (a) the staging directory never became a checkpoint: `latest` still names the first.
    assert out["after_crash_a"] == ("step_1", "first")
    loaded_first, from_second = out["distance_a"]
    assert loaded_first == 0 and from_second > 1e-4
    # (b) `latest` switched before the crash: the re-save is what loads.
    assert out["after_crash_b"] == ("step_1_1", "third")
    loaded_third, from_first = out["distance_b"]
    assert loaded_third == 0 and from_first > 1e-4
    # The retry takes a fresh name and deletes the superseded copies and the staging leftovers.
    assert out["retry"] == "step_1_2"
    assert out["listing"] == ["latest", "step_1_2"]
