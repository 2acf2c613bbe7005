"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, YAML
presets in `conf/` (groups model/ data/ parallel/ optim/ zero/ curriculum/ cluster/ experiment/),
and `derive()`, the one place where values that follow from others are computed.

Configs are composed with Hydra's compose API rather than `@hydra.main`, so that
under torchrun every rank resolves the same config without racing on a
timestamped output directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from data.config import MODEL_TYPES, PrepareConfig, SourceConfig, TokenizerConfig
from data.sources import ON_ERROR
from parallel.dims import ModelDims, count_parameters
from parallel.optim import OptimConfig
from parallel.optim import validate as validate_optim
from parallel.topology import (
    ConfigError,
    ParallelConfig,
    check_interleaving,
    padded_vocab_size,
    resolve_parallel,
    sequence_multiple,
)
from parallel.zero import ZeroConfig
from parallel.zero import validate as validate_zero
from pretrain.curriculum import CurriculumConfig
from pretrain.curriculum import check as check_curriculum

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name, set by the conf/model/ option
    hidden_size: int = 64  # width of the residual stream (embedding size)
    num_layers: int = 2  # transformer layers
    num_attention_heads: int = 4  # query heads per layer; must divide hidden_size
    num_query_groups: int = 2  # key/value heads (grouped-query attention); = num_attention_heads for MHA
    ffn_hidden_size: int = 176  # inner width of the SwiGLU MLP
    max_seq_len: int = 64  # longest sequence the model takes (>= data.seq_len)
    vocab_size: int | None = None  # vocabulary size (>= the tokenizer's); None: the tokenizer's
    make_vocab_size_divisible_by: int = 128  # embedding rows: the vocabulary padded to a multiple of this
    rope_base: float = 10000.0  # RoPE base frequency (theta)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    tie_embeddings: bool = False  # the output layer shares the input embedding matrix
    init_std: float = 0.02  # std of the normal initialisation of the weights
    # which tokens attend to which: bidirectional | document | causal.
    # bidirectional: every token of a packed sample attends to every other; document: only
    # to tokens of its own document (segments of `dlm prepare` shards, EOS-delimited for
    # byte sources); causal: only to check an imported AR model against its source.
    attention: str = "bidirectional"
    logit_shift: bool = False  # position i predicts token i+1 (DiffuLLaMA/Dream, AR-initialised)
    mask_token_id: int | None = None  # id of the MASK token; None: the tokenizer's; set by `dlm import-hf`
    spec: str = "auto"  # layer implementation: auto (Transformer Engine if importable) | local | te
    recompute: str = "none"  # activation recomputation (saves memory): none | selective | full


@dataclass
class DataConfig:
    name: str = "stdlib"  # preset name, set by the conf/data/ option
    # where the samples come from: stdlib | text | shards | megatron.
    # stdlib | text: byte-level tokens of this Python's standard library / of data.paths;
    # shards: `dlm prepare` datasets in data.sources, streamed (data/loader.py);
    # megatron: Megatron .bin/.idx prefixes or `dlm prepare format=megatron` directories in
    # data.sources, through megatron-core's GPTDataset/BlendedDataset (parallel/datasets.py).
    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)  # text: files, directories or globs to read
    seq_len: int = 64  # tokens per sample (<= model.max_seq_len; shards: as prepared)
    max_bytes: int | None = None  # bytes sources: read at most this many bytes
    # bytes sources: share of the windows held out for evaluation; megatron prefixes: share
    # of the documents (megatron's split)
    eval_fraction: float = 0.01
    sources: list[SourceConfig] = field(default_factory=list)  # shards: the datasets to mix, with weights
    # shards: the tokenizer they were made with (a .model, a tokenizer.json or a directory holding one)
    tokenizer: str | None = None
    num_workers: int = 2  # shards: DataLoader workers per rank
    shuffle_shards: int = 2  # shards: this many shards are shuffled together
    # megatron: where megatron-core caches its sample index (a file system every node sees);
    # None: <run.dir>/megatron_index
    cache_dir: str | None = None


