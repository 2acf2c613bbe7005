"""`dlm import-hf` and `dlm export-hf`: Hugging Face causal LMs <-> DLM checkpoints.

    dlm import-hf source=<hf dir> output=<dir> [parallel.tp=2 parallel.pp=1] [mask_token=append|auto|<id>]
    torchrun --nproc-per-node 2 -m pretrain.cli import-hf source=... output=... parallel.tp=2
    dlm export-hf checkpoint=<run dir | checkpoint dir> output=<hf dir> [format=bidirectional|source]

Import writes `<output>/checkpoints/step_0/` (a model-only checkpoint that any layout loads,
e.g. `dlm train checkpoint.init_from=<output>`), `<output>/checkpoints/latest` and
`<output>/tokenizer/`; its config.yaml describes the source architecture (model.name
"imported"). Everything is written under `<output>.tmp/` and renamed when complete; the source
is checked from its headers first, so a bad source fails before anything is built or written.

Export writes safetensors files of at most `max_shard_size` (+ index), config.json with the
DLM fields and the tokenizer. `format=bidirectional` (default) is transformers' Gemma with
`use_bidirectional_attention=True` and `is_causal=False` (see BIDIRECTIONAL):
`AutoModelForCausalLM.from_pretrained(out)(ids, attention_mask=...).logits` are the denoiser's
logits under every attention implementation, padded batches included, no remote code.
`format=source` is the Llama/Mistral/Qwen2 layout, which transformers runs causally unless the
caller passes a full 4D attention mask.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from parallel.hf_files import (
    SUPPORTED,
    ConvertError,
    HFArch,
    HFSource,
    describe_source,
    iter_tokenizer_files,
    parse_size,
    resolve_mask_token,
)
from parallel.topology import ConfigError, LaunchEnv, Topology, cause_line, padded_vocab_size

FORMATS = ("bidirectional", "source")
# The architecture fields HFArch and ModelConfig share by name, copied both ways (the
# architecture name, the exact vocab rows and max_seq_len are set separately).
ARCH_FIELDS = tuple(
    f.name for f in fields(HFArch) if f.name not in ("architecture", "vocab_size", "max_seq_len")
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BYTE_TOKENIZER_NOTE = (
    "byte-level run: no tokenizer written (ids 0-255 are bytes, 256 pad, 257 bos, 258 eos, 259 mask)"
)
BYTE_SOURCES = ("stdlib", "text")
TOKENIZED_SOURCES = ("shards", "megatron")  # read with a tokenizer: data.tokenizer or a manifest's
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# The Gemma config keys that make transformers (5.23) run every path bidirectionally:
# - use_bidirectional_attention: GemmaAttention.is_causal = False (modeling_gemma.py), which SDPA
#   and flash attention fall back on when no mask is materialised and no is_causal is passed;
#   alone it leaves eager attention and padded batches causal (create_causal_mask builds a causal mask);
# - is_causal: create_causal_mask (masking_utils.py) then builds create_bidirectional_mask (padding
#   only), and GemmaModel.forward (merge_with_config_defaults, utils/generic.py) passes
#   is_causal=False to every attention call: eager, sdpa, flex_attention, padded or not.
# is_causal is an extra config attribute: from_pretrained sets it, save_pretrained writes it back.
# With it, use_bidirectional_attention is redundant inside GemmaModel.forward; it is kept as
# Gemma's documented flag (and for code that runs GemmaAttention without GemmaModel.forward).
BIDIRECTIONAL = {"use_bidirectional_attention": True, "is_causal": False}


@dataclass
class ConvertParallelConfig:
    tp: int = 1  # tensor-parallel size; tp x pp = the number of processes
    pp: int = 1  # pipeline-parallel size; tp x pp = the number of processes


@dataclass
class ImportHFConfig:
    source: str = MISSING  # HF model directory: config.json + model.safetensors (or sharded + index)
    output: str = MISSING  # directory: checkpoints/step_0, checkpoints/latest, tokenizer/
    # the conversion's layout (tp x pp processes, no data parallelism)
    parallel: ConvertParallelConfig = field(default_factory=ConvertParallelConfig)
    # the MASK token: append (new row = mean row) | auto (tokenizer's mask token, else append) | <id>
    mask_token: str = "auto"
    logit_shift: bool = True  # AR-initialised: position i keeps predicting token i+1 (DiffuLLaMA/Dream)
    make_vocab_size_divisible_by: int = 128  # embedding rows: the vocabulary padded to a multiple of this
    max_seq_len: int | None = None  # the model's max_seq_len; None: the source's max_position_embeddings
    overwrite: bool = False  # replace a non-empty output directory
    progress: bool = True  # a progress bar when stderr is a terminal
    seed: int = 0  # the seed of the written config.yaml


@dataclass
class ExportHFConfig:
    checkpoint: str = MISSING  # a checkpoint dir, a checkpoints/ dir or a run/import output dir
    output: str = MISSING  # Hugging Face model directory to write
    format: str = "bidirectional"  # bidirectional (Gemma, no remote code) | source (Llama/Mistral/Qwen2)
    dtype: str = "float32"  # dtype of the written weights: float32 | bfloat16
    max_shard_size: str = "2GB"  # largest safetensors file: e.g. 2GB, 500MB or a number of bytes
    # the conversion's layout (tp x pp processes, no data parallelism)
    parallel: ConvertParallelConfig = field(default_factory=ConvertParallelConfig)
    overwrite: bool = False  # replace a non-empty output directory
    progress: bool = True  # a progress bar when stderr is a terminal


# -- shared ----------------------------------------------------------------------------------------
def _load(name: str, argv: list[str]):
    from pretrain.config import load_command_config

    return load_command_config(name, argv)


def _check_output(output: str, overwrite: bool) -> tuple[Path, Path]:
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"output={out} exists and is not empty (overwrite=true replaces it)")
    return out, out.with_name(out.name + ".tmp")


def _check_world(tp: int, pp: int, layout: dict) -> None:
    world = LaunchEnv.detect().world_size
    if world != tp * pp:
        raise ConfigError(
            f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} must equal the number of processes ({world}): "
            "conversion runs without data parallelism"
        )
    Topology.build(world, tp=tp, pp=pp, **layout)


def _layout(arch: HFArch, padded: int) -> dict:
    return dict(
        num_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        padded_vocab=padded,
    )


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not (enabled and sys.stderr.isatty()))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _peak_rss() -> tuple[float, float]:
    """(max over ranks, sum over ranks) of peak RSS in GB (collective)."""
    kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    values = torch.tensor([kb, kb], dtype=torch.float64)
    peak = values[:1].clone()
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(values[1:])
    return peak.item() * 1024 / 1e9, values[1].item() * 1024 / 1e9


def _sum(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item()


def _fail(command: str, e: Exception, code: int) -> int:
    cause = cause_line(e) if isinstance(e, ConfigError) else ""
    print(f"dlm {command}: {'invalid configuration' if code == 2 else 'error'}: {e}{cause}", file=sys.stderr)
    return code


def _main(command: str, name: str, argv: list[str], run) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _load(name, argv)
        plan = run.prepare(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        return _fail(command, e, 2)
    except (ConvertError, FileNotFoundError) as e:
        return _fail(command, e, 1)
    import parallel

    try:
        run.execute(cfg, plan)
    finally:
        parallel.shutdown_distributed()
    return 0


# -- import ----------------------------------------------------------------------------------------
@dataclass
class ImportPlan:
    source: HFSource
    out: Path
    tmp: Path
    mask_id: int
    appended: bool
    mask_note: str
    vocab_size: int
    padded: int


def build_import_plan(cfg: ImportHFConfig) -> ImportPlan:
    """Every check that reads only headers and configs: nothing is built or written."""
    source = describe_source(cfg.source)
    mask_id, appended, note = resolve_mask_token(str(cfg.mask_token), source)
    vocab = source.arch.vocab_size + int(appended)
    if cfg.make_vocab_size_divisible_by <= 0:
        raise ConfigError(f"make_vocab_size_divisible_by={cfg.make_vocab_size_divisible_by} must be positive")
    padded = padded_vocab_size(vocab, cfg.make_vocab_size_divisible_by)
    _check_world(cfg.parallel.tp, cfg.parallel.pp, _layout(source.arch, padded))
    out, tmp = _check_output(cfg.output, cfg.overwrite)
    return ImportPlan(source, out, tmp, mask_id, appended, note, vocab, padded)


def build_model_config(cfg: ImportHFConfig, plan: ImportPlan):
    """The full pretrain Config written next to the weights: its model section is the source's."""
    from pretrain.config import Config, ModelConfig, ParallelConfig, validate

    a = plan.source.arch
    model = ModelConfig(
        name="imported",
        **{name: getattr(a, name) for name in ARCH_FIELDS},
        max_seq_len=cfg.max_seq_len or a.max_seq_len,
        vocab_size=plan.vocab_size,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        logit_shift=cfg.logit_shift,
        mask_token_id=plan.mask_id,
    )
    config = Config(
        seed=cfg.seed, model=model, parallel=ParallelConfig(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    )
    validate(config)
    return config


class ImportRun:
    prepare = staticmethod(build_import_plan)

    @staticmethod
    def execute(cfg: ImportHFConfig, plan: ImportPlan) -> None:
        import parallel
        from parallel.dims import count_parameters
        from parallel.hf_convert import ShardFiller, VocabLayout, build_dims, fill_model
        from parallel.hf_files import SliceReader
        from pretrain.config import to_yaml

        start = time.perf_counter()
        a = plan.source.arch
        config = build_model_config(cfg, plan)
        topo = parallel.init_distributed(
            tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=1, seed=cfg.seed, model_dims=_layout(a, plan.padded)
        )
        try:
            dims = build_dims(a, plan.padded)
            model = parallel.build_model(dims, topo, initialize=False)
            vocab = VocabLayout(
                a.vocab_size, plan.vocab_size, plan.padded, a.vocab_size if plan.appended else None
            )
            reader = SliceReader(plan.source)
            params = list(model.parameters())
            with _progress(len(params), cfg.progress and topo.rank == 0, "import") as bar:
                fill_model(model, ShardFiller(a, vocab, reader, topo), bar)
            filled = time.perf_counter()
            state = {"step": 0, "consumed_samples": 0, "imported_from": import_record(cfg, plan)}
            parallel.save_model_checkpoint(
                plan.tmp / "checkpoints" / "step_0",
                model,
                state=state,
                config_yaml=to_yaml(config),
                world_size=topo.world_size,
            )
            bytes_read = _sum(reader.bytes_read)
            peak, total_rss = _peak_rss()
        except BaseException:
            if topo.rank == 0:
                shutil.rmtree(plan.tmp, ignore_errors=True)
            raise
        if topo.rank != 0:
            return
        tokenizer = _copy_tokenizer(plan.source.path, plan.tmp / "tokenizer")
        written = _dir_bytes(plan.tmp)
        if plan.out.exists():
            shutil.rmtree(plan.out)
        os.replace(plan.tmp, plan.out)
        n = count_parameters(dims)["total"]
        lines = [
            f"dlm import-hf: {plan.source.path} ({a.architecture}) -> {plan.out}  [{topo.describe()}]",
            f"  {n / 1e6:.2f}M parameters (vocab {plan.vocab_size} padded to {plan.padded}); "
            f"mask token: {plan.mask_note}; logit_shift={cfg.logit_shift}",
            f"  read {bytes_read / 1e9:.3f} GB of {plan.source.bytes / 1e9:.3f} GB, "
            f"wrote {written / 1e9:.3f} GB "
            f"in {time.perf_counter() - start:.1f} s (start + read + map {filled - start:.1f} s); "
            f"peak RSS {peak:.2f} GB/rank (sum {total_rss:.2f} GB)",
            f"  tokenizer: {tokenizer}",
            *(f"  note: {note}" for note in plan.source.notes),
            f"  train from it: dlm train checkpoint.init_from={plan.out} ...",
        ]
        print("\n".join(lines), flush=True)


def import_record(cfg: ImportHFConfig, plan: ImportPlan) -> dict:
    s = plan.source
    return {
        "source": str(s.path.resolve()),
        "architecture": s.arch.architecture,
        "files": s.files,
        "dtypes": sorted(set(s.dtypes.values())),
        "source_vocab_size": s.arch.vocab_size,
        "mask_token": {"policy": str(cfg.mask_token), "id": plan.mask_id, "appended": plan.appended},
        "logit_shift": cfg.logit_shift,
        "notes": s.notes,
        "config": s.config,
    }


def _copy_tokenizer(source: Path, dest: Path) -> str:
    files = list(iter_tokenizer_files(source))
    if not files:
        return f"none found in {source} (nothing copied)"
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dest / f.name)
    return f"{len(files)} files copied to {dest}"


