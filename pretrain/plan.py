"""The cost model behind `dlm plan`: per-GPU memory, step time and MFU of a parallel layout of
the masked-diffusion denoiser, the enumeration of layouts that fit, and their ranking.

Pure arithmetic (no torch, no megatron): imports in milliseconds. Every term is returned
separately so that a plan can say where the memory and the time go.

What is modelled, and where each number comes from:
- memory (`memory`): bf16 weights, megatron's fp32 gradient buffer (grad_reduce_in_fp32, as
  parallel/engine.py configures DDP), Adam moments and fp32 master weights sharded over the
  data-parallel ranks by the distributed optimizer (ZeRO-1) or DeepSpeed ZeRO 1/2/3; activations
  derived tensor by tensor from megatron-core 0.16.1 (`layer_activation_bytes`), times the
  microbatches a pipeline stage holds (1F1B: pp; interleaved: pp + (pp-1)/vpp, Korthikanti
  et al. 2022 sec. 4.2.3, = megatron's warm-up count (pp-1)*2 + (vpp-1)*pp, +1, chunks of
  layers/(pp*vpp)); the masked-only head's fp32 logits at the WORST masked fraction; a named
  fixed reserve for the CUDA context, NCCL buffers and allocator fragmentation.
- time (`step_time`): GEMM FLOPs (recompute included) at peak x achievable_fraction; the
  memory-bound rest (norms, residual adds, RoPE, SwiGLU, the s x s softmax of non-flash
  attention, the vocabulary-parallel cross entropy) at HBM bandwidth; tensor-, context- and
  pipeline-parallel messages at link bandwidth x comm_efficiency with ring costs (n-1)/n per
  all-gather/reduce-scatter; the pipeline bubble (pp-1)/vpp microbatch slots (Narayanan et al.
  2021 sec. 2.2); data-parallel gradient reduce-scatter + parameter all-gather (distributed
  optimizer) or all-reduce, partly hidden behind one microbatch's backward/forward; Adam's
  memory-bound update.
- FLOPs (`flops_per_step`), as pretrain/config.py derive() counts them: 6 x layer parameters
  per token, + 12 x layers x s x h per token for attention over the FULL s x s square
  (bidirectional: nothing skipped), + 6 x h x V per scored (masked) token for the output layer.
  MFU counts these model FLOPs only: recomputation is time spent, not model work.

The time model is checked against published Megatron-LM GPT runs on A100s
(tests/pretrain/test_plan.py): Narayanan et al. SC'21 Table 1 (1.7B-1T, 32-3072 GPUs, layouts of
Megatron-LM's examples/sc21/run_table_1.sh) and Korthikanti et al. 2022 Table 5 (22B-1T, full vs
selective recompute with sequence parallelism); achievable_fraction is fixed once, from one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from parallel.dims import ModelDims, count_parameters

GIB = 2**30
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

ZERO_OPTIONS = ("distopt", "none", 1, 2, 3)  # megatron distributed optimizer | plain DDP | DeepSpeed stages
RECOMPUTE_OPTIONS = ("none", "selective", "full")
ATTENTION_OPTIONS = ("flash", "unfused", "fused_softmax")
FAMILIES = ("llama", "gpt")


# ---------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterSpec:
    """One GPU type and its network. Bandwidths are per GPU and per direction, in GB/s."""

    name: str
    gpus_per_node: int
    gpu_memory_gib: float  # what the device reports (nvidia-smi total)
    peak_tflops: float  # dense bf16 tensor-core peak (no sparsity)
    intra_node_gbps: float  # NVLink/NVSwitch, per GPU per direction
    inter_node_gbps: float  # the GPU's share of the node's InfiniBand/RoCE NICs, per direction
    hbm_gbps: float  # device memory bandwidth (memory-bound kernels)
    # sustained fraction of peak of the model's GEMMs in training (A100_/H100_ACHIEVABLE_FRACTION)
    achievable_fraction: float
    # achieved NCCL bus bandwidth / nominal link bandwidth (an assumption, applied to every link)
    comm_efficiency: float = 0.8
    # achieved / nominal HBM bandwidth of memory-bound kernels (the same assumption as for links)
    hbm_efficiency: float = 0.8
    gpu_hour_cost: float = 1.0  # currency-neutral price of one GPU-hour

    @property
    def gpu_memory_bytes(self) -> float:
        return self.gpu_memory_gib * GIB


# achievable_fraction, chosen ONCE: the value at which this model reproduces row 1 of Narayanan
# et al. 2021 Table 1 (1.7B GPT on 32 A100s, TP = PP = 1: only GEMMs, memory-bound kernels and
# an overlapped data-parallel all-reduce; 137 TFLOP/s per GPU), never tuned per row afterwards.
# tests/pretrain/test_plan.py re-derives it and predicts the other 9 rows and Korthikanti et al.
# 2022 Table 5 with it.
A100_ACHIEVABLE_FRACTION = 0.642
# H100: the A100 value scaled by the two GPUs' measured maximum achievable matmul FLOPS over
# peak (MAMF, stas00/ml-engineering compute/accelerator/README.md: A100 SXM 267.9/312 = 85.9%,
# H100 SXM 792.1/989 = 80.1%): 0.642 x 80.1 / 85.9 = 0.599.
H100_ACHIEVABLE_FRACTION = round(A100_ACHIEVABLE_FRACTION * 0.801 / 0.859, 3)


def h100_sxm(**overrides) -> ClusterSpec:
    """DGX/HGX H100 SXM 80GB: NVLink4 900 GB/s bidirectional (450 per direction) per GPU,
    8 x 400 Gb/s InfiniBand NDR per node (50 GB/s per GPU), 989 TFLOP/s dense bf16,
    HBM3 3.35 TB/s, 81559 MiB reported."""
    spec = ClusterSpec(
        name="h100_sxm",
        gpus_per_node=8,
        gpu_memory_gib=81559 / 1024,
        peak_tflops=989.0,
        intra_node_gbps=450.0,
        inter_node_gbps=50.0,
        hbm_gbps=3350.0,
        achievable_fraction=H100_ACHIEVABLE_FRACTION,
    )
    return replace(spec, **overrides)


def a100_selene(**overrides) -> ClusterSpec:
    """DGX A100 80GB as in NVIDIA's Selene (Narayanan et al. 2021 sec. 5): NVLink3 600 GB/s
    bidirectional (300 per direction) per GPU, 8 x 200 Gb/s HDR InfiniBand per node (25 GB/s
    per GPU), 312 TFLOP/s dense fp16/bf16, HBM2e 2039 GB/s."""
    spec = ClusterSpec(
        name="a100_selene",
        gpus_per_node=8,
        gpu_memory_gib=80.0,
        peak_tflops=312.0,
        intra_node_gbps=300.0,
        inter_node_gbps=25.0,
        hbm_gbps=2039.0,
        achievable_fraction=A100_ACHIEVABLE_FRACTION,
    )
    return replace(spec, **overrides)


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """The architecture (parallel.dims.ModelDims), the training sequence length and how many
    positions the masked-only head scores: `masked_fraction` on average (0.5 for t ~ U(0, 1)),
    `max_masked_fraction` at worst (memory must hold the worst step: every position masked).

    family: llama -- the denoiser (RMSNorm, RoPE, SwiGLU, GQA, no dropout, no biases);
            gpt -- Megatron-LM's GPT of Narayanan et al. 2021 (LayerNorm, GeLU MLP of ffn
            width, dropout 0.1, fused bias/softmax kernels), only to check the time model
            against published runs (its memory omits dropout masks of the hidden states).
    causal: the attention kernel skips the masked triangle (flash attention only); the FLOPs
            still count the full square, as Megatron-LM's published numbers do."""

    dims: ModelDims
    seq_len: int
    masked_fraction: float = 0.5
    max_masked_fraction: float = 1.0
    family: str = "llama"
    causal: bool = False

    @property
    def hidden(self) -> int:
        return self.dims.hidden_size

    @property
    def layers(self) -> int:
        return self.dims.num_layers

    @property
    def heads(self) -> int:
        return self.dims.num_attention_heads

    @property
    def groups(self) -> int:
        return self.dims.num_query_groups

    @property
    def ffn(self) -> int:
        return self.dims.ffn_hidden_size

    @property
    def vocab(self) -> int:
        return self.dims.padded_vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_fraction(self) -> float:
        """Key (or value) width over the query width: query groups / heads."""
        return self.groups / self.heads

    @property
    def gated(self) -> bool:
        return self.family == "llama"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {FAMILIES}")
        if not 0 < self.masked_fraction <= self.max_masked_fraction <= 1:
            raise ValueError("need 0 < masked_fraction <= max_masked_fraction <= 1")