@dataclass
class ClusterConfig:
    name: str = "local"  # preset name, set by the conf/cluster/ option
    # Peak dense FLOP/s per device for MFU, in TFLOP/s.
    # None: measured fp32 matmul on CPU; the bf16 datasheet value on known GPUs.
    peak_tflops: float | None = None
    # -- the hardware `dlm plan` models (pretrain/plan.py); per GPU, per direction
    gpu_memory_gib: float | None = None  # device memory as the device reports it
    intra_node_gbps: float | None = None  # GB/s within a node (NVLink/NVSwitch)
    inter_node_gbps: float | None = None  # GB/s between nodes: the GPU's share of the node's NICs
    hbm_gbps: float | None = None  # GB/s of device memory (memory-bound kernels)
    # sustained share of peak_tflops of the model's matrix multiplications in training
    achievable_fraction: float | None = None
    gpu_hour_cost: float = 1.0  # price of one GPU-hour, for the plan's cost column
    # -- Slurm (`dlm slurm submit`, slurm/): one process per GPU (per task without GPUs)
    nodes: int = 1  # nodes of a training job
    gpus_per_node: int = 0  # GPUs per node; one task (process) each
    tasks_per_node: int | None = None  # processes per node; None: gpus_per_node (1 without GPUs)
    cpus_per_task: int = 8  # CPU cores per process (DataLoader workers, OMP threads)
    mem: str | None = None  # memory per node, e.g. 480G; None: the partition's default
    partition: str | None = None  # Slurm partition; None: the cluster's default
    account: str | None = None  # Slurm account to charge
    qos: str | None = None  # Slurm quality of service
    time: str = "04:00:00"  # time limit per job (the run requeues itself to go on)
    constraint: str | None = None  # node features, e.g. h100
    signal_seconds: int = 300  # USR1 this long before the time limit: stop, checkpoint, requeue
    max_requeues: int = 50  # requeues per job (time limits, preemptions and crashes), then stop
    max_failures: int = 1  # crashes (a rank killed, a node lost) requeued per job, then it fails
    exit_wait_seconds: int = 60  # once a rank has exited, the others are killed after this long
    env_file: str | None = None  # sourced before launching (NCCL and cluster settings): slurm/env.sh
    # more #SBATCH lines, e.g. ["--exclusive", "--mail-type=FAIL"]
    sbatch_extra: list[str] = field(default_factory=list)


PIPELINE_STAGES = ("tokenizer", "prepare", "train", "eval", "export")


@dataclass
class PlanConfig:
    # `dlm plan`: the layouts of model/ on cluster/ for train.global_batch_size x data.seq_len.
    gpus: int | None = None  # GPUs to lay the model over; None: cluster.nodes x cluster.gpus_per_node
    tokens: float | None = None  # the training budget; None: train.steps x global batch x data.seq_len
    top: int = 10  # layouts shown, best first
    # attention kernel: flash (Transformer Engine: no s x s tensor) | unfused (megatron's local
    # spec: the [b, heads, s, s] softmax saved); auto: flash unless model.spec=local
    attention: str = "auto"
    vocab_size: int = 128256  # the tokenizer's vocabulary when model.vocab_size is unset (Llama 3's)
    # layers recomputed in backward: the options tried (none | selective | full)
    recompute: list[str] = field(default_factory=lambda: ["none", "selective", "full"])
    # context-parallel sizes tried (parallel.cp), e.g. [1, 2, 4] for long sequences
    cp: list[int] = field(default_factory=lambda: [1])
    # engines tried: distopt (megatron, distributed optimizer) | ddp (megatron) | zero1/2/3 (DeepSpeed)
    zero: list[str] = field(default_factory=lambda: ["distopt", "zero1", "zero2", "zero3"])


