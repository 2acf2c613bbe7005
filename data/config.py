"""Typed configs of the data commands (`dlm tokenizer`, `dlm prepare`) and of the
streaming sources the trainer reads. Registered in Hydra's ConfigStore by
pretrain/config.py; YAML defaults in conf/tokenizer.yaml and conf/prepare.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

MODEL_TYPES = ("bpe", "unigram")


@dataclass
class TokenizerConfig:
    input: list[str] = field(default_factory=list)  # files, dirs, globs, 'stdlib', 'manpages'
    output: str = MISSING  # directory; writes <output>/<name>.model and the HF tokenizer files
    name: str = "tokenizer"  # file stem: <output>/<name>.model, <name>.report.json
    vocab_size: int = 8000  # vocabulary size, special and spare tokens included
    model_type: str = "bpe"  # bpe | unigram
    jsonl_field: str = "text"  # text field of every record format: .jsonl(.gz/.zst/.xz), .parquet, .arrow
    on_error: str = "skip"  # on a bad document: skip (counted) | fail
    filter_field: str | None = None  # keep only records whose numeric field is in [filter_min, filter_max]
    filter_min: float | None = None  # lower bound (inclusive) of filter_field; None: open
    filter_max: float | None = None  # upper bound (inclusive) of filter_field; None: open
    max_sentences: int = 1_000_000  # cap on sampled sentences (sentencepiece input_sentence_size)
    max_sentence_length: int = 8192  # longest sentence in bytes; longer lines are cut
    spare_tokens: int = 8  # reserved <extra_i> ids after pad/bos/eos/mask
    character_coverage: float = 0.9995  # share of characters in the vocabulary; the rarest fall back to bytes
    seed: int = 0  # sentencepiece's seed: which sentences the max_sentences cap keeps
    num_threads: int = 2  # sentencepiece training threads


@dataclass
class PrepareConfig:
    input: list[str] = field(default_factory=list)  # files, dirs, globs, 'stdlib', 'manpages'
    output: str = MISSING  # directory for the shards (or train/eval .bin/.idx) and manifest.json
    # shards: packed samples of seq_len in webdataset .tar shards (data.source=shards);
    # megatron: Megatron indexed datasets (train.bin/.idx, eval.bin/.idx), one item per
    # document, packed at training time by megatron-core (data.source=megatron)
    format: str = "shards"
    # a `dlm tokenizer` .model, or a Hugging Face tokenizer.json or a directory holding one
    # (e.g. <import>/tokenizer/ of `dlm import-hf`); special ids from its tokenizer_config.json
    tokenizer: str = MISSING
    seq_len: int = 2048  # tokens per packed sample (data.seq_len of the runs that read them)
    jsonl_field: str = "text"  # text field of every record format: .jsonl(.gz/.zst/.xz), .parquet, .arrow
    on_error: str = "skip"  # on a bad document: skip (counted) | fail
    filter_field: str | None = None  # keep only records whose numeric field is in [filter_min, filter_max]
    filter_min: float | None = None  # lower bound (inclusive) of filter_field; None: open
    filter_max: float | None = None  # upper bound (inclusive) of filter_field; None: open
    workers: int = 2  # tokenizer processes
    chunk_chars: int = 100_000  # documents are cut into pieces this long before encoding
    samples_per_shard: int = 4096  # samples per .tar shard
    eval_fraction: float = 0.0  # share of the documents held out into eval-*.tar shards
    seed: int = 0  # seed of the choice of held-out documents
    partitions: int = 1  # split the input files into this many size-balanced parts, merged into output
    partition: int | None = None  # prepare only this part (0-based) into <output>/parts/; None: all + merge
    progress: bool = True  # a progress bar when stderr is a terminal


@dataclass
class SourceConfig:
    path: str = MISSING  # dataset directory, or a URL template with {name} ('pipe:...')
    weight: float = 1.0  # sampling weight, relative to the other weighted sources
    tokens: int | None = None  # a token budget: this source supplies this many of the run's tokens
    max_epochs: float | None = None  # refuse a run that would go through this source more often
    name: str | None = None  # the source's name in reports; None: the path's last component
