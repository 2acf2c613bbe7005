"""The denoiser: megatron-core's GPTModel with a LLaMA/Qwen layer spec and full
(bidirectional) self-attention.

RMSNorm, RoPE, SwiGLU, grouped-query attention, optional QKV bias (Qwen2), tied or
untied embeddings. The Transformer Engine spec is used when `transformer_engine`
imports (GPUs); the local megatron-core spec otherwise. Both name their parameters
alike in checkpoints (the local spec maps its norms onto TE's names), so a
checkpoint moves between the two.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.dims import ModelDims
from parallel.topology import ConfigError, Topology

try:  # pragma: no cover - only on GPU machines
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def use_transformer_engine(spec: str) -> bool:
    if spec == "te" and not HAVE_TE:
        raise ImportError("model.spec=te but transformer_engine is not importable")
    return spec == "te" or (spec == "auto" and HAVE_TE)


def grad_accumulation_fusion(dims: ModelDims) -> bool:
    """Fuse the weight-gradient GEMM with the accumulation into the fp32 gradient buffer
    where a kernel exists: Transformer Engine's layers on a GPU (fuse_wgrad_accumulation),
    or Apex's fused_weight_gradient_mlp_cuda for megatron's local layers."""
    if not torch.cuda.is_available():
        return False
    if use_transformer_engine(dims.spec):
        return True
    try:  # pragma: no cover - GPU machines with Apex
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def build_transformer_config(dims: ModelDims, topo: Topology, *, bf16: bool) -> TransformerConfig:
    if topo.cp > 1 and torch.cuda.is_available() and not use_transformer_engine(dims.spec):
        raise ConfigError(
            f"parallel.cp={topo.cp} runs on Transformer Engine's context-parallel attention: "
            "model.spec=local has none (install transformer_engine, model.spec=auto|te)"
        )
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute = {
        "none": {},
        "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        "selective": dict(recompute_granularity="selective"),
    }[dims.recompute]
    return TransformerConfig(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        ffn_hidden_size=dims.ffn_hidden_size,
        kv_channels=dims.hidden_size // dims.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=dims.norm_eps,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=dims.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=dims.init_std,
        tensor_model_parallel_size=topo.tp,
        pipeline_model_parallel_size=topo.pp,
        context_parallel_size=topo.cp,
        tp_comm_overlap=topo.tp_comm_overlap,
        **pipeline_settings(topo),
        sequence_parallel=topo.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # Each loss function returns (sum, count); megatron divides by the global count
        # (finalize_model_grads), so 'masked' normalization is exact across microbatches
        # and data-parallel ranks.
        calculate_per_token_loss=True,
        # Identical initial weights for every tensor-parallel layout (full master weight,
        # then split) -- the GPU default initialises shards on-device with per-rank seeds.
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=HAVE_TE,
        gradient_accumulation_fusion=grad_accumulation_fusion(dims),
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        **recompute,
    )


def start_tp_comm_overlap(
    topo: Topology, *, seq_len: int, micro_batch_size: int, hidden_size: int, config_path: str | None
) -> None:
    """Transformer Engine's userbuffers for parallel.tp_comm_overlap, sized for one
    microbatch's [seq_len x micro_batch / cp, hidden] activations, before the model is built
    (as Megatron-LM's _initialize_tp_communicators, megatron/training/initialize.py)."""
    import yaml
    from transformer_engine.pytorch import module as te_module  # pragma: no cover - GPU machines

    settings = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    te_module.base.initialize_ub(
        shape=[seq_len * micro_batch_size // topo.cp, hidden_size],
        tp_size=topo.tp,
        use_fp8=False,
        ub_cfgs=settings,
        bootstrap_backend="nccl",
    )


def pipeline_settings(topo: Topology) -> dict:
    """TransformerConfig's pipeline split and schedule settings (parallel.vpp, uneven
    stages). Interleaved: one pipeline message at a time (batch_p2p_comm off: at pp=2 the
    previous and next stage are one rank, and batched sends and receives pair up crossed,
    Megatron-LM issue #750), overlapped with compute where the backend allows it."""
    from parallel import cpu

    layout, interleaved = topo.pipeline, topo.vpp > 1
    return dict(
        virtual_pipeline_model_parallel_size=topo.vpp if interleaved else None,
        microbatch_group_size_per_vp_stage=layout.microbatch_group_size,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        account_for_embedding_in_pipeline_split=layout.embedding_as_layer,
        account_for_loss_in_pipeline_split=layout.loss_as_layer,
        batch_p2p_comm=not interleaved,
        overlap_p2p_comm=interleaved and cpu.overlaps_pipeline_messages(),
    )


def build_layer_spec(dims: ModelDims) -> ModuleSpec:
    if use_transformer_engine(dims.spec):
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
        # TE decides by the mask *type*: 'arbitrary' applies the [b, 1, s, s] mask tensor.
        takes_masks = dims.document_attention or dims.mask_tensors
        full = AttnMaskType.arbitrary if takes_masks else AttnMaskType.no_mask
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
        # With no mask tensor, the local softmax applies no mask unless the type is causal
        # (fusions/fused_softmax.py:323); a [b, 1, s, s] mask tensor is applied as given.
        full = AttnMaskType.padding
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.causal if dims.causal else full
    layer = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer, name) is WrappedTorchNorm:
            setattr(layer, name, SequenceParallelTorchNorm)
    return spec


def build_block_spec(
    dims: ModelDims, config: TransformerConfig, pp_rank: int, vp_stage: int | None
) -> TransformerBlockSubmodules:
    """This pipeline stage's layers and the final norm: megatron's choice of norm
    (transformer_block.py's LayerNormImpl), except that its torch norm is replaced by one
    that runs under sequence parallelism."""
    from megatron.core.transformer import transformer_block

    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    norm = transformer_block.LayerNormImpl
    norm = SequenceParallelTorchNorm if norm is WrappedTorchNorm else norm
    return TransformerBlockSubmodules(layer_specs=[build_layer_spec(dims)] * layers, layer_norm=norm)


class SequenceParallelTorchNorm:
    """megatron's WrappedTorchNorm (torch's RMSNorm) under sequence parallelism, which it
    refuses (transformer/torch_norm.py:32) although the norm is position-wise: built with
    sequence parallelism off, its weight tagged `sequence_parallel` as TENorm's is, so that
    finalize_model_grads all-reduces its gradient over the tensor-parallel ranks (each
    holds the gradient of its sequence shard only)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        unsharded = copy.copy(config)
        unsharded.sequence_parallel = False
        norm = WrappedTorchNorm(unsharded, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class Denoiser(GPTModel):
    """GPTModel whose output projection can run on a subset of positions, and whose
    attention can be restricted to documents of a packed sample.

    forward(input_ids [b, s], logit_positions [b, s] bool | None, segments [b, s] | None,
            input_noise [b, s, h] | None):
      - `segments`: document numbers of each position; a token attends only to tokens
        of its own document (None: to every token of the sample, or as `attention_mask`
        [b, 1, s, s] allows: True = blocked);
      - `input_noise`: added to the input embeddings (first stage; the curriculum's
        noise on the MASK token's embedding);
      - `rope_positions` [s]: the rotary position of each input position (block
        diffusion's [x_t, x0] input repeats 0..L-1); None: 0..s-1;
      - first/middle pipeline stages return hidden states for the next stage;
      - the last stage returns vocab-parallel logits: [s, b, V/tp] for all positions,
        or [n, 1, V/tp] for the n positions where `logit_positions` is True
        (row-major order, as `tensor[logit_positions]`). Masked diffusion only scores
        masked positions, so this saves (1 - t) of the output projection on average.
    Under sequence parallelism every tensor-parallel rank holds a [s/tp, b, h] shard of the
    hidden states: each selects the rows of its shard, the output layer all-gathers only
    those (padded to the largest shard's count), and the logits are put in row-major order.
    """

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        logit_positions=None,
        segments=None,
        input_noise=None,
        rope_positions=None,
    ):
        if segments is not None:
            attention_mask = document_attention_mask(segments)
        decoder_input, rotary_pos_emb, rotary_cos, rotary_sin, seq_offset, _ = self._preprocess(
            input_ids=input_ids, position_ids=position_ids
        )[:6]
        if rope_positions is not None:  # [s, 1, 1, d] frequencies of positions 0..s-1
            rotary_pos_emb = rotary_pos_emb[rope_positions]
        if input_noise is not None and self.pre_process:  # embeddings are [s, b, h] ([s/tp, b, h] under SP)
            noise = input_noise.transpose(0, 1).to(decoder_input.dtype)
            if self.config.sequence_parallel:
                noise = tensor_parallel.scatter_to_sequence_parallel_region(noise)
            decoder_input = decoder_input + noise
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_cos,
            rotary_pos_sin=rotary_sin,
            sequence_len_offset=seq_offset,
        )
        if not self.post_process:
            return hidden
        order = None
        if logit_positions is not None and self.config.sequence_parallel:
            hidden, order = select_sequence_shard_rows(hidden, logit_positions)
        elif logit_positions is not None:  # hidden is [s, b, h]; select in [b, s] order
            hidden = hidden.transpose(0, 1)[logit_positions].unsqueeze(1)
        weight = (
            self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        )
        logits, _ = self.output_layer(hidden, weight=weight)  # sequence parallel: all-gathers rows
        return logits if order is None else logits.index_select(0, order)


def document_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] document numbers -> [b, 1, s, s] bool, True where a query may NOT attend to a
    key (megatron's convention: masked_fill with -10000 before the softmax)."""
    return (segments[:, None, :, None] != segments[:, None, None, :]).contiguous()


def select_sequence_shard_rows(
    hidden: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Under sequence parallelism: the rows of this rank's shard of `hidden` ([s/tp, b, h])
    where `positions` ([b, s] bool, the same on every tensor-parallel rank) is True, padded
    to the largest count any shard has ([n_max, 1, h]), and `order`: where each selected
    position, in row-major [b, s] order, lands among the tp x n_max rows that the
    sequence-parallel output layer all-gathers (rank-major). No rank holds a full-length
    copy of the hidden states; the padding rows' logits are computed and dropped."""
    tp, rank = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    batch, shard = positions.shape[0], hidden.shape[0]
    by_rank = positions.view(batch, tp, shard).transpose(0, 1).reshape(tp, batch * shard)
    n_max = max(int(by_rank.sum(1).max()), 1)  # one row at least: no empty all-gather
    rows = hidden.transpose(0, 1)[positions[:, rank * shard : (rank + 1) * shard]]
    padded = torch.cat([rows, rows.new_zeros(n_max - rows.shape[0], rows.shape[1])]).unsqueeze(1)
    first_row = torch.arange(tp, device=positions.device).unsqueeze(1) * n_max
    slot = (by_rank.cumsum(1) - 1 + first_row).view(tp, batch, shard).transpose(0, 1).reshape(batch, -1)
    return padded, slot[positions]


def build_model(
    dims: ModelDims,
    topo: Topology,
    *,
    bf16: bool = False,
    initialize: bool = True,
    vp_stage: int | None = None,
) -> Denoiser:
    """One pipeline stage of the denoiser (with parallel.vpp: its model chunk `vp_stage`),
    on `topo.device`. `initialize=False` leaves the weights uninitialised (they are about
    to be loaded or converted: no full-size master weights are materialised on CPU, no
    time spent on random init)."""
    config = build_transformer_config(dims, topo, bf16=bf16)
    config.perform_initialization = initialize
    chunk, chunks = vp_stage or 0, topo.vpp
    model = Denoiser(
        config=config,
        transformer_layer_spec=build_block_spec(dims, config, topo.pp_rank, vp_stage),
        vocab_size=dims.padded_vocab_size,
        max_sequence_length=dims.max_seq_len,
        pre_process=topo.is_first_stage and chunk == 0,
        post_process=topo.is_last_stage and chunk == chunks - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=dims.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=dims.rope_base,
        vp_stage=vp_stage,
    )
    return model.to(topo.device)


def build_model_chunks(
    dims: ModelDims, topo: Topology, *, bf16: bool = False, initialize: bool = True
) -> list[Denoiser]:
    """This pipeline rank's model chunks: one, or parallel.vpp for the interleaved schedule
    (chunk i holds virtual stage i x pp + pp_rank of the pp x vpp)."""
    if topo.vpp == 1:
        return [build_model(dims, topo, bf16=bf16, initialize=initialize)]
    return [build_model(dims, topo, bf16=bf16, initialize=initialize, vp_stage=i) for i in range(topo.vpp)]