@dataclass
class PipelineConfig:
    # `dlm slurm pipeline`: the corpus -> tokenizer -> prepare -> train -> eval -> export chain.
    input: list[str] = field(default_factory=list)  # the corpus: files, dirs, globs, 'stdlib', 'manpages'
    stages: list[str] = field(default_factory=lambda: list(PIPELINE_STAGES))  # the stages submitted, in order
    # the tokenizer: the tokenizer stage writes it (a .model path); without that stage, any
    # tokenizer `dlm prepare` takes
    tokenizer: str = "${run.dir}/tokenizer/tokenizer.model"
    data: str = "${run.dir}/data"  # the prepared dataset (the train stage reads it)
    export: str = "${run.dir}/hf"  # the Hugging Face model the export stage writes
    vocab_size: int = 8000  # the tokenizer stage's vocabulary size
    partitions: int = 1  # prepare array tasks, each over a share of the input files (then merged)
    eval_fraction: float = 0.01  # share of the documents prepare holds out for eval
    samples_per_shard: int = 4096  # samples per prepared .tar shard
    cpus: int = 8  # CPU cores of each tokenizer, prepare, merge and export job
    time: str = "04:00:00"  # time limit of each tokenizer, prepare, merge, eval and export job
    # more overrides per stage, e.g. '["jsonl_field=content"]' (quoted: Hydra reads `=` in a list)
    tokenizer_args: list[str] = field(default_factory=list)  # ... of `dlm tokenizer`
    prepare_args: list[str] = field(default_factory=list)  # ... of `dlm prepare`
    eval_args: list[str] = field(default_factory=list)  # ... of `dlm eval`, e.g. eval.batches=32
    export_args: list[str] = field(default_factory=list)  # ... of `dlm export-hf`


@dataclass
class ObjectiveConfig:
    t_sampling: str = "uniform"  # how t is drawn: uniform (LLaDA) | stratified (MDLM antithetic)
    weighting: str = "elbo"  # loss weight of a masked token: elbo (1/t) | uniform
    normalization: str = "tokens"  # loss divided by: tokens (B*L, LLaDA) | masked (number of masked tokens)
    logits: str = "masked"  # where the output layer runs: masked (masked positions only) | all


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps to train for
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward/backward pass on one data-parallel rank
    precision: str = "auto"  # training precision: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 10  # a console line every this many steps (metrics.jsonl gets every step)
    eval_every: int = 0  # evaluate on held-out data every this many steps; 0: never
    eval_batches: int = 2  # global batches of held-out samples per evaluation


@dataclass
class EvalConfig:
    """The held-out likelihood: a Monte Carlo upper bound on the per-token NLL
    (pretrain/likelihood.py), in the loop every train.eval_every steps and by `dlm eval`."""

    draws: int = 4  # Monte Carlo draws per sample (masks per sample and evaluation)
    method: str = "stratified"  # estimator: stratified mask counts (LLaDA) | uniform | antithetic_t
    batches: int | None = None  # global batches of held-out samples; None: train.eval_batches
    samples: int = 2  # texts generated per evaluation by the live model (LLaDA's sampler); 0: none
    sample_prompt: int = 16  # tokens of a held-out sample that prompt each one
    sample_length: int = 32  # tokens generated (as many denoising steps, blocks of up to 32)


@dataclass
class CheckpointConfig:
    every: int = 0  # save a checkpoint every this many steps; 0: only at the end
    keep: int = 3  # newest complete checkpoints kept; 0 keeps all
    init_from: str | None = None  # start from the weights of this checkpoint when run.dir has none
    resume: bool = True  # continue from run.dir's latest checkpoint; false: ignore it
    # megatron engine: write checkpoints in a background process while training goes on
    # (`latest` moves once every rank's write is complete; Megatron-LM's --async-save)
    async_save: bool = False
    # the data-parallel replicas share the writing of each checkpoint (megatron engine;
    # Megatron-LM's --ckpt-fully-parallel-save)
    fully_parallel_save: bool = True


@dataclass
class RunConfig:
    # the run's directory: config.yaml, metrics.jsonl, checkpoints/ (resumed from if present)
    dir: str = "runs/${model.name}-${data.name}"


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | disabled
    project: str = "dlm-pretrain"  # wandb project name
    progress: bool = True  # a progress bar on stderr (only when it is a terminal)


