"""The streaming training loader (data/loader.py) on synthetic shard datasets: a
partition of each epoch over data-parallel ranks and workers, equal batch counts,
identical batches for tensor-parallel peers, exact resume after any number of batches,
mixtures, and clear errors."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import LoaderConfigError, build_train_loader
from data.shards import FORMAT, MANIFEST, segment_ids, write_shard

SEQ = 16
EOS = 2
SHA = "ab" * 32


def expected_tokens(key: int, seq_len: int = SEQ) -> np.ndarray:
    tok = (key * 31 + np.arange(seq_len)) % 500
    tok[(key % 7) + 3] = EOS  # one document boundary per sample, at a key-dependent place
    return tok


def make_dataset(root: Path, sizes: list[int], *, first_key=0, seq_len=SEQ, sha=SHA) -> str:
    """A dlm-shards/1 dataset whose sample `key` holds expected_tokens(key)."""
    root.mkdir(parents=True, exist_ok=True)
    shards, key = [], first_key
    for i, n in enumerate(sizes):
        samples = []
        for k in range(key, key + n):
            tok = expected_tokens(k, seq_len)
            samples.append((tok, segment_ids(tok, EOS)))
        shards.append(write_shard(root / f"train-{i:05d}.tar", samples, key, "uint16"))
        key += n
    tokenizer = dict(path="tok.model", sha256=sha, vocab_size=500, pad_id=0, bos_id=1, eos_id=EOS, mask_id=3)
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": "uint16",
        "tokenizer": tokenizer,
        "splits": {
            "train": {"shards": shards, "samples": key - first_key, "tokens": (key - first_key) * seq_len}
        },
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    sizes_a = rng.integers(20, 61, 16).tolist()  # 16 shards of 20-60 samples
    sizes_b = rng.integers(20, 61, 12).tolist()
    sizes_uneven = rng.integers(3, 61, 20).tolist()  # 20 shards of 3-60 samples
    sizes_short_last = [30] * 23 + [7]  # a short last shard
    return {
        "a": make_dataset(root / "a", sizes_a),
        "a_total": sum(sizes_a),
        "b": make_dataset(root / "b", sizes_b, first_key=100_000),
        "b_total": sum(sizes_b),
        "other_tok": make_dataset(root / "other_tok", [20] * 4, sha="cd" * 32),
        "seq32": make_dataset(root / "seq32", [20] * 4, seq_len=32),
        "one": make_dataset(root / "one", [50], first_key=500_000),
        "uneven": make_dataset(root / "uneven", sizes_uneven, first_key=300_000),
        "uneven_sizes": sizes_uneven,
        "uneven_first": 300_000,
        "short_last": make_dataset(root / "short_last", sizes_short_last, first_key=200_000),
        "short_last_sizes": sizes_short_last,
        "short_last_first": 200_000,
        "root": root,
    }


def loader(sources, *, dp_rank=0, dp_size=2, num_workers=2, mbs=4, seed=7, **kw):
    if isinstance(sources, str):
        sources = [(sources, 1.0)]
    return build_train_loader(
        sources,
        seq_len=kw.pop("seq_len", SEQ),
        micro_batch_size=mbs,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        num_workers=num_workers,
        **kw,
    )


def take(ld, n: int) -> list[dict]:
    try:
        return [next(ld) for _ in range(n)]
    finally:
        ld.close()


def same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in ("tokens", "segments", "keys", "source", "epoch"):
            assert torch.equal(g[k], w[k]), (i, k, g[k], w[k])


def sample_ids(batches: list[dict]) -> set[tuple[int, int, int]]:
    """(source, key, epoch) of every sample of the batches."""
    return {
        (s, k, e)
        for b in batches
        for s, k, e in zip(b["source"].tolist(), b["keys"].tolist(), b["epoch"].tolist(), strict=True)
    }


def check_content(batch: dict, mbs: int) -> None:
    """Shapes, dtypes, and each row's tokens/segments are those stored under its key."""
    assert batch["tokens"].shape == batch["segments"].shape == (mbs, SEQ)
    for k in ("tokens", "segments", "keys", "source", "epoch"):
        assert batch[k].dtype == torch.long, k
    for key, tok, seg in zip(
        batch["keys"].tolist(), batch["tokens"].numpy(), batch["segments"].numpy(), strict=True
    ):
        want = expected_tokens(key)
        assert np.array_equal(tok, want), key
        assert np.array_equal(seg, segment_ids(want, EOS)), key


