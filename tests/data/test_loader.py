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
    return {
        "a": make_dataset(root / "a", sizes_a),
        "a_total": sum(sizes_a),
        "b": make_dataset(root / "b", sizes_b, first_key=100_000),
        "b_total": sum(sizes_b),
        "other_tok": make_dataset(root / "other_tok", [20] * 4, sha="cd" * 32),
        "seq32": make_dataset(root / "seq32", [20] * 4, seq_len=32),
        "one": make_dataset(root / "one", [50], first_key=500_000),
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
    assert len(union) + data["a_total"] - dp_size * W * per_slot == data["a_total"]


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
    straight = take(loader(mix, dp_rank=1, num_workers=2, mbs=mbs), 80)
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
    take(old, 70)  # both sources past epoch 0
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


def test_too_few_shards_for_the_reader_slots(data):
    with pytest.raises(LoaderConfigError) as e:
        loader(data["a"], dp_size=4, num_workers=4)  # 8 groups of 2 shards, 16 slots
    msg = str(e.value)
    for part in (
        data["a"],
        "16 train shards",
        "dp_size=4",
        "num_workers=4",
        "16 reader slots",
        "shuffle_shards",
    ):
        assert part in msg, part
    loader(data["a"], dp_size=4, num_workers=4, shuffle_shards=1).close()  # the suggested fix works


def test_bad_arguments_are_refused(data):
    with pytest.raises(LoaderConfigError, match="one source"):
        loader([(data["a"], 1.0), (data["b"], 1.0)], epochs=1)
    with pytest.raises(LoaderConfigError, match="dp_rank"):
        loader(data["a"], dp_rank=2, dp_size=2)
    with pytest.raises(LoaderConfigError, match="weights"):
        loader([(data["a"], 0.0)])