def import_main(argv: list[str]) -> int:
    return _main("import-hf", "import_hf", argv, ImportRun)


# -- export ----------------------------------------------------------------------------------------
@dataclass
class ExportPlan:
    checkpoint: Path
    config: object  # pretrain.config.Config of the checkpoint
    state: dict
    arch: HFArch  # architecture of the model (vocab_size = the model's vocabulary)
    source_architecture: str
    source_config: dict | None
    mask_id: int | None
    padded: int
    out: Path
    tmp: Path
    tokenizer: Path | None
    tokenizer_note: str
    token_ids: dict  # bos/eos/pad ids for config.json (TOKEN_ID_KEYS), None when unknown


def resolve_checkpoint(path: Path) -> Path:
    from pretrain.config import resolve_checkpoint as resolve

    return resolve(path, "checkpoint")


def load_checkpoint_config(checkpoint: Path):
    from pretrain.config import Config

    node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(checkpoint / "config.yaml"))
    return OmegaConf.to_object(node)


def _lineage(checkpoint: Path, config, state: dict, hops: int = 5):
    """(checkpoint, config, state) of this checkpoint and of the ones it was initialised from."""
    yield checkpoint, config, state
    for _ in range(hops):
        init = config.checkpoint.init_from
        if not init:
            return
        try:
            checkpoint = resolve_checkpoint(Path(init))
        except (ConfigError, OSError):
            return
        config = load_checkpoint_config(checkpoint)
        state = json.loads((checkpoint / "state.json").read_text())
        yield checkpoint, config, state


