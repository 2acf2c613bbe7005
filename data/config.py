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
    name: str = "tokenizer"
    vocab_size: int = 8000
    model_type: str = "bpe"  # bpe | unigram
    jsonl_field: str = "text"
    on_error: str = "skip"  # skip | fail
    max_sentences: int = 1_000_000  # sampling cap (sentencepiece input_sentence_size)
    max_sentence_length: int = 8192  # bytes; longer lines are cut
    spare_tokens: int = 8  # reserved <extra_i> ids after pad/bos/eos/mask
    character_coverage: float = 0.9995
    seed: int = 0
    num_threads: int = 2


@dataclass
class PrepareConfig:
    input: list[str] = field(default_factory=list)
    output: str = MISSING  # directory for *.tar shards and manifest.json
    # a `dlm tokenizer` .model, or a Hugging Face tokenizer.json or a directory holding one
    # (e.g. <import>/tokenizer/ of `dlm import-hf`); special ids from its tokenizer_config.json
    tokenizer: str = MISSING
    seq_len: int = 2048
    jsonl_field: str = "text"
    on_error: str = "skip"  # skip | fail
    workers: int = 2  # tokenizer processes
    chunk_chars: int = 100_000  # documents are cut into pieces this long before encoding
    samples_per_shard: int = 4096
    eval_fraction: float = 0.0  # documents held out into eval-*.tar shards
    seed: int = 0  # which documents are held out
    progress: bool = True  # a progress bar when stderr is a terminal


@dataclass
class SourceConfig:
    path: str = MISSING  # dataset directory, or a URL template with {name} ('pipe:...')
    weight: float = 1.0
