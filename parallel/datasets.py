"""Megatron indexed datasets (`<prefix>.bin` / `<prefix>.idx`) through megatron-core's own
dataset code (`megatron.core.datasets`): the writer behind `dlm prepare format=megatron`, and
the GPT-style samples `data.source=megatron` trains on.

Reading. Every source is a Megatron prefix (a corpus made by Megatron-LM's
preprocess_data.py or `IndexedDatasetBuilder`) or a directory `dlm prepare format=megatron`
wrote (manifest.json + train/eval prefixes). megatron-core builds the sample index
(GPTDataset: documents shuffled per epoch, cut into samples of exactly seq_len tokens, as
`add_extra_token_to_sequence=False`: no autoregressive +1 token) and, for several sources,
the blend (BlendedDataset). Sample `i` of the run is the dataset's item `i`: a function of
(seed, i, planned number of samples), so that the global sample index the trainer passes is
the data position (exact resume from the consumed-sample count, the same sample for every
tensor/pipeline peer, disjoint data-parallel shares), as Megatron-LM's loop does.

Document ids for document attention come from megatron's own index arrays (the document
and sample index): the parts of a sample are numbered 0, 1, ... (by position, not by
document id: across epochs a document can sit next to itself). With an EOS closing every
document they equal the EOS-derived segments of our shards.

The index is built collectively, as in Megatron-LM: every rank calls `build_samples`; world
rank 0 builds and caches it in `cache_dir` (which must be on a file system every node
sees), the other reading ranks load it after a barrier; ranks that read nothing build
nothing (`reads=False`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from data.files import fsync_dir
from data.pipeline import DataConfigError, TrainData

FORMAT = "dlm-megatron/1"  # the manifest format of `dlm prepare format=megatron`
MANIFEST = "manifest.json"
CHECKED_DOCUMENTS = 64  # documents per prefix whose ids are checked against the tokenizer before start
EVAL_SAMPLES = 4096  # samples of the eval split (repeated past its end, like the shards' eval)


# -- writing --------------------------------------------------------------------------------
class IndexedWriter:
    """Documents (token ids, EOS included) -> `<prefix>.bin/.idx` with megatron-core's
    IndexedDatasetBuilder, one item per document (GPTDataset's unit is the item). Written
    under `.tmp` names, fsynced and renamed when finished, the .idx last: a prefix that
    exists is complete. uint16 below 65,500 ids (megatron's optimal dtype), else int32."""

    def __init__(self, prefix: Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.dtype = DType.optimal_dtype(vocab_size)
        self.builder = IndexedDatasetBuilder(f"{self.prefix}.bin.tmp", dtype=self.dtype)
        self.documents = self.tokens = 0
        self.pending = 0  # ids of the document being written (add_piece)

    def add(self, ids: np.ndarray) -> None:
        """One whole document."""
        self.add_piece(ids)
        self.end_document()

    def add_piece(self, ids: np.ndarray) -> None:
        """Ids of the document being written (dlm prepare's long whole-file documents come in
        pieces): written as IndexedDatasetBuilder.add_item writes an item (indexed_dataset.py:
        973-974); the item is recorded once whole, by end_document."""
        self.builder.data_file.write(np.asarray(ids).astype(self.dtype).tobytes(order="C"))
        self.pending += int(np.asarray(ids).size)

    def end_document(self) -> None:
        """End the document of the pieces added: one item, as add_item records it (:975)."""
        self.builder.sequence_lengths.append(self.pending)
        self.builder.end_document()
        self.documents += 1
        self.tokens += self.pending
        self.pending = 0

    def append(self, prefix: Path, documents: int, tokens: int) -> None:
        """Every document of another complete prefix of `documents` documents (the merge of
        partitions); an empty one is skipped (megatron cannot map an empty .bin)."""
        if documents:
            self.builder.add_index(str(prefix))
        self.documents += documents
        self.tokens += tokens

    def finish(self) -> dict:
        self.builder.finalize(f"{self.prefix}.idx.tmp")
        for suffix in (".bin", ".idx"):
            tmp = Path(f"{self.prefix}{suffix}.tmp")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, f"{self.prefix}{suffix}")
        fsync_dir(self.prefix.parent)
        return {"prefix": self.prefix.name, "documents": self.documents, "tokens": self.tokens}


# -- what a run reads -----------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One data.sources entry: its train prefix and, for a prepared directory, its eval prefix."""

    key: str  # data.sources[i].path, for messages
    train: str
    eval: str | None
    manifest: dict | None  # the `dlm prepare format=megatron` manifest, None for a plain prefix


def resolve(index: int, path: str) -> Source:
    key = f"data.sources[{index}].path={path}"
    manifest_path = Path(path) / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise DataConfigError(
                f"{key}: {manifest_path} is a {manifest.get('format')} dataset, not {FORMAT}: "
                "read it with data.source=shards, or prepare it again with format=megatron"
            )
        splits = manifest["splits"]
        eval_prefix = str(Path(path) / splits["eval"]["prefix"]) if splits["eval"]["documents"] else None
        return Source(key, str(Path(path) / splits["train"]["prefix"]), eval_prefix, manifest)
    if IndexedDataset.exists(path):
        return Source(key, path, None, None)
    raise DataConfigError(
        f"{key}: neither a `dlm prepare format=megatron` directory (no {manifest_path}) nor a Megatron "
        f"indexed dataset prefix (no {path}.bin and {path}.idx)"
    )


def check_ids(source: Source, vocab_size: int, eos_id: int) -> dict:
    """Fail before start when the corpus cannot come from this tokenizer: ids of CHECKED_DOCUMENTS
    documents spread over the corpus must be < vocab_size, and the storage dtype must hold the
    vocabulary. Returns {documents, tokens, eos_ended: share of the checked documents ending in EOS}."""
    if Path(f"{source.train}.bin").stat().st_size == 0:
        raise DataConfigError(f"{source.key}: {source.train} holds no documents")
    dataset = IndexedDataset(source.train)
    count = len(dataset)
    dtype = np.dtype(dataset.index.dtype)
    if dtype == np.uint16 and vocab_size > 65536:
        raise DataConfigError(
            f"{source.key}: the corpus stores uint16 ids, but the tokenizer (data.tokenizer) has "
            f"{vocab_size:,} ids: it was made with another tokenizer"
        )
    if count == 0:
        raise DataConfigError(f"{source.key}: {source.train} holds no documents")
    ended = 0
    for document in np.unique(np.linspace(0, count - 1, min(count, CHECKED_DOCUMENTS)).astype(np.int64)):
        ids = dataset[int(document)]
        if ids.size and int(ids.max()) >= vocab_size:
            raise DataConfigError(
                f"{source.key}: document {document} of {source.train} holds id {int(ids.max())}, outside the "
                f"tokenizer's {vocab_size:,} ids (data.tokenizer): the corpus was made with another tokenizer"
            )
        ended += bool(ids.size) and int(ids[-1]) == eos_id
    checked = min(count, CHECKED_DOCUMENTS)
    return {"documents": count, "tokens": int(dataset.sequence_lengths.sum()), "eos_ended": ended / checked}


def all_prepared(sources: list[Source]) -> bool:
    """True when every source is a prepared directory, False when every one is a prefix."""
    prepared = {s.manifest is not None for s in sources}
    if len(prepared) > 1:
        raise DataConfigError(
            "data.sources: mix either `dlm prepare format=megatron` directories or Megatron prefixes, "
            "not both (the eval split is a prepared directory's own, or a share of a prefix's documents)"
        )
    return prepared == {True}


class _Vocab:
    """What GPTDataset asks of a tokenizer (no `pad`: no id is rewritten as padding)."""

    def __init__(self, vocab_size: int, eos_id: int):
        self.vocab_size, self.eod = vocab_size, eos_id
        self.unique_identifiers = {"class": "dlm", "vocab_size": vocab_size, "eod": eos_id}


def gpt_config(sources: list[Source], weights, *, seq_len, seed, eval_fraction, vocab, cache_dir):
    """megatron's dataset config: a prepared directory's own eval prefix, or for plain
    prefixes a document split holding out `eval_fraction` (Megatron-LM's --split)."""
    blend_weights = None if len(sources) == 1 else list(weights)
    common = dict(
        random_seed=seed,
        sequence_length=seq_len,
        tokenizer=_Vocab(vocab.vocab_size, vocab.eos_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
        path_to_cache=str(cache_dir) if cache_dir and torch.distributed.is_initialized() else None,
    )
    if all_prepared(sources):
        evals = [s.eval for s in sources]
        eval_blend = (evals, blend_weights) if all(evals) else None
        per_split = [([s.train for s in sources], blend_weights), eval_blend, None]
        return GPTDatasetConfig(blend_per_split=per_split, **common)
    return GPTDatasetConfig(
        blend=([s.train for s in sources], blend_weights), split=split(eval_fraction), **common
    )


def split(eval_fraction: float) -> str:
    """Megatron's --split string for a plain prefix (fixed point: it parses digits and dots)."""
    return f"{1 - eval_fraction:.12f},{eval_fraction:.12f},0"


def split_documents(documents: int, eval_fraction: float) -> tuple[range, range]:
    """The (train, eval) documents megatron's split gives a plain prefix of `documents`
    (its split matrix, rounded as BlendedMegatronDatasetBuilder does)."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split(eval_fraction)))
    ranges = [
        range(round(bounds[0] * documents), round(bounds[1] * documents)) if bounds else range(0)
        for bounds in matrix[:2]
    ]
    return ranges[0], ranges[1]


def build_samples(
    sources: list[Source], weights, *, seq_len, seed, eval_fraction, vocab, cache_dir, train_samples, reads
) -> tuple[GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None]:
    """(train, eval) datasets of exactly train_samples / EVAL_SAMPLES samples, built by
    megatron's BlendedMegatronDatasetBuilder. Collective: every rank calls it."""
    config = gpt_config(
        sources,
        weights,
        seq_len=seq_len,
        seed=seed,
        eval_fraction=eval_fraction,
        vocab=vocab,
        cache_dir=cache_dir,
    )
    sizes = [train_samples, EVAL_SAMPLES, 0]
    train, evaluation, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: reads, config).build()
    return train, evaluation


def drop_broken_cache(cache_dir: Path) -> list[str]:
    """megatron-core writes its index files in place (numpy.save, gpt_dataset.py:548-550): a
    job killed while writing one leaves a truncated .npy that the next start would take for a
    cache hit and fail to map. Delete every index that does not load, with its siblings of
    the same dataset (description and other indexes), so that megatron builds it again."""
    dropped = []
    for path in sorted(cache_dir.glob("*.npy")) if cache_dir.is_dir() else []:
        try:
            np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            dataset = path.name.rsplit("-", 1)[0]  # <hash>-<class>-<split>-<name>.npy
            for sibling in cache_dir.glob(f"{dataset}-*"):
                sibling.unlink(missing_ok=True)
                dropped.append(sibling.name)
    return dropped


def locate(dataset, index: int) -> tuple[int, GPTDataset, int]:
    """(source number, its GPTDataset, the item in it) of sample `index` of a dataset or blend."""
    if isinstance(dataset, BlendedDataset):
        source = int(dataset.dataset_index[index])
        return source, dataset.datasets[source], int(dataset.dataset_sample_index[index])
    return 0, dataset, index


def segments(dataset: GPTDataset, item: int) -> np.ndarray:
    """[seq_len] document numbers (0, 1, ...) of item `item`, from megatron's document and
    sample index: the lengths of the parts of documents the sample is cut from."""
    position = int(dataset.shuffle_index[item])
    (first, first_offset), (last, last_offset) = (
        dataset.sample_index[position],
        dataset.sample_index[position + 1],
    )
    if first == last:
        parts = np.array([last_offset - first_offset], dtype=np.int64)
    else:
        documents = dataset.document_index[first : last + 1]
        parts = dataset.dataset.sequence_lengths[documents].astype(np.int64)
        parts[0] -= first_offset
        parts[-1] = last_offset
    parts = parts[parts > 0]
    return np.repeat(np.arange(len(parts), dtype=np.int64), parts)


def sample(dataset, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(source number, tokens [seq_len], segments [seq_len]) of sample `index`."""
    if index >= len(dataset):
        raise IndexError(f"sample {index} of a dataset of {len(dataset)} (built for fewer samples)")
    source, gpt, item = locate(dataset, index)
    tokens = gpt[item]["tokens"]
    return source, tokens, torch.from_numpy(segments(gpt, item))


class MegatronSamples(TrainData):
    """A rank's access to the megatron-built samples: global sample index -> sample."""

    def __init__(self, train, evaluation, *, names: list[str], seq_len: int, planned: int, summary: str):
        self.train_set, self.eval_set = train, evaluation
        self.names, self.seq_len, self.planned = names, seq_len, planned
        self.summary = summary
        self._counted, self._drawn = 0, np.zeros(len(names), dtype=np.int64)
        self.samples_per_epoch = self._samples_per_epoch()  # read every step: computed once

    def train(self, index):
        return self._batch(self.train_set, index.tolist())

    def eval(self, index):
        if self.eval_set is None:
            raise DataConfigError(
                "evaluation (train.eval_every, dlm eval) needs an eval split: data.eval_fraction > 0 for "
                "Megatron prefixes, or `dlm prepare format=megatron eval_fraction=...` directories"
            )
        return self._batch(self.eval_set, [i % len(self.eval_set) for i in index.tolist()])

    def _batch(self, dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [sample(dataset, i) for i in indices]
        return {"tokens": torch.stack([r[1] for r in rows]), "segments": torch.stack([r[2] for r in rows])}

    def state_dict(self) -> dict:
        return {"source": "megatron", "planned_samples": self.planned}

    def source_metrics(self, samples_read: int) -> dict[str, float]:
        """Tokens read from each source by all ranks: the blend's source of samples
        [0, samples_read), counted incrementally."""
        if samples_read > self._counted:
            if isinstance(self.train_set, BlendedDataset):
                sources = self.train_set.dataset_index[self._counted : samples_read]
                self._drawn += np.bincount(sources, minlength=len(self.names))
            else:
                self._drawn[0] += samples_read - self._counted
            self._counted = samples_read
        metrics = {}
        for name, drawn, per_epoch in zip(
            self.names, self._drawn.tolist(), self.samples_per_epoch, strict=True
        ):
            metrics[f"data/tokens/{name}"] = drawn * self.seq_len
            metrics[f"data/epochs/{name}"] = drawn / per_epoch
        return metrics

    def _samples_per_epoch(self) -> list[int]:
        """Samples of seq_len tokens in one pass over each source's train documents."""
        datasets = self.train_set.datasets if isinstance(self.train_set, BlendedDataset) else [self.train_set]
        tokens = [int(d.dataset.sequence_lengths[d.indices].sum()) for d in datasets]
        return [max(1, n // self.seq_len) for n in tokens]

    def epoch_report(self, total_samples: int) -> str:
        epochs = ", ".join(
            f"{name} {n:,} samples/epoch" for name, n in zip(self.names, self.samples_per_epoch, strict=True)
        )
        return (
            f"epoch: {epochs}; megatron's sample index is built for {self.planned:,} samples "
            f"(this run reads {total_samples:,})"
        )


def open_samples(
    cfg, vocab, *, seed: int, run_samples: int, state: dict | None, cache_dir, reads: bool
) -> TrainData:
    """The `data.source=megatron` data of one rank (cfg: DataConfig). Collective (every rank
    calls it; ranks with reads=False get NoData). The index is built for the run's planned
    samples, or for the first run's when a resumed run plans fewer, so that a resumed run
    reads the samples the first one would have; a run extended past its plan rebuilds it for
    the new total (positions already read keep their samples unless a source's epoch count
    changes: megatron's index depends on it)."""
    from data.pipeline import NoData, mixture_specs, weighted_sources

    sources = [resolve(i, s.path) for i, s in enumerate(cfg.sources)]
    weights = [weight for _, weight in weighted_sources(cfg, run_samples)]
    planned = run_samples
    if state and state.get("source") == "megatron":
        planned = max(planned, int(state["planned_samples"]))
    if cache_dir and torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
        drop_broken_cache(Path(cache_dir))  # before megatron's builder looks (the others wait in it)
    train, evaluation = build_samples(
        sources,
        weights,
        seq_len=cfg.seq_len,
        seed=seed,
        eval_fraction=cfg.eval_fraction,
        vocab=vocab,
        cache_dir=cache_dir,
        train_samples=planned,
        reads=reads,
    )
    if not reads:
        return NoData()
    names = [spec.label for spec in mixture_specs(cfg)]
    return MegatronSamples(
        train, evaluation, names=names, seq_len=cfg.seq_len, planned=planned, summary=vocab.summary
    )


def tokenizer_path(configured: str | None, sources: list[Source]) -> str | None:
    """data.tokenizer, else the one the prepared directories name (None for prefixes)."""
    prepared = all_prepared(sources)  # refuses a mix of the two
    return configured or (sources[0].manifest["tokenizer"]["path"] if prepared else None)


def describe(cfg) -> tuple[dict, str]:
    """Resolve data.sources, load the tokenizer (data.tokenizer, else the one a prepared
    directory names) and check every corpus against it. Returns (the tokenizer's
    description, a summary of the sources)."""
    from data.tokenizer import load_tokenizer

    sources = [resolve(i, s.path) for i, s in enumerate(cfg.sources)]
    path = tokenizer_path(cfg.tokenizer, sources)
    if path is None:
        raise DataConfigError(
            "data.source=megatron needs data.tokenizer: the tokenizer the corpus was made with "
            "(a Megatron .bin/.idx does not record it)"
        )
    try:
        tokenizer = load_tokenizer(path).describe()
    except (OSError, ValueError) as e:
        key = "data.tokenizer" if cfg.tokenizer else f"the tokenizer {sources[0].key} names"
        raise DataConfigError(f"{key}: {e}") from e
    for source in sources:
        made_with = source.manifest["tokenizer"] if source.manifest else None
        if made_with and made_with["sha256"] != tokenizer["sha256"]:
            raise DataConfigError(
                f"{source.key} was prepared with {made_with['path']} (sha256 {made_with['sha256'][:12]}), "
                f"not data.tokenizer={path} (sha256 {tokenizer['sha256'][:12]})"
            )
    stats = [check_ids(source, tokenizer["vocab_size"], tokenizer["eos_id"]) for source in sources]
    for source, checked in zip(sources, stats, strict=True):
        if source.manifest is None:
            check_split(source, checked["documents"], cfg.eval_fraction)
    listed = ", ".join(f"{s.path} x{s.weight:g}" for s in cfg.sources)
    tokens, documents = sum(x["tokens"] for x in stats), sum(x["documents"] for x in stats)
    summary = f"megatron [{listed}]: {tokens:,} tokens in {documents:,} documents"
    if not any(x["eos_ended"] for x in stats):
        summary += " (no EOS at document ends: document ids from megatron's index)"
    return tokenizer, summary


def check_split(source: Source, documents: int, eval_fraction: float) -> None:
    """Both splits of a plain prefix hold documents (megatron would loop forever building
    samples from an empty one)."""
    train, held_out = split_documents(documents, eval_fraction)
    if not train:
        raise DataConfigError(f"{source.key}: data.eval_fraction={eval_fraction} leaves no train document")
    if eval_fraction > 0 and not held_out:
        raise DataConfigError(
            f"{source.key}: data.eval_fraction={eval_fraction} holds out none of its {documents:,} documents "
            "(megatron splits by document): raise it, or set data.eval_fraction=0 (and train.eval_every=0)"
        )


def train_tokens(sources: list[Source], eval_fraction: float) -> list[int]:
    """Tokens of each source's train documents (a plain prefix: megatron's train split)."""
    tokens = []
    for source in sources:
        if source.manifest is not None:
            tokens.append(source.manifest["splits"]["train"]["tokens"])
            continue
        dataset = IndexedDataset(source.train)  # referenced while its arrays are read: they map its files
        train, _ = split_documents(len(dataset), eval_fraction)
        tokens.append(int(dataset.sequence_lengths[train.start : train.stop].sum()))
    return tokens