@dataclass
class Config:
    seed: int = 0  # random seed: weight init, data order, masking noise
    run: RunConfig = field(default_factory=RunConfig)  # where the run writes its outputs
    model: ModelConfig = field(default_factory=ModelConfig)  # the denoiser's architecture (conf/model/)
    data: DataConfig = field(default_factory=DataConfig)  # training data and its loader (conf/data/)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # tp x pp x dp layout (conf/parallel/)
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its LR schedule (conf/optim/)
    zero: ZeroConfig = field(default_factory=ZeroConfig)  # DeepSpeed ZeRO (conf/zero/)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # the hardware, for MFU (conf/cluster/)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # the masked-diffusion loss
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)  # masking schedules (t band etc.)
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, batch sizes, precision, log/eval cadence
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out likelihood bound and sample texts
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, keeping, starting from
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # metrics: wandb, progress bar
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # `dlm slurm pipeline`: the stages
    plan: PlanConfig = field(default_factory=PlanConfig)  # `dlm plan`: what the layouts are planned for


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(name="tokenizer_schema", node=TokenizerConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    from pretrain.convert import ExportHFConfig, ImportHFConfig  # imports this module: not at the top

    cs.store(name="import_hf_schema", node=ImportHFConfig)
    cs.store(name="export_hf_schema", node=ExportHFConfig)


CHOICES = {
    "plan.attention": ("auto", "flash", "unfused"),
    "model.attention": ("bidirectional", "document", "causal"),
    "model.spec": ("auto", "local", "te"),
    "model.recompute": ("none", "selective", "full"),
    "data.source": ("stdlib", "text", "shards", "megatron"),
    "objective.t_sampling": ("uniform", "stratified"),
    "objective.weighting": ("elbo", "uniform"),
    "objective.normalization": ("tokens", "masked"),
    "objective.logits": ("masked", "all"),
    "eval.method": ("stratified", "uniform", "antithetic_t"),
    "train.precision": ("auto", "bf16", "fp32"),
    "logging.wandb": ("auto", "online", "offline", "disabled"),
}


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Compose conf/<config_name>.yaml with command-line style overrides into a typed,
    validated Config. Raises ConfigError naming the key on bad values."""
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        node = compose(config_name=config_name, overrides=list(overrides or []))
    adopt_checkpoint_model(node, overrides or [])
    cfg: Config = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


def adopt_checkpoint_model(node, overrides: list[str]) -> None:
    """Under model=from_checkpoint, replace the composed model section by the checkpoint's."""
    if node.model.name == FROM_CHECKPOINT:
        node.model = checkpoint_model(node, overrides)


FROM_CHECKPOINT = "from_checkpoint"  # conf/model/from_checkpoint.yaml


def resolve_checkpoint(path: Path, key: str = "checkpoint.init_from") -> Path:
    """A checkpoint directory from itself, a checkpoints/ directory or a run directory
    (following the `latest` pointer)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.json").exists():
            return candidate
        pointer = candidate / "latest"
        if pointer.exists():
            found = candidate / pointer.read_text().strip()
            if not (found / "state.json").exists():
                raise ConfigError(f"{key}={path}: {pointer} names {found.name}, which has no state.json")
            return found
    raise ConfigError(f"{key}={path}: no checkpoint there (no state.json, no checkpoints/latest)")


def checkpoint_model(node, overrides: list[str]):
    """`model=from_checkpoint`: the model section saved with checkpoint.init_from (e.g. by
    `dlm import-hf`), or with run.dir's latest checkpoint when resuming; `model.<key>=...`
    overrides on the command line still apply (e.g. model.recompute=full)."""
    if node.checkpoint.init_from:
        path = resolve_checkpoint(Path(node.checkpoint.init_from)) / "config.yaml"
    else:
        try:  # resuming a run started from a checkpoint
            path = resolve_checkpoint(Path(node.run.dir), "run.dir") / "config.yaml"
        except ConfigError:
            raise ConfigError(
                f"model=from_checkpoint needs checkpoint.init_from=<checkpoint or run dir> "
                f"(run.dir={node.run.dir} holds no checkpoint to resume either)"
            ) from None
    if not path.exists():
        raise ConfigError(f"model=from_checkpoint: {path} is missing")
    saved = OmegaConf.load(path).get("model")
    if saved is None:
        raise ConfigError(f"model=from_checkpoint: {path} has no model section")
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), saved)
    for item in overrides:
        name = item.split("=", 1)[0].lstrip("+~")
        if name.startswith("model.") and name != "model.name":
            OmegaConf.update(model, name.removeprefix("model."), OmegaConf.select(node, name))
    return model


def load_checkpoint_config(checkpoint: Path, overrides: list[str]) -> Config:
    """The config a checkpoint was saved with (its config.yaml), with command-line style
    overrides on top: `key=value`, or a group option such as `data=stdlib_shards` (a
    preset of conf/<group>/). Validated like load_config's."""
    node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(checkpoint / "config.yaml"))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: expected key=value")
        if "." not in key and (CONF_DIR / key).is_dir():
            node = merge_group_option(node, key, value)
        else:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([item]))
    cfg: Config = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