def padded(vocab_size: int, divisible_by: int = 128) -> int:
    """The vocabulary rounded up as parallel.topology.padded_vocab_size does (not imported:
    that module imports torch)."""
    return -(-vocab_size // divisible_by) * divisible_by


def model_spec(model, seq_len: int | None = None, vocab_size: int = 128256, **kwargs) -> ModelSpec:
    """A ModelSpec from a ModelConfig (or anything with its attribute names); vocab_size is
    the tokenizer's when model.vocab_size is unset (default: Llama 3's 128,256)."""
    vocab = getattr(model, "vocab_size", None) or vocab_size
    dims = ModelDims(
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        padded_vocab_size=padded(vocab, getattr(model, "make_vocab_size_divisible_by", 128)),
        max_seq_len=model.max_seq_len,
        tie_embeddings=getattr(model, "tie_embeddings", False),
    )
    return ModelSpec(dims, seq_len or model.max_seq_len, **kwargs)


def load_model_preset(name: str, seq_len: int | None = None, vocab_size: int = 128256, **kwargs) -> ModelSpec:
    """conf/model/<name>.yaml as a ModelSpec (the preset's max_seq_len unless seq_len)."""
    from types import SimpleNamespace

    import yaml

    values = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
    return model_spec(SimpleNamespace(**values), seq_len, vocab_size, **kwargs)


def parameter_counts(model: ModelSpec) -> dict[str, float]:
    """count_parameters, with the GeLU MLP (two matrices) of the gpt family, per layer too."""
    counts = dict(count_parameters(model.dims))
    if not model.gated:
        counts["layers"] -= model.hidden * model.ffn * model.layers
        counts["total"] -= model.hidden * model.ffn * model.layers
    counts["per_layer"] = (counts["layers"] - model.hidden) / model.layers
    return counts


# ---------------------------------------------------------------------------------------
# Layout and how it runs
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One way to lay the model over gpus = tp x pp x cp x dp. zero: 'distopt' (megatron's
    distributed optimizer = ZeRO-1) | 'none' (megatron DDP, replicated Adam) | 1 | 2 | 3
    (DeepSpeed ZeRO stage; TP only: no PP, CP, SP or interleaving)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1  # per step and pipeline (= gradient accumulation steps)
    sequence_parallel: bool = False
    zero: str | int = "distopt"
    recompute: str = "none"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    @property
    def engine(self) -> str:
        return "megatron" if self.zero in ("distopt", "none") else "deepspeed"

    @property
    def optimizer_shards(self) -> int:
        """Ranks the optimizer states are split over: megatron shards over dp x cp."""
        return 1 if self.zero == "none" else self.dp * self.cp

    def describe(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        vpp = f" vpp{self.vpp}" if self.vpp > 1 else ""
        zero = {"distopt": "distopt", "none": "ddp"}.get(self.zero, f"zero{self.zero}")
        return (
            f"tp{self.tp}{sp} pp{self.pp}{vpp} cp{self.cp} dp{self.dp} mbs{self.micro_batch_size} "
            f"{zero} rc={self.recompute}"
        )


@dataclass(frozen=True)
class Execution:
    """How the layers run, beyond the layout: kernels, precision, overlap, the reserve.

    attention: flash -- Transformer Engine's fused attention (no s x s tensor; what model.spec=te
                 runs on GPUs); unfused -- megatron's local spec with torch's softmax (what runs
                 on CPU, and on GPUs without TE): saves [b, heads/tp, s, s] fp32 probabilities;
               fused_softmax -- the local spec with megatron's fused scale-mask-softmax kernel
                 (its output saved in the compute dtype; the 2021 GPT runs).
    The overlap fractions are the share of a message hidden behind compute when its overlap
    window is long enough; these are assumptions, stated here, not measurements."""

    attention: str = "flash"
    bytes_per_element: int = 2  # activations and weights: 2 (bf16), 4 (fp32: CPU runs)
    grad_reduce_bytes: int = 4  # megatron DDP grad_reduce_in_fp32 (parallel/engine.py)
    dp_overlap: float = 0.8  # overlap_grad_reduce / overlap_param_gather (on by default)
    tp_overlap: float = 0.0  # --tp-comm-overlap (not set by this project's engine)
    tp_async_backward: bool = True  # megatron-core: input-gradient reductions under the wgrad GEMM
    pp_overlap: float = 0.0  # p2p messages hidden behind compute
    cp_overlap: float = 0.5  # ring attention: K/V exchange overlapped with the attention of a chunk
    pp_scatter_gather: bool = False  # Megatron-LM 2021: p2p split over the tp ranks (1/tp each)
    reserve_gib: float = 3.0  # CUDA context (~0.5), NCCL buffers (1-2), allocator fragmentation
    adam_bytes_per_param: int = 32  # Adam's update traffic: grad, master, m, v read+written, param, clip

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_OPTIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_OPTIONS}")


def layout_problems(layout: Layout, model: ModelSpec, execution: Execution = Execution()) -> list[str]:
    """Why a layout cannot run (empty: it can): the trainer's own checks (`_trainer_problems`),
    DeepSpeed's limits and the attention kernel's."""
    lay = layout
    if min(lay.tp, lay.pp, lay.vpp, lay.cp, lay.dp, lay.micro_batch_size, lay.num_microbatches) < 1:
        return ["every size must be >= 1"]
    problems = _trainer_problems(lay, model) + _engine_problems(lay)
    if lay.cp > 1 and execution.attention != "flash":
        problems.append(f"cp={lay.cp} needs Transformer Engine attention (attention=flash)")
    return problems


def _trainer_problems(lay: Layout, model: ModelSpec) -> list[str]:
    """What `dlm train` itself would refuse before start: parallel/topology.py's Topology.build
    (sizes dividing the model, the layer split), check_interleaving and sequence_multiple
    (imported on first use: that module imports torch)."""
    from parallel.topology import ConfigError, PipelineLayout, Topology, check_interleaving, sequence_multiple

    dims = dict(
        num_layers=model.layers,
        num_attention_heads=model.heads,
        num_query_groups=model.groups,
        ffn_hidden_size=model.ffn,
        padded_vocab=model.vocab,
    )
    layout = dict(tp=lay.tp, pp=lay.pp, cp=lay.cp, sequence_parallel=lay.sequence_parallel)
    try:
        Topology.build(lay.gpus, **layout, pipeline=PipelineLayout(vpp=lay.vpp), **dims)
        check_interleaving(lay.pp, lay.vpp, None, lay.num_microbatches)
    except ConfigError as e:
        return [str(e)]
    multiple = sequence_multiple(lay.tp, lay.cp, lay.sequence_parallel)
    return [f"seq_len={model.seq_len} must be a multiple of {multiple}"] if model.seq_len % multiple else []


def _engine_problems(lay: Layout) -> list[str]:
    if lay.zero not in ZERO_OPTIONS:
        return [f"zero={lay.zero!r} is not one of {ZERO_OPTIONS}"]
    if lay.recompute not in RECOMPUTE_OPTIONS:
        return [f"recompute={lay.recompute!r} is not one of {RECOMPUTE_OPTIONS}"]
    if lay.engine == "deepspeed" and (lay.pp > 1 or lay.cp > 1 or lay.vpp > 1 or lay.sequence_parallel):
        return [f"DeepSpeed ZeRO-{lay.zero} runs TP only: no pp, cp, vpp or sequence parallelism"]
    return []


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------
def stage_parameters(model: ModelSpec, layout: Layout, stage: str) -> float:
    """Parameters held by one GPU of the first or last pipeline stage: its layers (norm
    weights replicated over tp, the rest split), the input embedding on the first stage, the
    output layer (untied) and the final norm on the last."""
    counts, h = parameter_counts(model), model.hidden
    per_layer = (counts["per_layer"] - 2 * h) / layout.tp + 2 * h
    params = per_layer * model.layers / layout.pp
    if stage == "first" or layout.pp == 1:
        params += counts["embedding"] / layout.tp
    if stage == "last" or layout.pp == 1:
        params += counts["output"] / layout.tp + h
    return params


def model_state_bytes(model: ModelSpec, layout: Layout, execution: Execution, stage: str) -> dict[str, float]:
    """Weights, gradients and optimizer states of one GPU, by engine and sharding.

    megatron (distopt | none): compute-dtype weights (2 B bf16), fp32 gradient buffer (4 B),
    Adam m + v (8 B) + fp32 master weights (4 B, only when the weights are not fp32), the
    optimizer part divided over dp x cp with the distributed optimizer (megatron's
    docs/source/api-guide/dist_optimizer: 6 + 12/d bytes per parameter in bf16).
    DeepSpeed (conf/zero/*.yaml): stage 1: 2 + 2 + 12/d; stage 2: 2 + (2 + 12)/d; stage 3:
    (2 + 2 + 12)/d, plus the all-gathered working set (two layers and the vocabulary matrix)."""
    n, e = stage_parameters(model, layout, stage), execution.bytes_per_element
    adam = 8 + (4 if e < 4 else 0)
    shards = layout.optimizer_shards
    if layout.engine == "megatron":
        return {"weights": e * n, "gradients": 4 * n, "optimizer": adam * n / shards}
    grad_shards = shards if layout.zero in (2, 3) else 1
    weights = e * n / shards if layout.zero == 3 else e * n
    gathered = zero3_gathered_bytes(model, layout, e) if layout.zero == 3 else 0.0
    return {"weights": weights + gathered, "gradients": e * n / grad_shards, "optimizer": adam * n / shards}


def zero3_gathered_bytes(model: ModelSpec, layout: Layout, e: int) -> float:
    """ZeRO-3's transient full parameters: the layer running and the one prefetched, and the
    embedding/output matrix while it is in use."""
    per_layer = parameter_counts(model)["per_layer"] / layout.tp
    return e * (2 * per_layer + model.vocab * model.hidden / layout.tp)


def layer_activation_bytes(
    model: ModelSpec, layout: Layout, execution: Execution, recompute: str | None = None
) -> float:
    """Bytes one transformer layer keeps for backward, per microbatch, on one GPU.

    T = b*s/cp tokens on the rank, e the element size, sp = 1/tp under sequence parallelism
    (else 1: the norms and the column-parallel inputs are then whole on every tp rank), a/g
    heads / query groups, F the ffn width. Checked against megatron-core 0.16.1 with
    autograd's saved-tensor hooks (local spec, fp32 and bf16: exact to the byte):
      unfused (local spec: torch RMSNorm + ColumnParallelLinear + DotProductAttention):
        two RMSNorms: torch upcasts to fp32 and saves the fp32 input and the normalised
          x, plus rstd:                                 2 * (2*max(e,4)*T*h + 4*T) * sp
        qkv and fc1 inputs (linear_qkv, linear_fc1; sharded under SP,
          tensor_parallel/layers.py saves the shard and re-gathers in backward): 2*e*T*h*sp
        RoPE cos/sin for q and k ([s, 1, 1, d] each):    4*e*s*(h/a)
        DotProductAttention: q, K and V repeated to all heads (repeat_interleave; with a=g
          V is a view that pins the whole qkv output), fp32 softmax output [b, a/tp, s, s]
          (attention_softmax_in_fp32) and, in bf16, its bf16 copy for the second bmm:
                                                        3*e*T*h/tp + (4 + e if e < 4)*b*(a/tp)*s^2
        linear_proj input (context):                    e*T*h/tp
        SwiGLU (mlp.py glu): fc1 output [T, 2F], silu(x1), x2 + 0 (glu_linear_offset), the
          product (fc2 input):                          5*e*T*F/tp
      flash (TE spec): the norms fused into TELayerNormColumnParallelLinear save input and
        norm output in the compute dtype (2 * 2*e*T*h*sp); attention keeps q, k (post-RoPE),
        the qkv output (pinned by the v view), the output O (shared with linear_proj) and
        fp32 softmax statistics 4*b*(a/tp)*s: no s x s term.
      fused_softmax: as unfused, the probabilities saved once in the compute dtype (+ dropout
        mask and dropped copy for the gpt family).
    selective recompute (core attention checkpointed): q, k and the qkv output instead of the
      repeated K/V and the probabilities (flash: only the statistics go).
    full recompute: the layer input alone, e*T*h*sp (the working set of the layer being
      recomputed is `activation_working` in `memory`)."""
    recompute = recompute or layout.recompute
    e, h, tp = execution.bytes_per_element, model.hidden, layout.tp
    tokens = layout.micro_batch_size * model.seq_len / layout.cp
    sp = 1 / tp if layout.sequence_parallel else 1.0
    if recompute == "full":
        return e * tokens * h * sp
    attention = attention_saved_bytes(model, layout, execution, recompute)
    linear_outputs = e * tokens * h / tp + mlp_saved_elements(model) * e * tokens * model.ffn / tp
    return (
        norm_saved_bytes(model, layout, execution) * 2
        + attention
        + linear_outputs
        + rope_bytes(model, layout, e)
    )


def norm_saved_bytes(model: ModelSpec, layout: Layout, execution: Execution) -> float:
    """One pre-norm and the input of the linear layer after it (see layer_activation_bytes)."""
    e, h = execution.bytes_per_element, model.hidden
    tokens = layout.micro_batch_size * model.seq_len / layout.cp
    sp = 1 / layout.tp if layout.sequence_parallel else 1.0
    norm = (2 * e if execution.attention == "flash" else 2 * max(e, 4)) * tokens * h + 4 * tokens
    return (norm + (0 if execution.attention == "flash" else e * tokens * h)) * sp


def rope_bytes(model: ModelSpec, layout: Layout, e: int) -> float:
    """cos and sin of the rotary embedding for q and k, [s, 1, 1, head_dim] each (llama only)."""
    return 4 * e * model.seq_len / layout.cp * model.head_dim if model.family == "llama" else 0.0


def mlp_saved_elements(model: ModelSpec) -> int:
    """Per token and F/tp: SwiGLU (unfused, mlp.py glu) 5; GeLU (fc1 output, gelu output) 2."""
    return 5 if model.gated else 2


def attention_saved_bytes(model: ModelSpec, layout: Layout, execution: Execution, recompute: str) -> float:
    """What self-attention keeps between linear_qkv and linear_proj (see layer_activation_bytes)."""
    e, h, tp = execution.bytes_per_element, model.hidden, layout.tp
    tokens = layout.micro_batch_size * model.seq_len / layout.cp
    q, kv = e * tokens * h / tp, e * tokens * h * model.kv_fraction / tp
    qkv_output = q + 2 * kv
    if execution.attention == "flash":
        stats = 0.0 if recompute == "selective" else 4 * layout.micro_batch_size * model.heads / tp * tokens
        return q + kv + qkv_output + stats
    if recompute == "selective":
        return q + kv + qkv_output
    repeated = 2 * q if model.heads > model.groups else kv + qkv_output
    return q + repeated + score_elements(model, layout) * saved_bytes_per_score(model, execution)


def score_elements(model: ModelSpec, layout: Layout) -> float:
    """Elements of the [b, heads/tp, s, s] score matrix on one GPU."""
    seq = model.seq_len / layout.cp
    return layout.micro_batch_size * model.heads / layout.tp * seq * seq


def saved_bytes_per_score(model: ModelSpec, execution: Execution) -> float:
    """Bytes saved per s x s element: torch softmax saves fp32 (+ the compute-dtype copy the
    second bmm saves); the fused kernel saves its output; dropout a mask and the dropped copy."""
    e = execution.bytes_per_element
    if execution.attention == "unfused":
        return 4 + (e if e < 4 else 0)
    dropout = 1 + e if model.family == "gpt" else 0
    return e + dropout


def in_flight_microbatches(layout: Layout, pp_rank: int = 0) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak, in units of the rank's
    full set of layers: 1F1B (megatron forward_backward_pipelining_without_interleaving):
    pp - rank (capped by the microbatches); interleaved: ((pp-rank-1)*2 + (vpp-1)*pp + 1)
    chunk-forwards of layers/(pp*vpp) each, i.e. pp + (pp-1)/vpp at rank 0 (Korthikanti et al.
    2022, eq. 5's factor 1 + (p-1)/(p*m)); no pipeline: one."""
    lay = layout
    if lay.pp == 1:
        return 1.0
    if lay.vpp == 1:
        return float(min(lay.pp - pp_rank, lay.num_microbatches))
    chunks = (lay.pp - pp_rank - 1) * 2 + (lay.vpp - 1) * lay.pp + 1
    return min(chunks, lay.num_microbatches * lay.vpp) / lay.vpp


def head_activation_bytes(model: ModelSpec, layout: Layout, execution: Execution) -> float:
    """The last stage's final norm (torch RMSNorm: fp32 input, normalised x and rstd; TENorm:
    input and rstd), the selected rows the output layer saves, and the masked-only logits at the
    worst masked fraction: [n, V/tp] fp32 softmax saved by vocab_parallel_cross_entropy
    (tensor_parallel/cross_entropy.py: logits.float(), exp in place) plus, when e < 4, the
    compute-dtype logits and their gradient."""
    e, h = execution.bytes_per_element, model.hidden
    tokens = layout.micro_batch_size * model.seq_len / layout.cp
    sp = 1 / layout.tp if layout.sequence_parallel else 1.0
    rows = model.max_masked_fraction * tokens
    norm_bytes = e if execution.attention == "flash" else 2 * max(e, 4)
    final_norm = (norm_bytes * tokens * h + 4 * tokens) * sp
    logits = rows * model.vocab / layout.tp * (4 + (e if e < 4 else 0))
    return final_norm + e * rows * h * sp + logits


def attention_scratch_bytes(model: ModelSpec, layout: Layout, execution: Execution) -> float:
    """Unfused attention computes its [b * heads/tp, s, s] scores into one persistent buffer
    (dot_product_attention.py: parallel_state.get_global_memory_buffer().get_tensor, kept
    for the whole run); flash attention has none."""
    if execution.attention == "flash":
        return 0.0
    return score_elements(model, layout) * execution.bytes_per_element


def stage_memory(model: ModelSpec, layout: Layout, execution: Execution, stage: str) -> dict[str, float]:
    """Per-GPU bytes of the first or last pipeline stage, term by term (see `memory`)."""
    terms = model_state_bytes(model, layout, execution, stage)
    rank = 0 if stage == "first" else layout.pp - 1
    layers = model.layers / layout.pp
    per_layer = layer_activation_bytes(model, layout, execution)
    terms["activations"] = per_layer * layers * in_flight_microbatches(layout, rank)
    working = layer_activation_bytes(model, layout, execution, recompute="none")
    terms["activation_working"] = working if layout.recompute == "full" else 0.0
    is_last = stage == "last" or layout.pp == 1
    terms["head"] = head_activation_bytes(model, layout, execution) if is_last else 0.0
    terms["scratch"] = attention_scratch_bytes(model, layout, execution)
    terms["reserve"] = execution.reserve_gib * GIB
    terms["total"] = sum(terms.values())
    return terms


def memory(model: ModelSpec, layout: Layout, execution: Execution = Execution()) -> dict[str, float]:
    """Per-GPU bytes of the fullest pipeline stage, each term separately: weights, gradients,
    optimizer, activations (per layer x layers on the stage x microbatches in flight),
    activation_working (full recompute: one layer's activations rebuilt in backward), head
    (masked-only logits at the worst masked fraction, last stage), reserve, total; 'stage'
    names which stage it is (0: first, 1: last). The fp32 master weights are counted under
    optimizer: they are sharded with the Adam moments."""
    first = stage_memory(model, layout, execution, "first")
    last = stage_memory(model, layout, execution, "last")
    worst = max((first, last), key=lambda terms: terms["total"])
    return {**worst, "stage": 0.0 if worst is first else 1.0}


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------
def flops_per_token(model: ModelSpec) -> dict[str, float]:
    """Model FLOPs (forward + backward) per token, as pretrain/config.py derive() counts them:
    'layers' 6 x layer parameters; 'attention' 12 x layers x s x h (the full s x s square:
    bidirectional); 'head' 6 x h x V per SCORED token."""
    return {
        "layers": 6.0 * parameter_counts(model)["layers"],
        "attention": 12.0 * model.layers * model.seq_len * model.hidden,
        "head": 6.0 * model.hidden * model.vocab,
    }


def flops_per_step(model: ModelSpec, layout: Layout) -> dict[str, float]:
    """'model': FLOPs of one global batch (head on the mean masked fraction) -- what MFU
    counts; 'recompute': the extra forward passes recomputation runs (full: the layers and
    attention again; selective: the attention core again), not counted by MFU."""
    per_token = flops_per_token(model)
    tokens = layout.global_batch_size * model.seq_len
    scored = tokens * model.masked_fraction
    dense = tokens * (per_token["layers"] + per_token["attention"])
    recompute = {"none": 0.0, "selective": 1 / 3 * per_token["attention"]}
    recompute["full"] = (per_token["layers"] + per_token["attention"]) / 3
    return {"model": dense + scored * per_token["head"], "recompute": tokens * recompute[layout.recompute]}


# ---------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageWork:
    """One microbatch's forward + backward on one GPU of a pipeline stage, in seconds."""

    compute: float  # GEMMs (and flash attention) at peak x achievable_fraction
    memory_bound: float  # elementwise kernels and s x s traffic at HBM bandwidth
    tp_comm: float
    cp_comm: float
    pp_p2p: float

    @property
    def total(self) -> float:
        return self.compute + self.memory_bound + self.tp_comm + self.cp_comm + self.pp_p2p


def passes(recompute: str) -> dict[str, float]:
    """Forward-equivalents of a layer per microbatch: forward 1, backward 2, + 1 forward again
    under full recompute (the attention core only under selective)."""
    return {"layer": 3.0 + (recompute == "full"), "core": 3.0 + (recompute != "none")}


def gemm_seconds(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution, last: bool
) -> float:
    """GEMM time of one microbatch on one GPU of a stage: 2 x layer parameters per token per
    forward-equivalent, the attention core's 4 x s x h per token per forward (flash: halved when
    causal; non-flash: the two s x s bmms), and on the last stage the output layer (6 x h x V
    per scored token)."""
    tokens = layout.micro_batch_size * model.seq_len / (layout.tp * layout.cp)  # per GPU
    n, layers = passes(layout.recompute), model.layers / layout.pp
    flops = tokens * 2 * parameter_counts(model)["per_layer"] * n["layer"] * layers
    square = 0.5 if model.causal and execution.attention == "flash" else 1.0
    flops += tokens * 4 * model.seq_len * model.hidden * square * n["core"] * layers
    if last:
        flops += tokens * model.masked_fraction * flops_per_token(model)["head"]
    return flops / (cluster.peak_tflops * 1e12 * cluster.achievable_fraction)


def unfused_core_flops(model: ModelSpec, layout: Layout) -> float:
    """Forward FLOPs of the two s x s bmms of one layer on one GPU: 2 x 2 x elements x head_dim."""
    return 4 * score_elements(model, layout) * model.head_dim


# Bytes moved per s x s element by non-flash attention, forward and backward (kernel by kernel,
# dot_product_attention.py and fusions/fused_softmax.py): (bmm part, softmax/dropout part).
#   torch softmax, fp32: fwd bmm write+read 8, float() no-op, softmax read+write 8;
#     bwd bmm 16 (grad probs written, probs read, grad scores read twice), softmax bwd 12.
#   torch softmax, bf16: fwd bmm 4, float() 2+4, softmax 8, cast back 4+2; bwd bmm 8, cast 6,
#     softmax 12, float() 6.
#   megatron fused softmax (+ dropout 0.1, gpt family): fwd 4 | 4 (+ dropout 2+2+1);
#     bwd 8 | 6 (+ dropout 2+2+1).
def score_traffic(model: ModelSpec, execution: Execution) -> dict[str, float]:
    e = execution.bytes_per_element
    if execution.attention == "unfused":
        other = (8.0, 12.0) if e >= 4 else (20.0, 24.0)
    else:
        other = (9.0, 11.0) if model.family == "gpt" else (4.0, 6.0)
    return {"bmm_fwd": 2.0 * e, "bmm_bwd": 4.0 * e, "other_fwd": other[0], "other_bwd": other[1]}


def elementwise_bytes_per_token(model: ModelSpec, layout: Layout, execution: Execution) -> float:
    """HBM traffic of one layer's memory-bound kernels per token, forward, on one GPU.
    llama: two RMSNorms (read + write h) and two residual adds (read 2h, write h), scaled by
    1/tp under SP; unfused RoPE on q and k (apply_rotary_pos_emb_bshd: 2 mul, neg, cat, add:
    10 passes); SwiGLU unfused (silu 2F, x2 + 0 2F, product 3F).
    gpt (Megatron-LM 2021 fused kernels): LayerNorms (4h), bias-dropout-add (2 x (3h + mask)),
    bias-GeLU (2F), the context permute/contiguous (2h)."""
    e, h, tp = execution.bytes_per_element, model.hidden, layout.tp
    sp = 1 / tp if layout.sequence_parallel else 1.0
    if model.family == "gpt":
        return (10 * h * e + 2 * h) * sp + (2 * h + 2 * model.ffn) * e / tp
    rope = 10 * h * (1 + model.kv_fraction) * e / tp
    return 10 * h * e * sp + rope + 7 * model.ffn * e / tp


def memory_bound_seconds(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution, last: bool
) -> float:
    """Memory-bound time of one microbatch on one GPU of a stage: elementwise kernels (backward
    ~ 2 x forward traffic), the s x s traffic of non-flash attention beyond its bmm FLOPs, and
    on the last stage the cross entropy (~60 bytes per fp32 logit element, forward + backward)."""
    tokens = layout.micro_batch_size * model.seq_len / layout.cp
    n = passes(layout.recompute)
    per_layer = elementwise_bytes_per_token(model, layout, execution) * tokens * n["layer"]
    seconds = per_layer * model.layers / layout.pp / hbm_rate(cluster)
    if execution.attention != "flash":
        seconds += score_seconds(model, layout, cluster, execution) * model.layers / layout.pp
    if last:
        logits = tokens * model.masked_fraction * model.vocab / layout.tp
        seconds += 60 * logits / hbm_rate(cluster)
    return seconds


def score_seconds(model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution) -> float:
    """One layer's non-flash attention core per microbatch, beyond the bmm FLOPs that
    gemm_seconds counts: a bmm over an s x s operand takes max(FLOPs time, bytes time) (head_dim
    FLOPs per byte is below the GPUs' ridge point, so it is usually memory-bound), and the
    softmax (and dropout) are pure traffic. Forward again under recompute."""
    traffic, elements = score_traffic(model, execution), score_elements(model, layout)
    hbm = hbm_rate(cluster)
    fwd_flops = unfused_core_flops(model, layout) / (cluster.peak_tflops * 1e12 * cluster.achievable_fraction)
    forward = (
        max(0.0, traffic["bmm_fwd"] * elements / hbm - fwd_flops) + traffic["other_fwd"] * elements / hbm
    )
    backward = (
        max(0.0, traffic["bmm_bwd"] * elements / hbm - 2 * fwd_flops) + traffic["other_bwd"] * elements / hbm
    )
    return forward * (passes(layout.recompute)["core"] - 2) + backward


def hbm_rate(cluster: ClusterSpec) -> float:
    """Bytes per second memory-bound kernels move."""
    return cluster.hbm_gbps * 1e9 * cluster.hbm_efficiency


def link_gbps(cluster: ClusterSpec, ranks_spanned: int) -> float:
    """Achieved bandwidth of a group whose ranks span `ranks_spanned` consecutive GPUs: NVLink
    inside a node, the NICs across nodes."""
    nominal = cluster.intra_node_gbps if ranks_spanned <= cluster.gpus_per_node else cluster.inter_node_gbps
    return nominal * cluster.comm_efficiency * 1e9


def ring_seconds(size_bytes: float, ranks: int, gbps: float) -> float:
    """One ring all-gather or reduce-scatter of a `size_bytes` tensor: (n-1)/n of it per GPU."""
    return 0.0 if ranks <= 1 else size_bytes * (ranks - 1) / ranks / gbps


def tp_comm_seconds(model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution) -> float:
    """Exposed tensor-parallel messages of one microbatch on one stage, each a ring all-gather or
    reduce-scatter of the [s/cp, b, h] activation (an all-reduce is one of each). Per layer and
    forward pass (twice under full recompute): attention and MLP each all-reduce (without SP) or
    all-gather + reduce-scatter (SP): 4. Backward: 4 more, but megatron-core issues the
    input-gradient all-reduce / reduce-scatter of the column-parallel layers asynchronously
    under the weight-gradient GEMM (tensor_parallel/layers.py): with `tp_async_backward`
    0 (no SP) or 2 (SP: the all-gathers of the output gradient) stay exposed. Megatron's rank
    order tp-cp-dp-pp keeps tp ranks adjacent (NVLink when tp <= gpus_per_node)."""
    size = layout.micro_batch_size * model.seq_len / layout.cp * model.hidden * execution.bytes_per_element
    forwards = passes(layout.recompute)["layer"] - 2
    backward = (2 if layout.sequence_parallel else 0) if execution.tp_async_backward else 4
    ops_per_layer = 4 * forwards + backward
    seconds = ops_per_layer * ring_seconds(size, layout.tp, link_gbps(cluster, layout.tp))
    return seconds * model.layers / layout.pp * (1 - execution.tp_overlap)


def cp_comm_seconds(model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution) -> float:
    """Ring attention over cp ranks: per layer, cp - 1 exchanges of this rank's K and V shard
    (2 x b x s/cp x h x groups/heads / tp) forward, K/V and their gradients backward (x2), once
    more when the core is recomputed; partly hidden behind the attention of the current chunk."""
    if layout.cp == 1:
        return 0.0
    tokens = layout.micro_batch_size * model.seq_len / layout.cp
    kv = 2 * tokens * model.hidden * model.kv_fraction / layout.tp * execution.bytes_per_element
    exchanges = (layout.cp - 1) * passes(layout.recompute)["core"]
    seconds = exchanges * kv / link_gbps(cluster, layout.tp * layout.cp)
    return seconds * model.layers / layout.pp * (1 - execution.cp_overlap)


def pp_p2p_seconds(model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution) -> float:
    """One microbatch's pipeline messages on a rank: the activation forward and its gradient
    backward, per model chunk ([s/cp, b, h], split over tp under SP or 2021's scatter/gather).
    Pipeline neighbours are tp x cp x dp ranks apart: across nodes unless the whole model fits one."""
    if layout.pp == 1:
        return 0.0
    split = layout.tp if layout.sequence_parallel or execution.pp_scatter_gather else 1
    size = (
        layout.micro_batch_size
        * model.seq_len
        / layout.cp
        * model.hidden
        * execution.bytes_per_element
        / split
    )
    seconds = 2 * layout.vpp * size / link_gbps(cluster, layout.gpus)
    return seconds * (1 - execution.pp_overlap)


def stage_work(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution, last: bool
) -> StageWork:
    return StageWork(
        compute=gemm_seconds(model, layout, cluster, execution, last),
        memory_bound=memory_bound_seconds(model, layout, cluster, execution, last),
        tp_comm=tp_comm_seconds(model, layout, cluster, execution),
        cp_comm=cp_comm_seconds(model, layout, cluster, execution),
        pp_p2p=pp_p2p_seconds(model, layout, cluster, execution),
    )


def exposed(comm: float, window: float, overlap: float) -> float:
    """The part of a message not hidden behind `window` seconds of compute."""
    return comm - overlap * min(comm, window)


def dp_comm_seconds(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution, work: StageWork
) -> float:
    """Data-parallel messages per step, exposed part. distopt / ZeRO-1: reduce-scatter of the
    gradients (fp32 in megatron, grad_reduce_in_fp32) hidden behind the last microbatch's
    backward, all-gather of the updated bf16 weights behind the first forward; 'none': an
    all-reduce (= both) of the gradients; ZeRO-2: the reduce-scatter every microbatch; ZeRO-3:
    per microbatch two weight all-gathers (forward, backward) and a reduce-scatter. The group
    (dp x cp ranks, tp x cp apart) runs at the inter-node rate as soon as tp x cp x dp >
    gpus_per_node (conservative: NCCL's hierarchical algorithms do part of it over NVLink)."""
    ranks = layout.dp * layout.cp
    if ranks == 1:
        return 0.0
    params = max(stage_parameters(model, layout, s) for s in ("first", "last"))
    gbps = link_gbps(cluster, layout.tp * layout.cp * layout.dp)
    e = execution.bytes_per_element
    grad_bytes = execution.grad_reduce_bytes if layout.engine == "megatron" else e
    scatter = ring_seconds(params * grad_bytes, ranks, gbps)
    gather = ring_seconds(params * e, ranks, gbps)
    fwd = work.total / passes(layout.recompute)["layer"]  # one forward; the rest is backward
    bwd, ov, m = work.total - fwd, execution.dp_overlap, layout.num_microbatches
    if layout.zero == 2:
        return m * exposed(scatter, bwd, ov) + exposed(gather, fwd, ov)
    if layout.zero == 3:
        return m * (exposed(gather, fwd, ov) + exposed(gather + scatter, bwd, ov))
    if layout.zero == "none":
        return exposed(2 * ring_seconds(params * grad_bytes, ranks, gbps), bwd, ov)
    return exposed(scatter, bwd, ov) + exposed(gather, fwd, ov)


def optimizer_seconds(model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution) -> float:
    """Adam's update is memory-bound: adam_bytes_per_param over this GPU's optimizer shard."""
    params = max(stage_parameters(model, layout, s) for s in ("first", "last"))
    return params / layout.optimizer_shards * execution.adam_bytes_per_param / hbm_rate(cluster)


def step_time(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution = Execution()
) -> dict[str, float]:
    """Seconds per global-batch step, term by term. The pipeline runs at its slowest stage
    (the last: it adds the output layer and loss): num_microbatches x that stage's microbatch
    time (compute, memory_bound, tp_comm, cp_comm, pp_p2p), + the bubble (pp-1)/vpp of those
    slots (Narayanan et al. 2021 eq. 2), + the exposed data-parallel messages, + Adam."""
    work = stage_work(model, layout, cluster, execution, last=True)
    m = layout.num_microbatches
    terms = {
        "compute": m * work.compute,
        "memory_bound": m * work.memory_bound,
        "tp_comm": m * work.tp_comm,
        "cp_comm": m * work.cp_comm,
        "pp_p2p": m * work.pp_p2p,
        "bubble": (layout.pp - 1) / layout.vpp * work.total,
        "dp_comm": dp_comm_seconds(model, layout, cluster, execution, work),
        "optimizer": optimizer_seconds(model, layout, cluster, execution),
    }
    terms["total"] = sum(terms.values())
    return terms


# ---------------------------------------------------------------------------------------
# Prediction, enumeration, ranking
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """A layout's predicted memory (bytes per GPU, by term), step time (seconds, by term),
    model FLOPs per step, MFU (model FLOPs only) and throughput."""

    layout: Layout
    memory: dict = field(repr=False)
    time: dict = field(repr=False)
    model_flops: float
    mfu: float
    tokens_per_second: float
    fits: bool

    @property
    def step_seconds(self) -> float:
        return self.time["total"]


def predict(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, execution: Execution = Execution()
) -> Prediction:
    mem = memory(model, layout, execution)
    time = step_time(model, layout, cluster, execution)
    flops = flops_per_step(model, layout)["model"]
    peak = layout.gpus * cluster.peak_tflops * 1e12
    tokens = layout.global_batch_size * model.seq_len
    return Prediction(
        layout=layout,
        memory=mem,
        time=time,
        model_flops=flops,
        mfu=flops / (time["total"] * peak),
        tokens_per_second=tokens / time["total"],
        fits=mem["total"] <= cluster.gpu_memory_bytes,
    )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class SearchSpace:
    """What `enumerate_layouts` tries (tp: divisors of gpus_per_node unless given)."""

    tp: tuple[int, ...] | None = None
    # context parallelism (parallel.cp) only when asked (plan.cp): its cost here is the K/V
    # exchange alone, and its GPU path (Transformer Engine) is unmeasured by this project
    cp: tuple[int, ...] = (1,)
    micro_batch_size: tuple[int, ...] = (1, 2, 4, 8)
    zero: tuple = ZERO_OPTIONS
    recompute: tuple[str, ...] = RECOMPUTE_OPTIONS
    max_vpp: int = 16


def enumerate_layouts(
    model: ModelSpec,
    cluster: ClusterSpec,
    gpus: int,
    global_batch_size: int,
    execution: Execution = Execution(),
    space: SearchSpace = SearchSpace(),
    *,
    seq_len: int | None = None,
) -> list[Prediction]:
    """Every valid layout of `gpus` GPUs for this global batch (sequences) that fits in GPU
    memory, predicted; seq_len overrides the model's. Sequence parallelism is on whenever
    tp > 1 under megatron (as parallel.sequence_parallel's default), off under DeepSpeed."""
    model = replace(model, seq_len=seq_len) if seq_len else model
    found = []
    for layout in candidate_layouts(model, cluster, gpus, global_batch_size, space):
        if layout_problems(layout, model, execution):
            continue
        if memory(model, layout, execution)["total"] > cluster.gpu_memory_bytes:
            continue
        found.append(predict(model, layout, cluster, execution))
    return found


def candidate_layouts(
    model: ModelSpec, cluster: ClusterSpec, gpus: int, global_batch_size: int, space: SearchSpace
):
    """Layouts by shape, before validity checks."""
    for tp in space.tp or divisors(cluster.gpus_per_node):
        for cp in space.cp:
            for pp in divisors(model.layers):
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                yield from _batch_and_engine_choices(model, tp, cp, pp, dp, global_batch_size, space)


def _batch_and_engine_choices(model: ModelSpec, tp, cp, pp, dp, global_batch_size, space: SearchSpace):
    for mbs in space.micro_batch_size:
        if global_batch_size % (mbs * dp):
            continue
        m = global_batch_size // (mbs * dp)
        for vpp in [v for v in divisors(model.layers // pp) if v <= space.max_vpp]:
            for zero in space.zero:
                for recompute in space.recompute:
                    sp = tp > 1 and zero in ("distopt", "none")
                    yield Layout(tp, pp, vpp, cp, dp, mbs, m, sp, zero, recompute)


def rank(predictions: list[Prediction]) -> list[Prediction]:
    """Fitting layouts first, fastest step first; ties to the one with less memory."""
    return sorted(predictions, key=lambda p: (not p.fits, p.step_seconds, p.memory["total"]))


def training_cost(prediction: Prediction, token_budget: float, cluster: ClusterSpec) -> dict[str, float]:
    """Days, GPU-hours and cost to train `token_budget` tokens at the predicted throughput."""
    seconds = token_budget / prediction.tokens_per_second
    gpu_hours = seconds / 3600 * prediction.layout.gpus
    return {"days": seconds / 86400, "gpu_hours": gpu_hours, "cost": gpu_hours * cluster.gpu_hour_cost}


# memory terms as plan_table labels them (GiB per GPU)
MEMORY_COLUMNS = {
    "weights": "wts",
    "gradients": "grads",
    "optimizer": "optim",
    "activations": "acts",
    "activation_working": "work",
    "head": "head",
    "scratch": "buf",
    "reserve": "rsv",
    "total": "GiB",
}


def plan_table(
    predictions: list[Prediction], token_budget: float, cluster: ClusterSpec, top: int = 10
) -> str:
    """The best `top` layouts as a text table: memory GiB per term and total (of the fullest
    pipeline stage), step time, MFU, days and GPU-hours to train `token_budget` tokens."""
    rows = [["layout", *MEMORY_COLUMNS.values(), "step s", "MFU", "days", "GPU-h"]]
    for p in rank(predictions)[:top]:
        cost = training_cost(p, token_budget, cluster)
        gib = [f"{p.memory[key] / GIB:.1f}" for key in MEMORY_COLUMNS]
        days, gpu_hours = f"{cost['days']:.1f}", f"{cost['gpu_hours']:.3g}"
        rows.append([p.layout.describe(), *gib, f"{p.step_seconds:.2f}", f"{p.mfu:.1%}", days, gpu_hours])
    return format_table(rows)


def format_table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        cells = [row[0].ljust(widths[0]), *rest]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def time_breakdown(prediction: Prediction) -> str:
    """One line: each step-time term's share, and MFU."""
    t = prediction.time
    parts = ", ".join(f"{k} {v:.3g}s ({v / t['total']:.0%})" for k, v in t.items() if k != "total" and v > 0)
    return f"{prediction.layout.describe()}: step {t['total']:.3g}s = {parts}; MFU {prediction.mfu:.1%}"


def hydra_overrides(layout: Layout) -> list[str]:
    """The command-line overrides that run `layout` (dlm train ...)."""
    overrides = [
        f"parallel.tp={layout.tp}",
        f"parallel.pp={layout.pp}",
        f"parallel.vpp={layout.vpp}",
        *([f"parallel.cp={layout.cp}"] if layout.cp > 1 else []),
        f"parallel.sequence_parallel={str(layout.sequence_parallel).lower()}",
        f"train.micro_batch_size={layout.micro_batch_size}",
        f"train.global_batch_size={layout.global_batch_size}",
        f"model.recompute={layout.recompute}",
    ]
    if layout.engine == "deepspeed":
        return [*overrides, "parallel.engine=deepspeed", f"zero=zero{layout.zero}"]
    return [*overrides, f"parallel.distributed_optimizer={str(layout.zero == 'distopt').lower()}"]


# ---------------------------------------------------------------------------------------
# `dlm plan`
# ---------------------------------------------------------------------------------------
ZERO_NAMES = {"distopt": "distopt", "ddp": "none", "zero1": 1, "zero2": 2, "zero3": 3}
CLUSTER_KEYS = ("gpu_memory_gib", "intra_node_gbps", "inter_node_gbps", "hbm_gbps", "achievable_fraction")


def cluster_spec(cluster) -> ClusterSpec:
    """The ClusterSpec of a cluster: section (conf/cluster/), every hardware key named when missing."""
    missing = [f"cluster.{key}" for key in ("peak_tflops", *CLUSTER_KEYS) if getattr(cluster, key) is None]
    if cluster.gpus_per_node < 1:
        missing.insert(0, "cluster.gpus_per_node")
    if missing:
        from parallel.topology import ConfigError

        raise ConfigError(
            f"dlm plan models GPUs: cluster={cluster.name} does not set {', '.join(missing)} "
            "(a GPU preset does, e.g. cluster=h100)"
        )
    values = {key: getattr(cluster, key) for key in CLUSTER_KEYS}
    return ClusterSpec(
        cluster.name,
        cluster.gpus_per_node,
        peak_tflops=cluster.peak_tflops,
        **values,
        gpu_hour_cost=cluster.gpu_hour_cost,
    )


def plan_inputs(cfg) -> tuple[ModelSpec, ClusterSpec, Execution, SearchSpace, int, float]:
    """What `dlm plan` plans from a run's config: model, cluster, kernels, options, GPUs, tokens."""
    model = model_spec(cfg.model, cfg.data.seq_len, cfg.plan.vocab_size)
    cluster = cluster_spec(cfg.cluster)
    attention = cfg.plan.attention
    if attention == "auto":
        attention = "unfused" if cfg.model.spec == "local" else "flash"
    unknown = [z for z in cfg.plan.zero if z not in ZERO_NAMES]
    if unknown:
        from parallel.topology import ConfigError

        raise ConfigError(f"plan.zero: {unknown} are not among {list(ZERO_NAMES)}")
    space = SearchSpace(
        cp=tuple(cfg.plan.cp),
        zero=tuple(ZERO_NAMES[z] for z in cfg.plan.zero),
        recompute=tuple(cfg.plan.recompute),
    )
    gpus = cfg.plan.gpus or cfg.cluster.nodes * cfg.cluster.gpus_per_node
    t = cfg.train
    tokens = cfg.plan.tokens or t.steps * t.global_batch_size * cfg.data.seq_len
    return model, cluster, Execution(attention=attention), space, gpus, tokens


def plan_report(cfg) -> str:
    """The plan as `dlm plan` prints it: the best layouts, the best one's memory and time by
    term, its MFU, its Hydra overrides and the time and cost of the token budget."""
    model, cluster, execution, space, gpus, tokens = plan_inputs(cfg)
    batch = cfg.train.global_batch_size
    found = rank(enumerate_layouts(model, cluster, gpus, batch, execution, space))
    head = (
        f"dlm plan: {cfg.model.name} ({parameter_counts(model)['total'] / 1e9:.1f}B params) on {gpus} x "
        f"{cluster.name} ({cluster.gpu_memory_gib:.0f} GiB), global batch {batch} x {model.seq_len} tokens, "
        f"{tokens:.3g} tokens, {execution.attention} attention"
    )
    if not found:
        return head + "\nno layout fits: add GPUs, or allow recompute (plan.recompute) and ZeRO-3 (plan.zero)"
    best = found[0]
    cost = training_cost(best, tokens, cluster)
    memory_terms = ", ".join(
        f"{k} {v / GIB:.1f}" for k, v in best.memory.items() if k not in ("stage", "total")
    )
    return "\n".join(
        [
            head,
            plan_table(found, tokens, cluster, top=cfg.plan.top),
            f"best: {best.layout.describe()}",
            f"  memory per GPU {best.memory['total'] / GIB:.1f} GiB = {memory_terms} (GiB)",
            f"  {time_breakdown(best)}",
            f"  {best.tokens_per_second:,.0f} tokens/s: {tokens:.3g} tokens in {cost['days']:.1f} days, "
            f"{cost['gpu_hours']:,.0f} GPU-hours, cost {cost['cost']:,.0f} at cluster.gpu_hour_cost",
            "  dlm train " + " ".join(hydra_overrides(best.layout)),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """`dlm plan [overrides]`: e.g. dlm plan model=dense_100b cluster=h100 plan.gpus=512 data.seq_len=4096"""
    import sys

    from parallel.topology import ConfigError
    from pretrain.config import load_config

    try:
        print(plan_report(load_config(list(sys.argv[1:] if argv is None else argv))))
    except ConfigError as e:
        print(f"dlm plan: invalid configuration: {e}", file=sys.stderr)
        return 2
    return 0