def find_tokenizer(checkpoint: Path, config, state: dict) -> tuple[Path | None, str]:
    """Where the HF tokenizer files of a checkpoint are: `<run or import dir>/tokenizer/` (of it or
    of the checkpoint it was initialised from), or next to the sentencepiece model of a shards run."""
    for ckpt, cfg, _ in _lineage(checkpoint, config, state):
        run_tok = ckpt.parent.parent / "tokenizer"
        if run_tok.is_dir() and any(run_tok.iterdir()):
            return run_tok, f"copied from {run_tok}"
        data = cfg.data
        if data.source in TOKENIZED_SOURCES:
            model = data.tokenizer or (_manifest_tokenizer(data) or {}).get("path")
            folder = Path(model) if model and Path(model).is_dir() else Path(model or ".").parent
            if model and (folder / "tokenizer.json").is_file():
                return folder, f"copied from {folder} (the tokenizer of {model})"
            return None, f"no tokenizer.json next to {model} (run `dlm tokenizer` to write it): none written"
        if ckpt is checkpoint and data.source in BYTE_SOURCES and not cfg.checkpoint.init_from:
            return None, BYTE_TOKENIZER_NOTE
    if config.data.source in BYTE_SOURCES:
        return None, BYTE_TOKENIZER_NOTE
    return None, "no tokenizer found: none written"


