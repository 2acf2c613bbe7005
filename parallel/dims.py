"""What `build_model` needs to know about the architecture (no megatron import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """What `build_model` needs to know about the architecture (mirrors pretrain's
    ModelConfig, kept separate so that parallel/ does not import pretrain/)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    padded_vocab_size: int
    max_seq_len: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    causal: bool = False  # True only to check an imported AR model against its source
    # Tokens attend only within their document of a packed sample (forward(segments=...)).
    # Only the Transformer Engine spec needs to know in advance (its mask type).
    document_attention: bool = False
    # The trainer passes [b, 1, s, s] mask tensors (forward(attention_mask=...)), e.g. the
    # curriculum's causal-to-bidirectional annealing; again only TE's spec needs to know.
    mask_tensors: bool = False
    spec: str = "auto"  # auto | local | te
    recompute: str = "none"  # none | full | selective


def count_parameters(dims: ModelDims) -> dict[str, int]:
    """Global parameter counts (all ranks together), for logging and FLOPs."""
    h, layers = dims.hidden_size, dims.num_layers
    head_dim = h // dims.num_attention_heads
    qkv = h * head_dim * (dims.num_attention_heads + 2 * dims.num_query_groups)
    qkv_bias = head_dim * (dims.num_attention_heads + 2 * dims.num_query_groups) if dims.qkv_bias else 0
    attn = qkv + qkv_bias + dims.num_attention_heads * head_dim * h
    mlp = 3 * h * dims.ffn_hidden_size
    norms = 2 * h
    per_layer = attn + mlp + norms
    embedding = dims.padded_vocab_size * h
    output = 0 if dims.tie_embeddings else dims.padded_vocab_size * h
    return {
        "layers": per_layer * layers + h,  # + final norm
        "embedding": embedding,
        "output": output,
        "total": per_layer * layers + h + embedding + output,
    }