# -- one epoch is a partition over ranks and workers ---------------------------------------
@pytest.mark.parametrize("dp_size", [2, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_epoch_is_partitioned_over_ranks_and_workers(data, dp_size, num_workers):
    mbs, W = 4, max(num_workers, 1)
    per_slot = None
    seen: dict[tuple[int, int], list[int]] = {}  # (rank, logical worker) -> epoch-0 keys
    batch_counts = []
    for rank in range(dp_size):
        ld = loader(data["a"], dp_rank=rank, dp_size=dp_size, num_workers=num_workers, mbs=mbs)
        E = ld.epoch_samples(0, 0)
        assert per_slot in (None, E)  # every rank computes the same epoch length
        per_slot = E
        assert ld.dropped_per_epoch == [data["a_total"] - dp_size * W * E]
        batches = take(ld, W * math.ceil(E / mbs) + W)  # covers every worker's whole epoch 0
        for b, batch in enumerate(batches):
            check_content(batch, mbs)
            epoch0 = batch["keys"][batch["epoch"] == 0].tolist()
            seen.setdefault((rank, b % W), []).extend(epoch0)
        # the finite stream: the same number of batches on every rank
        one = loader(data["a"], dp_rank=rank, dp_size=dp_size, num_workers=num_workers, mbs=mbs, epochs=1)
        batch_counts.append(sum(1 for _ in one))
        assert batch_counts[-1] == one.total_batches == W * (E // mbs)
        one.close()
    assert len(set(batch_counts)) == 1
    for slot, keys in seen.items():
        assert len(keys) == per_slot, slot  # truncated to E(s, e) exactly
    union = [k for keys in seen.values() for k in keys]
    assert len(set(union)) == len(union)  # disjoint across ranks and workers
    assert set(union) <= set(range(data["a_total"]))
    assert data["a_total"] - len(union) < dp_size * W  # at most one sample per reader slot dropped


# -- every sample of an epoch is read, for any shard sizes --------------------------------------
UNEVEN_MIX = (("uneven", 0.6), ("short_last", 0.4))


def epoch0_keys(batches: list[dict], source: int = 0) -> list[int]:
    return [
        k
        for b in batches
        for k, e, s in zip(b["keys"].tolist(), b["epoch"].tolist(), b["source"].tolist(), strict=True)
        if e == 0 and s == source
    ]


def assert_epoch_read_once(keys: list[int], sizes: list[int], first_key: int, slots: int) -> None:
    """The keys one epoch's reads of all ranks: distinct, from the source, fewer than `slots` missing."""
    assert len(keys) == len(set(keys))
    assert set(keys) <= set(range(first_key, first_key + sum(sizes)))
    assert sum(sizes) - len(keys) < slots, (sum(sizes) - len(keys), slots)


@pytest.mark.parametrize("dp_size", [2, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", ["uneven", "short_last"])
def test_every_sample_of_an_epoch_is_read_for_uneven_shards(data, name, dp_size, num_workers):
    mbs, W = 4, max(num_workers, 1)
    keys, counts = [], []
    for rank in range(dp_size):
        # two finite epochs: every worker's epoch 0 ends before its last full batch
        ld = loader(data[name], dp_rank=rank, dp_size=dp_size, num_workers=num_workers, mbs=mbs, epochs=2)
        batches = list(ld)
        ld.close()
        assert len(batches) == ld.total_batches
        counts.append(len(batches))
        keys += epoch0_keys(batches)
    sizes = data[f"{name}_sizes"]
    assert len(set(counts)) == 1 and counts[0] > 0  # the same number of batches on every rank
    assert_epoch_read_once(keys, sizes, data[f"{name}_first"], dp_size * W)
    assert ld.samples_per_epoch == [len(keys)] and ld.dropped_per_epoch == [sum(sizes) - len(keys)]


@pytest.mark.parametrize("dp_size", [2, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_of_each_source_epoch_is_read_in_a_mixture(data, dp_size, num_workers):
    mix = [(data[name], weight) for name, weight in UNEVEN_MIX]
    mbs, W = 4, max(num_workers, 1)
    slots = dp_size * W
    # enough batches for every worker to pass epoch 0 of the rarer source (weight 0.4) with margin
    per_worker = 2 * max(sum(data[f"{n}_sizes"]) / w for n, w in UNEVEN_MIX) / slots
    n_batches = W * math.ceil(per_worker / mbs)
    ranks = [
        take(loader(mix, dp_rank=r, dp_size=dp_size, num_workers=num_workers, mbs=mbs), n_batches)
        for r in range(dp_size)
    ]
    for s, (name, _) in enumerate(UNEVEN_MIX):
        for batches in ranks:
            for lw in range(W):  # every worker is past this source's epoch 0
                mine = torch.cat([b["epoch"][b["source"] == s] for b in batches[lw::W]])
                assert mine.max() >= 1
        keys = [k for batches in ranks for k in epoch0_keys(batches, s)]
        assert_epoch_read_once(keys, data[f"{name}_sizes"], data[f"{name}_first"], slots)


def shard_of(key: int, sizes: list[int], first_key: int) -> int:
    return int(np.searchsorted(np.cumsum(sizes), key - first_key, side="right"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_group_and_across_an_epoch_boundary_is_exact(data, num_workers):
    """Rank 1 of 3 on uneven shards: its range of each epoch is cut out of the middle of the stream."""
    dp, mbs, W, rank = 3, 4, max(num_workers, 1), 1
    sizes, first_key = data["uneven_sizes"], data["uneven_first"]
    n = W * (sum(sizes) // (dp * W * mbs) + 4)  # past every worker's first epoch
    runs = [
        take(loader(data["uneven"], dp_rank=r, dp_size=dp, num_workers=num_workers, mbs=mbs), n)
        for r in range(dp)
    ]
    assert_epoch_read_once([k for run in runs for k in epoch0_keys(run)], sizes, first_key, dp * W)
    ld, states = loader(data["uneven"], dp_rank=rank, dp_size=dp, num_workers=num_workers, mbs=mbs), []
    for _ in range(n):
        states.append(json.loads(json.dumps(ld.state_dict())))
        next(ld)
    ld.close()
    run = runs[rank]
    # cuts inside a shard (hence inside a group): the worker's previous batch and its next share a shard
    mid_shard = [
        c
        for c in range(W, n)
        if shard_of(run[c - W]["keys"][-1].item(), sizes, first_key)
        == shard_of(run[c]["keys"][0].item(), sizes, first_key)
    ]
    cross = next(c for c in range(n) if (run[c]["epoch"] > 0).any())  # the first epoch-crossing batch
    assert mid_shard and cross < n - W
    for c in mid_shard[:3] + [cross - 1, cross, cross + 1, cross + W]:
        resumed = take(
            loader(
                data["uneven"], dp_rank=rank, dp_size=dp, num_workers=num_workers, mbs=mbs, state=states[c]
            ),
            n - c,
        )
        same_batches(resumed, run[c:])


def test_version_1_state_is_placed_approximately_with_a_warning(data, caplog):
    ld = loader(data["uneven"], dp_size=3, num_workers=2)
    v1 = {**ld.state_dict(), "version": 1, "batches": 40}  # the same counter named other samples in 1
    ld.close()
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        new = loader(data["uneven"], dp_size=3, num_workers=2, state=v1)
    assert any("different layout" in r.getMessage() and "version" in r.getMessage() for r in caplog.records)
    state = new.state_dict()
    assert state["version"] == ld.state_dict()["version"] != 1 and state["batches"] == 0
    epoch, offset = state["start"][0]
    assert 0 <= offset < new.epoch_samples(0)
    assert take(new, 1)[0]["epoch"].tolist() == [epoch] * 4
    with pytest.raises(LoaderConfigError, match="version"):
        loader(data["uneven"], dp_size=3, num_workers=2, state={**v1, "version": 99})


def test_epoch_report_matches_what_the_ranks_read(data):
    dp, W, mbs, name = 2, 2, 4, "short_last"
    ld = loader(data[name], dp_size=dp, num_workers=W, mbs=mbs)
    per_rank = W * math.ceil(2.5 * ld.samples_per_epoch[0] / (dp * W * mbs))  # about 2.5 epochs
    total = per_rank * mbs * dp
    epochs = torch.cat(
        [
            b["epoch"]
            for r in range(dp)
            for b in take(loader(data[name], dp_rank=r, dp_size=dp, num_workers=W, mbs=mbs), per_rank)
        ]
    )
    last = int(epochs.max())
    seen = last + (epochs == last).sum().item() / (epochs == 0).sum().item()
    assert ld.epochs_for(total) == [pytest.approx(seen)]
    report = ld.epoch_report(total)
    ld.close()
    for part in (
        f"{(epochs == 0).sum().item():,} samples per epoch",
        f"{sum(data[name + '_sizes']) - (epochs == 0).sum().item():,} dropped per epoch",
        f"{total:,} samples = {seen:.2f} epochs",
    ):
        assert part in report, (part, report)
    mix = loader([(data[n], w) for n, w in UNEVEN_MIX], dp_size=dp, num_workers=W, mbs=mbs)
    report = mix.epoch_report(total)
    mix.close()
    assert data["uneven"] in report and data["short_last"] in report and report.count("dropped") == 2


def test_tensor_parallel_peers_and_reruns_get_identical_batches(data):
    first = take(loader(data["a"], dp_rank=1), 30)
    peer = take(loader(data["a"], dp_rank=1), 30)
    same_batches(peer, first)
    other_rank = take(loader(data["a"], dp_rank=0), 30)
    assert not set(torch.cat([b["keys"] for b in first]).tolist()) & set(
        torch.cat([b["keys"] for b in other_rank]).tolist()
    )
    other_seed = take(loader(data["a"], dp_rank=1, seed=8), 30)
    assert not all(torch.equal(a["keys"], b["keys"]) for a, b in zip(first, other_seed, strict=True))


def test_epochs_have_different_orders_and_chain(data):
    mbs = 4
    ld = loader(data["a"], dp_rank=0, num_workers=0, mbs=mbs)
    E = ld.epoch_samples(0, 0) + ld.epoch_samples(0, 1) + ld.epoch_samples(0, 2)
    batches = take(ld, math.ceil(E / mbs))
    keys = torch.cat([b["keys"] for b in batches])
    epoch = torch.cat([b["epoch"] for b in batches])
    assert epoch.tolist() == sorted(epoch.tolist())  # epochs chain, in order
    by_epoch = [keys[epoch == e].tolist() for e in range(3)]
    for e in range(3):
        assert len(by_epoch[e]) == ld.epoch_samples(0, e)
        assert len(set(by_epoch[e])) == len(by_epoch[e])
    assert by_epoch[0] != by_epoch[1][: len(by_epoch[0])]
    assert set(by_epoch[0]) != set(by_epoch[1])  # the shard groups themselves are reshuffled
    # a single shard: only the in-group permutation, keyed by the epoch, can change the order
    one = loader(data["one"], dp_size=1, num_workers=0, mbs=5)
    assert one.epoch_samples(0, 0) == 50 and one.dropped_per_epoch == [0]
    keys = torch.cat([b["keys"] for b in take(one, 20)]).tolist()
    assert sorted(keys[:50]) == sorted(keys[50:]) == list(range(500_000, 500_050))
    assert keys[:50] != keys[50:]


def test_finite_epochs_stop(data):
    ld = loader(data["a"], dp_rank=1, num_workers=2, mbs=4, epochs=2)
    batches = list(ld)
    ld.close()
    E = ld.epoch_samples(0, 0) + ld.epoch_samples(0, 1)
    assert len(batches) == ld.total_batches == 2 * (E // 4)
    assert set(torch.cat([b["epoch"] for b in batches]).tolist()) == {0, 1}
    with pytest.raises(StopIteration):
        next(ld)


# -- exact resume -----------------------------------------------------------------------------
def _resume_points(ld, W: int, mbs: int) -> list[int]:
    """1, 2, 3, 5, 7, 13 and C just inside and around the first epoch boundary."""
    E = ld.epoch_samples(0, 0)
    cross = W * (E // mbs)  # rank batch index of the first worker's epoch-crossing batch
    return [1, 2, 3, 5, 7, 13, cross, cross + 1, cross + W + 1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_resume_is_exact_after_any_number_of_batches(data, num_workers):
    mbs, W, after = 4, max(num_workers, 1), 7
    probe = loader(data["a"], num_workers=num_workers, mbs=mbs)
    points = _resume_points(probe, W, mbs)
    probe.close()
    # one uninterrupted run per rank, with the state saved at every resume point
    straight, states = {}, {}
    for rank in (0, 1):
        ld = loader(data["a"], dp_rank=rank, num_workers=num_workers, mbs=mbs)
        straight[rank] = []
        for c in range(max(points) + after):
            if c in points:
                states[rank, c] = json.loads(json.dumps(ld.state_dict()))
            straight[rank].append(next(ld))
        ld.close()
    assert any((b["epoch"] > 0).any() for b in straight[0])  # the run crossed an epoch boundary
    for c in points:
        assert states[0, c] == states[1, c] and states[0, c]["batches"] == c
        assert "dp_rank" not in json.dumps(states[0, c])
        resumed = take(
            loader(data["a"], dp_rank=1, num_workers=num_workers, mbs=mbs, state=states[1, c]), after
        )
        same_batches(resumed, straight[1][c : c + after])
        consumed = {
            (k, e)
            for b in straight[1][:c]
            for k, e in zip(b["keys"].tolist(), b["epoch"].tolist(), strict=True)
        }
        again = {
            (k, e) for b in resumed for k, e in zip(b["keys"].tolist(), b["epoch"].tolist(), strict=True)
        }
        assert not consumed & again, c


def test_resume_state_counts_returned_batches_not_prefetched(data):
    ld = loader(data["a"], num_workers=2)
    assert ld.state_dict()["batches"] == 0
    next(ld)
    state = ld.state_dict()
    ld.close()
    assert state["batches"] == 1


def test_num_workers_0_and_1_are_the_same_stream(data, caplog):
    straight = take(loader(data["a"], num_workers=0), 12)
    ld = loader(data["a"], num_workers=0)
    take(ld, 5)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        resumed = take(loader(data["a"], num_workers=1, state=ld.state_dict()), 7)
    assert not caplog.records
    same_batches(resumed, straight[5:])


def test_pipe_source_reads_the_same_stream_and_resumes_a_local_state(data):
    pipe = f"pipe:cat {data['a']}/{{name}}"
    local = take(loader(data["a"], num_workers=2), 10)
    same_batches(take(loader(pipe, num_workers=2), 10), local)
    ld = loader(data["a"], num_workers=2)
    take(ld, 3)
    same_batches(take(loader(pipe, num_workers=2, state=ld.state_dict()), 7), local[3:])


def test_changed_layout_warns_and_continues_at_the_epoch_fraction(data, caplog):
    old_mbs, old_W, C = 4, 2, 60  # C multiple of W: every old worker at the same position
    old = loader(data["a"], num_workers=old_W, mbs=old_mbs)
    take(old, C)
    state = old.state_dict()
    samples, epoch = C // old_W * old_mbs, 0
    while samples >= old.epoch_samples(0, epoch):
        samples -= old.epoch_samples(0, epoch)
        epoch += 1
    fraction = samples / old.epoch_samples(0, epoch)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        new = loader(data["a"], dp_size=4, num_workers=0, mbs=2, state=state)
    assert any("different layout" in r.getMessage() and "dp_size" in r.getMessage() for r in caplog.records)
    assert new.state_dict()["start"] == [[epoch, int(fraction * new.epoch_samples(0, epoch))]]
    assert new.state_dict()["batches"] == 0 and new.state_dict()["dp_size"] == 4
    first = take(new, 1)[0]
    assert first["epoch"].tolist() == [epoch, epoch]
    # and the new layout resumes exactly from its own states from then on
    straight = take(loader(data["a"], dp_size=4, num_workers=0, mbs=2, state=state), 9)
    mid = loader(data["a"], dp_size=4, num_workers=0, mbs=2, state=state)
    take(mid, 4)
    same_batches(
        take(loader(data["a"], dp_size=4, num_workers=0, mbs=2, state=mid.state_dict()), 5), straight[4:]
    )


# -- mixtures ---------------------------------------------------------------------------------
def test_mixture_proportions_and_per_source_epochs(data):
    mix = [(data["a"], 0.7), (data["b"], 0.3)]
    mbs, n_batches = 8, 200
    ranks = [take(loader(mix, dp_rank=r, num_workers=2, mbs=mbs), n_batches) for r in (0, 1)]
    source = torch.cat([b["source"] for bs in ranks for b in bs])
    n = source.numel()
    share = (source == 0).double().mean().item()
    assert abs(share - 0.7) < 3 * math.sqrt(0.7 * 0.3 / n), share
    for bs in ranks:
        for b in bs[:3]:
            check_content(b, mbs)
        keys = torch.cat([b["keys"] for b in bs])
        src = torch.cat([b["source"] for b in bs])
        assert ((keys >= 100_000) == (src == 1)).all()  # the source tensor names the sample's dataset
    # the smaller, lighter source has its own epoch counter; it passes epoch 0 and repeats nothing within it
    # each source has its own epoch cursor per worker: its epochs run in order, each complete
    # epoch holds exactly E(s, e) distinct samples; epoch-0 samples are disjoint across ranks
    probe = loader(mix, num_workers=2, mbs=mbs)
    epoch0 = [set(), set()]
    for rank, bs in enumerate(ranks):
        for lw in range(2):
            mine = bs[lw::2]
            epoch, src, keys = (torch.cat([b[k] for b in mine]) for k in ("epoch", "source", "keys"))
            for s in (0, 1):
                e_s, k_s = epoch[src == s].tolist(), keys[src == s].tolist()
                assert e_s == sorted(e_s) and e_s[-1] >= 1
                for e in range(e_s[-1]):
                    in_e = [k for k, ee in zip(k_s, e_s, strict=True) if ee == e]
                    assert len(in_e) == len(set(in_e)) == probe.epoch_samples(s, e)
                epoch0[rank] |= {(s, k) for k, ee in zip(k_s, e_s, strict=True) if ee == 0}
    probe.close()
    assert not epoch0[0] & epoch0[1]
    same_batches(take(loader(mix, dp_rank=1, num_workers=2, mbs=mbs), 20), ranks[1][:20])


def test_mixture_resumes_exactly(data):
    mix = [(data["a"], 0.7), (data["b"], 0.3)]
    mbs, after = 8, 5
    straight = take(loader(mix, dp_rank=1, num_workers=2, mbs=mbs), 120)  # source b passes its epoch 0
    epochs_b = [int(b["epoch"][b["source"] == 1].max()) if (b["source"] == 1).any() else 0 for b in straight]
    cross = next(i for i, e in enumerate(epochs_b) if e > 0)  # source b enters its epoch 1
    for c in (1, 4, 7, cross - 1, cross, cross + 1):
        ld = loader(mix, dp_rank=1, num_workers=2, mbs=mbs)
        take(ld, c)
        other = loader(mix, dp_rank=0, num_workers=2, mbs=mbs)
        take(other, c)
        assert ld.state_dict() == other.state_dict()
        resumed = take(loader(mix, dp_rank=1, num_workers=2, mbs=mbs, state=ld.state_dict()), after)
        same_batches(resumed, straight[c : c + after])


def test_changed_mixture_warns_and_places_each_source_by_its_data(data, caplog):
    old = loader([(data["a"], 0.7), (data["b"], 0.3)], num_workers=2, mbs=8)
    take(old, 130)  # both sources past epoch 0
    new_sources = [(data["b"], 0.5), (data["one"], 1.0), (data["a"], 0.5)]  # reordered, reweighted, added
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        new = loader(new_sources, dp_size=1, num_workers=0, mbs=8, state=old.state_dict())
    assert any("different layout" in r.getMessage() and "sources" in r.getMessage() for r in caplog.records)
    start_b, start_one, start_a = new.state_dict()["start"]
    assert start_one == [0, 0]  # a source the old run did not have starts at its beginning
    assert start_a[0] >= 1 and start_b[0] >= 1  # the others continue in the epoch they had reached
    batch = take(new, 1)[0]
    check_content(batch, 8)
    assert set(batch["epoch"][batch["source"] == 0].tolist()) <= {start_b[0], start_b[0] + 1}


# -- errors ------------------------------------------------------------------------------------
def test_tokenizer_hash_mismatch_is_refused(data):
    with pytest.raises(ValueError) as e:
        loader(data["a"], tokenizer_sha256="ef" * 32)
    msg = str(e.value)
    assert data["a"] in msg and SHA[:12] in msg and ("ef" * 6) in msg and "dlm prepare" in msg
    with pytest.raises(ValueError, match="different tokenizers") as e:
        loader([(data["a"], 1.0), (data["other_tok"], 1.0)], dp_size=1, num_workers=0)
    assert data["other_tok"] in str(e.value)


def test_seq_len_mismatch_is_refused(data):
    with pytest.raises(ValueError, match=r"seq_len=32.*data\.seq_len=16") as e:
        loader(data["seq32"], dp_size=1, num_workers=0)
    assert data["seq32"] in str(e.value)


def test_too_few_samples_for_the_reader_slots(data):
    # 50 samples over 4 ranks x 4 workers: 3 per reader slot, less than one micro batch of 4
    with pytest.raises(LoaderConfigError) as e:
        loader(data["one"], dp_size=4, num_workers=4, mbs=4)
    msg = str(e.value)
    for part in (
        data["one"],
        "50 train samples",
        "dp_size=4",
        "data.num_workers=4",
        "16 reader slots",
        "train.micro_batch_size=4",
    ):
        assert part in msg, part
    keys = []  # the suggested fix works: every rank reads its share of the single shard
    for rank in range(4):
        one = loader(data["one"], dp_rank=rank, dp_size=4, num_workers=0, mbs=4, epochs=1)
        keys += [k for b in one for k in b["keys"].tolist()]
        one.close()
    assert len(keys) == len(set(keys)) and 50 - len(keys) < 4
    # fewer shard groups than reader slots is no longer a problem: slots share groups
    loader(data["a"], dp_size=4, num_workers=4).close()  # 8 groups of 2 shards, 16 slots


def test_bad_arguments_are_refused(data):
    with pytest.raises(LoaderConfigError, match="one source"):
        loader([(data["a"], 1.0), (data["b"], 1.0)], epochs=1)
    with pytest.raises(LoaderConfigError, match="dp_rank"):
        loader(data["a"], dp_rank=2, dp_size=2)
    with pytest.raises(LoaderConfigError, match="weights"):
        loader([(data["a"], 0.0)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_drawn_samples_count_every_ranks_sources_without_communication(data, num_workers):
    """Each rank's drawn_samples() equals the sources of the batches all ranks returned, also
    after an exact resume; one source needs no draws."""
    sources = [(data["a"], 1.0), (data["b"], 3.0)]

    def run(rank, batches, state=None):
        ld = loader(sources, dp_rank=rank, dp_size=3, num_workers=num_workers, state=state)
        got = [next(ld) for _ in range(batches)]
        drawn, saved = ld.drawn_samples(), ld.state_dict()
        ld.close()
        return np.bincount(torch.cat([b["source"] for b in got]).numpy(), minlength=2), drawn, saved

    first = [run(rank, 7) for rank in range(3)]
    seen = sum(counts for counts, _, _ in first)
    assert seen.sum() == 3 * 7 * 4 and 0 < seen[0] < seen[1]
    for _, drawn, _ in first:
        assert drawn.tolist() == seen.tolist()
    resumed = [run(rank, 5, state) for rank, (_, _, state) in enumerate(first)]
    seen = seen + sum(counts for counts, _, _ in resumed)
    for _, drawn, _ in resumed:
        assert drawn.tolist() == seen.tolist()
    single = loader(data["a"], dp_size=3, num_workers=num_workers)
    take(single, 4)
    assert single.drawn_samples().tolist() == [3 * 4 * 4]