def _manifest_tokenizer(data) -> dict | None:
    """The tokenizer record of a shards run's first dataset (a megatron run's tokenizer):
    path, sha256, special ids."""
    try:
        from data.shards import load_manifest

        if data.source == "megatron":
            from data.pipeline import tokenizer_path
            from data.tokenizer import load_tokenizer

            return load_tokenizer(tokenizer_path(data)).describe()
        return load_manifest(data.sources[0].path)["tokenizer"]
    except Exception:  # noqa: BLE001 - a missing dataset only means no tokenizer to copy, no ids to take
        return None


def special_token_ids(
    source_config: dict | None, tokenizer: Path | None, checkpoint: Path, config, state: dict
) -> dict:
    """bos/eos/pad ids for config.json: the source model's (imports); each one it lacks is taken
    from the exported tokenizer's files, else from the data the model was trained on."""
    ids = {key: (source_config or {}).get(key) for key in TOKEN_ID_KEYS}
    for found in _declared_token_ids(tokenizer, checkpoint, config, state):
        if None not in ids.values():
            break
        ids = {key: found.get(key) if value is None else value for key, value in ids.items()}
    return ids


def _declared_token_ids(tokenizer: Path | None, checkpoint: Path, config, state: dict):
    yield _tokenizer_token_ids(tokenizer)
    yield _training_data_token_ids(checkpoint, config, state)


