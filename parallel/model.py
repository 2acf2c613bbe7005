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

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.dims import ModelDims
from parallel.topology import Topology

try:  # pragma: no cover - only on GPU machines
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def use_transformer_engine(spec: str) -> bool:
    if spec == "te" and not HAVE_TE:
        raise ImportError("model.spec=te but transformer_engine is not importable")
    return spec == "te" or (spec == "auto" and HAVE_TE)


def build_transformer_config(dims: ModelDims, topo: Topology, *, bf16: bool) -> TransformerConfig:
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
        sequence_parallel=False,
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
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        **recompute,
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
    return spec


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
        if input_noise is not None and self.pre_process:  # embeddings are [s, b, h]
            decoder_input = decoder_input + input_noise.transpose(0, 1).to(decoder_input.dtype)
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
        if logit_positions is not None:  # hidden is [s, b, h]; select in [b, s] order
            hidden = hidden.transpose(0, 1)[logit_positions].unsqueeze(1)
        weight = (
            self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        )
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits


def document_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] document numbers -> [b, 1, s, s] bool, True where a query may NOT attend to a
    key (megatron's convention: masked_fill with -10000 before the softmax)."""
    return (segments[:, None, :, None] != segments[:, None, None, :]).contiguous()


def build_model(dims: ModelDims, topo: Topology, *, bf16: bool = False, initialize: bool = True) -> Denoiser:
    """One pipeline stage of the denoiser, on `topo.device`. `initialize=False` leaves the
    weights uninitialised (they are about to be loaded or converted: no full-size master
    weights are materialised on CPU, no time spent on random init)."""
    config = build_transformer_config(dims, topo, bf16=bf16)
    config.perform_initialization = initialize
    model = Denoiser(
        config=config,
        transformer_layer_spec=build_layer_spec(dims),
        vocab_size=dims.padded_vocab_size,
        max_sequence_length=dims.max_seq_len,
        pre_process=topo.is_first_stage,
        post_process=topo.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=dims.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=dims.rope_base,
    )
    return model.to(topo.device)