def merge_group_option(node, group: str, option: str):
    """`group=option` over a composed config: conf/<group>/<option>.yaml replaces the
    section (or, for a `@package _global_` preset, merges at the top)."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}={option}: no such preset (conf/{group}/ has {', '.join(choices)})")
    preset = OmegaConf.load(path)
    if path.read_text().lstrip().startswith("# @package _global_"):
        return OmegaConf.merge(node, preset)
    section = OmegaConf.merge(OmegaConf.structured(type(getattr(Config(), group))), preset)
    node[group] = section
    return node


def load_command_config(name: str, overrides: list[str] | None = None):
    """The typed config of a data command: conf/<name>.yaml ('tokenizer', 'prepare')."""
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        node = compose(config_name=name, overrides=list(overrides or []))
    cfg = OmegaConf.to_object(node)  # raises MissingMandatoryValue naming e.g. 'output'
    if name in ("import_hf", "export_hf"):  # checked by pretrain/convert.py
        return cfg
    if isinstance(cfg, PrepareConfig):
        from data.prepare import PrepareError, check_config

        try:
            check_config(cfg)
        except PrepareError as e:
            raise ConfigError(str(e)) from e
        return cfg
    if not cfg.input:
        raise ConfigError(f"{name}: input=[...] is empty (files, directories, globs, stdlib, manpages)")
    if cfg.on_error not in ON_ERROR:
        raise ConfigError(f"on_error={cfg.on_error!r} is not one of {ON_ERROR}")
    if cfg.model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={cfg.model_type!r} is not one of {MODEL_TYPES}")
    for key in ("vocab_size", "max_sentences"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    return cfg


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    m, t = cfg.model, cfg.train
    positive = {
        "model.hidden_size": m.hidden_size,
        "model.num_layers": m.num_layers,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_query_groups": m.num_query_groups,
        "data.seq_len": cfg.data.seq_len,
        "train.steps": t.steps,
        "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "eval.draws": cfg.eval.draws,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} does not divide "
            f"model.hidden_size={m.hidden_size}"
        )
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_query_groups={m.num_query_groups} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if cfg.data.source in ("shards", "megatron"):
        if not cfg.data.sources:
            raise ConfigError(
                f"data.source={cfg.data.source} needs data.sources=[{{path: ..., weight: 1.0}}, ...]"
            )
        if any(src.weight <= 0 for src in cfg.data.sources):
            raise ConfigError("data.sources: every weight must be positive")
        for src in cfg.data.sources:
            for key in ("tokens", "max_epochs"):
                if getattr(src, key) is not None and getattr(src, key) <= 0:
                    raise ConfigError(
                        f"data.sources {src.name or src.path}: {key}={getattr(src, key)} must be positive"
                    )
        if cfg.data.num_workers < 0 or cfg.data.shuffle_shards < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.shuffle_shards >= 1")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1)")
    if t.eval_every > 0 and cfg.data.eval_fraction <= 0:
        raise ConfigError(
            f"train.eval_every={t.eval_every} needs held-out data: data.eval_fraction is "
            f"{cfg.data.eval_fraction}"
        )
    ev = cfg.eval
    if ev.samples < 0 or ev.sample_prompt < 1 or ev.sample_length < 1:
        raise ConfigError("eval.samples must be >= 0, eval.sample_prompt and eval.sample_length >= 1")
    if ev.samples and ev.sample_prompt + ev.sample_length > m.max_seq_len:
        raise ConfigError(
            f"eval.sample_prompt={ev.sample_prompt} + eval.sample_length={ev.sample_length} exceeds "
            f"model.max_seq_len={m.max_seq_len}"
        )
    if ev.samples and ev.sample_prompt > cfg.data.seq_len:
        raise ConfigError(f"eval.sample_prompt={ev.sample_prompt} exceeds data.seq_len={cfg.data.seq_len}")
    problems = check_curriculum(cfg.curriculum)
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.curriculum.anneals_attention and m.attention == "causal":
        raise ConfigError(
            "curriculum.bidirectional_ratio anneals causal attention towards bidirectional: "
            "it needs model.attention=bidirectional or document, not causal"
        )
    if cfg.curriculum.uses_block_diffusion(cfg.data.seq_len):
        check_block_diffusion(cfg)
    if cfg.curriculum.uses_ar_loss:
        check_hybrid_loss(cfg)
    if cfg.curriculum.complementary and t.micro_batch_size % 2:
        raise ConfigError(
            f"curriculum.complementary=true pairs rows within a microbatch: "
            f"train.micro_batch_size={t.micro_batch_size} must be even"
        )
    validate_optim(cfg.optim)
    p = cfg.parallel
    validate_zero(cfg.zero, engine=p.engine, pp=p.pp, distributed_optimizer=p.distributed_optimizer)
    check_sequence_lengths(cfg, resolve_parallel(p))
    if p.tp_comm_overlap:
        check_tp_comm_overlap(cfg)
    if p.cp < 1:
        raise ConfigError(f"parallel.cp={p.cp} must be >= 1")
    if p.cp > 1:
        check_context_parallel(cfg)
    if cfg.checkpoint.async_save and p.engine != "megatron":
        raise ConfigError(
            "checkpoint.async_save=true writes megatron dist checkpoints in the background: it needs "
            f"parallel.engine=megatron, not {p.engine}"
        )


def check_sequence_lengths(cfg: Config, parallel: ParallelConfig) -> None:
    """Context parallelism splits every sequence the model sees into 2 x cp chunks (zig-zag),
    sequence parallelism each rank's part over the tensor-parallel ranks: the training
    length, the curriculum's random lengths and the eval samples' length must be multiples
    of `sequence_multiple`."""
    c, ev = cfg.curriculum, cfg.eval
    if c.uses_random_lengths and c.length_multiple > cfg.data.seq_len:
        raise ConfigError(
            f"curriculum.length_multiple={c.length_multiple} exceeds data.seq_len={cfg.data.seq_len}"
        )
    multiple = sequence_multiple(parallel.tp, parallel.cp, parallel.sequence_parallel)
    if multiple == 1:
        return
    why = (
        f"parallel.cp={parallel.cp} and parallel.sequence_parallel (default: on when parallel.tp > 1; "
        f"here tp={parallel.tp}, sp={parallel.sequence_parallel}) split"
    )
    lengths = {"data.seq_len": cfg.data.seq_len}
    if c.uses_random_lengths:
        lengths["curriculum.length_multiple (random-length steps)"] = c.length_multiple
    if ev.samples:
        lengths["eval.sample_prompt + eval.sample_length"] = ev.sample_prompt + ev.sample_length
    for key, length in lengths.items():
        if length % multiple:
            raise ConfigError(
                f"{why} every sequence: {key}={length} must be a multiple of {multiple} "
                "(or set parallel.sequence_parallel=false)"
            )


def check_tp_comm_overlap(cfg: Config) -> None:
    """Transformer Engine's userbuffers are sized once, for data.seq_len x
    train.micro_batch_size: every batch the model sees must have that shape."""
    c = cfg.curriculum
    other_shapes = {
        "curriculum.random_length_prob > 0": c.uses_random_lengths,
        "curriculum.block_size / ar_weight (two copies: 2 x data.seq_len)": (
            c.uses_block_diffusion(cfg.data.seq_len) or c.uses_ar_loss
        ),
        "eval.samples > 0 with train.eval_every (the sampler's shapes)": cfg.eval.samples > 0
        and cfg.train.eval_every > 0,
    }
    refused = [key for key, applies in other_shapes.items() if applies]
    if refused:
        raise ConfigError(
            f"parallel.tp_comm_overlap=true needs one batch shape: not with {'; '.join(refused)}"
        )


def check_context_parallel(cfg: Config) -> None:
    """What context parallelism runs here: bidirectional attention over whole samples with the
    plain or logit-shifted objective, on the megatron engine."""
    unsupported = {
        "parallel.engine=deepspeed": cfg.parallel.engine != "megatron",
        "model.attention=document (documents need Transformer Engine's packed THD format)": (
            cfg.model.attention == "document"
        ),
        "model.attention=causal": cfg.model.attention == "causal",
        "curriculum.bidirectional_ratio < 1 (mask tensors)": cfg.curriculum.anneals_attention,
        "curriculum.block_size / ar_weight (two copies, mask tensors)": (
            cfg.curriculum.uses_block_diffusion(cfg.data.seq_len) or cfg.curriculum.uses_ar_loss
        ),
    }
    refused = [key for key, applies in unsupported.items() if applies]
    if refused:
        raise ConfigError(f"parallel.cp={cfg.parallel.cp} does not run with {'; '.join(refused)}")


def takes_mask_tensors(cfg: Config) -> bool:
    """The trainer passes attention-mask tensors (curriculum annealing or blocks)."""
    c = cfg.curriculum
    return c.anneals_attention or c.uses_block_diffusion(cfg.data.seq_len) or c.uses_ar_loss


def check_block_diffusion(cfg: Config) -> None:
    """Block diffusion draws one t per block and brings its own attention mask."""
    if cfg.objective.t_sampling != "uniform":
        raise ConfigError(
            f"curriculum.block_size draws one t per block, uniformly: objective.t_sampling="
            f"{cfg.objective.t_sampling} (per sample) does not apply; set objective.t_sampling=uniform"
        )
    if cfg.model.attention == "causal":
        raise ConfigError("curriculum.block_size needs model.attention=bidirectional or document, not causal")


def check_hybrid_loss(cfg: Config) -> None:
    """The AR part is next-token prediction of the clean copy, normalized like the DLM part."""
    if not cfg.model.logit_shift:
        raise ConfigError(
            "curriculum.ar_weight > 0 trains next-token prediction: it needs model.logit_shift=true "
            "(position i predicts token i+1, as the AR model the run starts from)"
        )
    if cfg.objective.normalization != "tokens":
        raise ConfigError(
            "curriculum.ar_weight > 0 adds a per-token AR loss: objective.normalization must be tokens "
            "(both parts divided by the same token count)"
        )
    if cfg.model.attention == "causal":
        raise ConfigError("curriculum.ar_weight needs model.attention=bidirectional or document, not causal")


def data_micro_batch_size(cfg: Config) -> int:
    """Samples read per microbatch: half the rows under complementary masking (pairs)."""
    t = cfg.train
    return t.micro_batch_size // 2 if cfg.curriculum.complementary else t.micro_batch_size


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config and the launch; logged and saved."""

    world_size: int
    dp: int
    vocab_size: int
    padded_vocab_size: int
    mask_id: int
    samples_per_dp_rank: int  # rows per step
    data_micro_batch_size: int  # samples read per microbatch (half the rows under complementary masking)
    num_microbatches: int  # per step and dp rank
    run_samples: int  # samples read over the whole run, all ranks (what token budgets and epochs count)
    tokens_per_step: int
    params: dict
    flops_per_token: float  # model FLOPs (fwd + bwd) per trained token, excluding the output layer
    flops_per_scored_token: float  # output layer FLOPs per scored (masked) position
    # attention FLOPs (fwd + bwd) per token per position it attends over (12 x layers x
    # hidden): a sequence of S tokens costs flops_per_token + this x (S - data.seq_len) per token
    attention_flops_per_position: float
    precision: str  # train.precision resolved: bf16 | fp32 (auto: bf16 with CUDA)
    parallel: ParallelConfig  # the parallel section as the run uses it (sequence parallelism decided)

    def as_dict(self) -> dict:
        return asdict(self)