def _tokenizer_token_ids(folder: Path | None) -> dict:
    """The special ids that the tokenizer_config.json / special_tokens_map.json of a
    tokenizer.json declare ({} without one)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return {}
    from data.tokenizer import HFTokenizer

    try:
        tok = HFTokenizer(folder)
    except ValueError:  # e.g. no eos_token declared: nothing to take from it
        return {}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def _training_data_token_ids(checkpoint: Path, config, state: dict) -> dict:
    """The special ids of the data the model was trained on: the dataset manifest of a shards
    run, the byte tokenizer's of a byte-level run; none for an import."""
    for _, cfg, st in _lineage(checkpoint, config, state):
        if st.get("imported_from"):
            return {}
        if cfg.data.source in TOKENIZED_SOURCES:
            record = _manifest_tokenizer(cfg.data) or {}
            return {f"{name}_token_id": record.get(f"{name}_id") for name in ("bos", "eos", "pad")}
        if cfg.data.source in BYTE_SOURCES and not cfg.checkpoint.init_from:
            from data.corpus import ByteTokenizer

            return {
                "bos_token_id": ByteTokenizer.BOS,
                "eos_token_id": ByteTokenizer.EOS,
                "pad_token_id": ByteTokenizer.PAD,
            }
    return {}


def _source_record(checkpoint: Path, config, state: dict) -> dict | None:
    for _, _, st in _lineage(checkpoint, config, state):
        if st.get("imported_from"):
            return st["imported_from"]
    return None


def build_export_plan(cfg: ExportHFConfig) -> ExportPlan:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} is not one of {FORMATS}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} is not one of {tuple(DTYPES)}")
    parse_size(cfg.max_shard_size)
    checkpoint = resolve_checkpoint(Path(cfg.checkpoint))
    config = load_checkpoint_config(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    m, derived = config.model, state.get("derived", {})
    vocab = m.vocab_size or derived.get("vocab_size")
    if vocab is None:
        raise ConvertError(f"{checkpoint}: neither model.vocab_size nor state.json derived.vocab_size is set")
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by)
    if derived.get("padded_vocab_size", padded) != padded:
        raise ConvertError(
            f"{checkpoint}: padded vocabulary {derived['padded_vocab_size']} != computed {padded}"
        )
    record = _source_record(checkpoint, config, state)
    source_arch = (
        record["architecture"] if record else ("Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM")
    )
    arch = HFArch(
        architecture=source_arch,
        vocab_size=vocab,
        max_seq_len=m.max_seq_len,
        **{name: getattr(m, name) for name in ARCH_FIELDS},
    )
    _check_world(cfg.parallel.tp, cfg.parallel.pp, _layout(arch, padded))
    mask_id = m.mask_token_id if m.mask_token_id is not None else derived.get("mask_id")
    tokenizer, note = find_tokenizer(checkpoint, config, state)
    out, tmp = _check_output(cfg.output, cfg.overwrite)
    source_config = record.get("config") if record else None
    token_ids = special_token_ids(source_config, tokenizer, checkpoint, config, state)
    return ExportPlan(
        checkpoint,
        config,
        state,
        arch,
        source_arch,
        source_config,
        mask_id,
        padded,
        out,
        tmp,
        tokenizer,
        note,
        token_ids,
    )


def build_hf_config(cfg: ExportHFConfig, plan: ExportPlan) -> dict:
    """config.json of the export: Gemma (bidirectional) or the source class, + the DLM fields."""
    import transformers

    a, m = plan.arch, plan.config.model
    common = dict(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.ffn_hidden_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_query_groups,
        head_dim=a.head_dim,
        hidden_act="silu",
        max_position_embeddings=a.max_seq_len,
        rms_norm_eps=a.norm_eps,
        initializer_range=a.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_base},
    )
    tokens = plan.token_ids
    bidirectional = cfg.format == "bidirectional"
    if bidirectional:
        hf = transformers.GemmaConfig(
            **common,
            **tokens,
            attention_bias=a.qkv_bias,
            tie_word_embeddings=False,
            **BIDIRECTIONAL,
        )
        architecture = "GemmaForCausalLM"
    else:
        architecture = a.architecture
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}.get(
            SUPPORTED[architecture], transformers.Qwen2Config
        )
        extra = {"sliding_window": None} if architecture == "MistralForCausalLM" else {}
        if architecture == "MistralForCausalLM" and plan.source_config:
            extra["sliding_window"] = plan.source_config.get("sliding_window")
        hf = cls(**common, **tokens, **extra, tie_word_embeddings=a.tie_embeddings)
    out = hf.to_dict()
    out["architectures"] = [architecture]
    out["dtype"] = cfg.dtype
    out["mask_token_id"] = plan.mask_id
    out["dlm"] = {
        "mask_token_id": plan.mask_id,
        "logit_shift": bool(m.logit_shift),
        "bidirectional": bidirectional,
        "format": cfg.format,
        "source_architecture": plan.source_architecture,
        "step": plan.state.get("step"),
        "checkpoint": str(plan.checkpoint.resolve()),
    }
    if not bidirectional:
        out["dlm"]["note"] = (
            "transformers runs this architecture causally: pass a full (all-True) 4D attention mask "
            "to use it as the bidirectional denoiser"
        )
    return out


class ExportRun:
    prepare = staticmethod(build_export_plan)

    @staticmethod
    def execute(cfg: ExportHFConfig, plan: ExportPlan) -> None:
        import parallel
        from parallel.hf_convert import ExportSpec, build_dims, export_tensors

        start = time.perf_counter()
        a = plan.arch
        topo = parallel.init_distributed(
            tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=1, seed=0, model_dims=_layout(a, plan.padded)
        )
        model = parallel.build_model(build_dims(a, plan.padded), topo, initialize=False)
        from pretrain.engine_convert import dist_weights

        # a DeepSpeed checkpoint is read through its converted dist copy (made once)
        parallel.load_model_checkpoint(dist_weights(plan.checkpoint), model)
        spec = ExportSpec(a, plan.padded, cfg.format == "bidirectional", DTYPES[cfg.dtype])
        shapes = spec.hf_shapes()
        tensors = export_tensors(model, topo, spec)
        written = 0
        if topo.rank != 0:
            for _ in tensors:  # sends this rank's pieces
                pass
        else:
            try:
                written = _write_export(cfg, plan, spec, shapes, tensors)
            except BaseException:
                shutil.rmtree(plan.tmp, ignore_errors=True)
                raise
        peak, total_rss = _peak_rss()
        if topo.rank != 0:
            return
        if plan.out.exists():
            shutil.rmtree(plan.out)
        os.replace(plan.tmp, plan.out)
        n = sum(int(torch.Size(s).numel()) for s in shapes.values())
        arch_name = "GemmaForCausalLM (bidirectional)" if spec.gemma else f"{a.architecture} (causal in HF)"
        print(
            f"dlm export-hf: {plan.checkpoint} -> {plan.out}  [{topo.describe()}]\n"
            f"  {arch_name}, {cfg.dtype}, {n / 1e6:.2f}M parameters, mask token {plan.mask_id}, "
            f"logit_shift={plan.config.model.logit_shift}\n"
            f"  wrote {written / 1e9:.3f} GB in {time.perf_counter() - start:.1f} s; "
            f"peak RSS {peak:.2f} GB/rank (sum {total_rss:.2f} GB)\n"
            f"  tokenizer: {plan.tokenizer_note}",
            flush=True,
        )


def _write_export(cfg: ExportHFConfig, plan: ExportPlan, spec, shapes: dict, tensors) -> int:
    from parallel.hf_files import write_tensors

    shutil.rmtree(plan.tmp, ignore_errors=True)
    plan.tmp.mkdir(parents=True)
    with _progress(len(shapes), cfg.progress, "export") as bar:
        written = write_tensors(
            plan.tmp, shapes, spec.dtype, parse_size(cfg.max_shard_size), _counted(tensors, bar)
        )
    config = build_hf_config(cfg, plan)
    (plan.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if plan.tokenizer is not None:
        for f in iter_tokenizer_files(plan.tokenizer):
            shutil.copy2(f, plan.tmp / f.name)
    return written


def _counted(tensors, bar):
    for item in tensors:
        bar.update(1)
        yield item


def export_main(argv: list[str]) -> int:
    return _main("export-hf", "export_hf", argv, ExportRun)