def derive(cfg: Config, world_size: int, *, vocab_size: int, mask_id: int | None) -> Derived:
    """Compute derived values and check the ones that can be wrong (naming the keys).
    vocab_size and mask_id are the data's (mask_id None: a Hugging Face tokenizer without
    a mask token); model.vocab_size / model.mask_token_id win."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size}")
    vocab = m.vocab_size or vocab_size
    if m.mask_token_id is not None:
        if not 0 <= m.mask_token_id < vocab:
            raise ConfigError(f"model.mask_token_id={m.mask_token_id} is outside the vocabulary [0, {vocab})")
        mask_id = m.mask_token_id
    elif mask_id is None:
        raise ConfigError(
            "the tokenizer declares no mask token: set model.mask_token_id "
            "(dlm import-hf records it; model=from_checkpoint adopts it)"
        )
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by)
    if world_size % (p.tp * p.cp * p.pp):
        sizes = (
            f"parallel.tp={p.tp}" + (f" x parallel.cp={p.cp}" if p.cp > 1 else "") + f" x parallel.pp={p.pp}"
        )
        raise ConfigError(f"{sizes} does not divide the world size {world_size}")
    dp = world_size // (p.tp * p.cp * p.pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}"
        )
    check_interleaving(p.pp, p.vpp, p.microbatch_group_size, t.global_batch_size // (t.micro_batch_size * dp))
    params = count_parameters(model_dims(cfg, padded))
    L, h_attn = cfg.data.seq_len, m.hidden_size
    # 6 FLOPs per parameter per token (fwd+bwd) for the transformer layers, plus the
    # attention scores and values: 2 matmuls x 2 FLOPs x L x h per layer, forward,
    # times 3 for fwd+bwd, over the FULL L x L square (bidirectional: nothing skipped).
    flops_per_token = 6 * params["layers"] + 12 * m.num_layers * L * h_attn
    return Derived(
        world_size=world_size,
        dp=dp,
        vocab_size=vocab,
        padded_vocab_size=padded,
        mask_id=mask_id,
        samples_per_dp_rank=t.global_batch_size // dp,
        data_micro_batch_size=data_micro_batch_size(cfg),
        num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
        run_samples=t.steps * (t.global_batch_size // t.micro_batch_size) * data_micro_batch_size(cfg),
        tokens_per_step=t.global_batch_size * cfg.data.seq_len,
        params=params,
        flops_per_token=float(flops_per_token),
        flops_per_scored_token=float(6 * m.hidden_size * padded),
        attention_flops_per_position=float(12 * m.num_layers * h_attn),
        precision=resolve_precision(t.precision),
        parallel=resolve_parallel(p),
    )


def resolve_precision(setting: str) -> str:
    """train.precision: 'auto' is bf16 where CUDA is available, fp32 on CPU."""
    if setting != "auto":
        return setting
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def layout_dims(cfg: Config, padded_vocab: int) -> dict:
    """The model's sizes the process layout is checked against (Topology.build's keywords)."""
    m = cfg.model
    return dict(
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        padded_vocab=padded_vocab,
    )


def model_dims(cfg: Config, padded_vocab: int) -> ModelDims:
    m = cfg.model
    return ModelDims(
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        padded_vocab_size=padded_vocab,
        max_seq_len=m.max_seq_len,
        rope_base=m.rope_base,
        norm_eps=m.norm_eps,
        qkv_bias=m.qkv_bias,
        tie_embeddings=m.tie_embeddings,
        init_std=m.init_std,
        causal=m.attention == "causal",
        document_attention=m.attention == "document",
        mask_tensors=takes_mask_tensors(cfg),
        spec=m.spec,
        recompute=m.recompute,
    )


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
