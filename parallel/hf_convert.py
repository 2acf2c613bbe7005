"""Hugging Face Llama/Mistral/Qwen2 weights <-> the megatron-core denoiser, one tensor-parallel
and pipeline shard at a time.

Layout of the megatron side (local layer spec; the Transformer Engine spec names the two
norms `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`, which is also what
both specs write in checkpoints):

- `linear_qkv.weight` [ng * (np/ng + 2) * hd, h]: per query group g, the np/ng query heads
  of g, then k_g, then v_g (SelfAttention.get_query_key_value_tensors); tensor parallelism
  splits the rows, i.e. whole query groups go to each rank. QKV bias likewise.
- `linear_fc1.weight` [2 * ffn, h] under SwiGLU: rank r holds [gate_r; up_r] (its rows of
  gate_proj, then its rows of up_proj); megatron's sharded state dict re-chunks them.
- `linear_proj` / `linear_fc2` are row-parallel: split along the input (column) dimension.
- embedding / output layer: vocab-parallel rows of the padded vocabulary; rows past the
  source vocabulary are zero, an appended mask row is the mean of the source rows.

Import: every rank reads only the slices of its own parameters (safetensors get_slice) into
an uninitialised stage and saves with dist_checkpointing. Export: every rank loads its shard;
for each parameter the owning ranks send their pieces to global rank 0, which assembles one
HF tensor at a time and hands it to a streaming writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from megatron.core import tensor_parallel

from parallel.dims import ModelDims
from parallel.hf_files import HFArch, SliceReader
from parallel.model import Denoiser
from parallel.topology import Topology

ATTN_NORM, QKV, QKV_BIAS, PROJ, MLP_NORM, FC1, FC2 = (
    "attn_norm",
    "qkv",
    "qkv_bias",
    "proj",
    "mlp_norm",
    "fc1",
    "fc2",
)
LAYER_PARAMS = {
    "input_layernorm.weight": ATTN_NORM,
    "self_attention.linear_qkv.layer_norm_weight": ATTN_NORM,
    "self_attention.linear_qkv.weight": QKV,
    "self_attention.linear_qkv.bias": QKV_BIAS,
    "self_attention.linear_proj.weight": PROJ,
    "pre_mlp_layernorm.weight": MLP_NORM,
    "mlp.linear_fc1.layer_norm_weight": MLP_NORM,
    "mlp.linear_fc1.weight": FC1,
    "mlp.linear_fc2.weight": FC2,
}
EMBEDDING, OUTPUT, FINAL_NORM = (
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    "decoder.final_layernorm.weight",
)
ROW_CHUNK = 8192  # embedding rows copied per read


@dataclass(frozen=True)
class VocabLayout:
    source_rows: int  # embedding rows in the HF checkpoint
    vocab_size: int  # the model's vocabulary: source rows (+ 1 appended mask row)
    padded: int  # rows of the megatron embedding (zero past vocab_size)
    appended_row: int | None  # the appended mask row, initialised to the mean of the source rows


def build_dims(arch: HFArch, padded_vocab: int, *, causal: bool = False) -> ModelDims:
    """The denoiser of `arch`: HFArch's fields are ModelDims' (vocab_size aside)."""
    shared = {f.name for f in fields(ModelDims)} & {f.name for f in fields(HFArch)}
    return ModelDims(
        **{name: getattr(arch, name) for name in shared},
        padded_vocab_size=padded_vocab,
        causal=causal,
        spec="local" if not torch.cuda.is_available() else "auto",
    )


def layer_offset(model: Denoiser) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def parse_name(name: str, offset: int) -> tuple[str, int | None]:
    """(kind, global layer) of a local parameter name."""
    if name in (EMBEDDING, OUTPUT, FINAL_NORM):
        return name, None
    parts = name.split(".", 3)
    if parts[:2] == ["decoder", "layers"] and parts[3] in LAYER_PARAMS:
        return LAYER_PARAMS[parts[3]], int(parts[2]) + offset
    raise KeyError(f"no Hugging Face counterpart for the megatron parameter {name}")


# -- import ----------------------------------------------------------------------------------------
class ShardFiller:
    """Fills one rank's parameters from the HF checkpoint, reading only its slices."""

    def __init__(self, arch: HFArch, vocab: VocabLayout, reader: SliceReader, topo: Topology):
        self.arch, self.vocab, self.reader = arch, vocab, reader
        self.r, self.tp = topo.tp_rank, topo.tp

    def _span(self, total: int) -> tuple[int, int]:
        size = total // self.tp
        return self.r * size, (self.r + 1) * size

    def _qkv(self, layer: int, suffix: str) -> torch.Tensor:
        a, hd = self.arch, self.arch.head_dim
        per_group = a.num_attention_heads // a.num_query_groups
        first, last = self._span(a.num_query_groups)
        p = f"model.layers.{layer}.self_attn."
        parts = []
        for g in range(first, last):
            parts.append(
                self.reader.read(p + f"q_proj.{suffix}", (g * per_group * hd, (g + 1) * per_group * hd))
            )
            parts.append(self.reader.read(p + f"k_proj.{suffix}", (g * hd, (g + 1) * hd)))
            parts.append(self.reader.read(p + f"v_proj.{suffix}", (g * hd, (g + 1) * hd)))
        return torch.cat(parts)

    def layer_tensor(self, kind: str, layer: int) -> torch.Tensor:
        p, read = f"model.layers.{layer}.", self.reader.read
        ffn = self._span(self.arch.ffn_hidden_size)
        if kind == ATTN_NORM:
            return read(p + "input_layernorm.weight")
        if kind == MLP_NORM:
            return read(p + "post_attention_layernorm.weight")
        if kind in (QKV, QKV_BIAS):
            return self._qkv(layer, "weight" if kind == QKV else "bias")
        if kind == PROJ:
            return read(p + "self_attn.o_proj.weight", cols=self._span(self.arch.hidden_size))
        if kind == FC1:
            return torch.cat([read(p + "mlp.gate_proj.weight", ffn), read(p + "mlp.up_proj.weight", ffn)])
        if kind == FC2:
            return read(p + "mlp.down_proj.weight", cols=ffn)
        raise KeyError(kind)

    def fill_vocab(self, param: torch.Tensor, key: str) -> None:
        """This rank's rows of the padded vocabulary, copied in chunks straight into `param`."""
        lo, hi = self._span(self.vocab.padded)
        param.zero_()
        for start in range(lo, min(hi, self.vocab.source_rows), ROW_CHUNK):
            stop = min(start + ROW_CHUNK, hi, self.vocab.source_rows)
            param[start - lo : stop - lo].copy_(self.reader.read(key, (start, stop)))
        row = self.vocab.appended_row
        if row is not None and lo <= row < hi:
            param[row - lo].copy_(self.reader.row_mean(key))

    def fill(self, name: str, param: torch.Tensor, offset: int) -> None:
        kind, layer = parse_name(name, offset)
        tied = self.arch.tie_embeddings
        if kind == EMBEDDING or (kind == OUTPUT and tied):
            return self.fill_vocab(param, "model.embed_tokens.weight")
        if kind == OUTPUT:
            return self.fill_vocab(param, "lm_head.weight")
        value = (
            self.reader.read("model.norm.weight") if kind == FINAL_NORM else self.layer_tensor(kind, layer)
        )
        if value.shape != param.shape:
            raise RuntimeError(f"{name}: mapped shape {list(value.shape)} != parameter {list(param.shape)}")
        param.copy_(value)


@torch.no_grad()
def fill_model(model: Denoiser, filler: ShardFiller, progress=None) -> int:
    """Every parameter of this stage from the HF checkpoint. Returns the local element count."""
    offset, count = layer_offset(model), 0
    for name, param in model.named_parameters():
        filler.fill(name, param.data, offset)
        count += param.numel()
        if progress is not None:
            progress.update(1)
    return count


# -- export ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSpec:
    arch: HFArch  # dims of the model (vocab_size: the model's, incl. an appended mask row)
    padded_vocab: int
    gemma: bool  # bidirectional Gemma layout (norms w - 1, embedding / sqrt(h), untied lm_head)
    dtype: torch.dtype

    def hf_shapes(self) -> dict[str, tuple]:
        return self.arch.hf_shapes(o_bias=self.gemma and self.arch.qkv_bias, untied=self.gemma)

    def embed_normalizer(self) -> float:
        """Gemma multiplies input embeddings by sqrt(hidden) cast to the model dtype."""
        return torch.tensor(self.arch.hidden_size**0.5, dtype=self.dtype).item()


class Gatherer:
    """Assembles full megatron parameters on global rank 0 from their owners (dp = 1)."""

    def __init__(self, model: Denoiser, topo: Topology, spec: ExportSpec):
        self.model, self.topo, self.spec = model, topo, spec
        self.params = dict(model.named_parameters())
        self.offset = layer_offset(model)
        self.per_stage = spec.arch.num_layers // topo.pp

    def _local(self, kind: str, layer: int | None) -> torch.Tensor:
        if layer is None:
            return self.params[kind].detach()
        local = layer - self.offset
        for suffix, k in LAYER_PARAMS.items():
            name = f"decoder.layers.{local}.{suffix}"
            if k == kind and name in self.params:
                return self.params[name].detach()
        raise KeyError(f"rank {self.topo.rank}: no {kind} parameter for layer {layer}")

    def gather(self, kind: str, layer: int | None, stage: int, shape: tuple, split: int | None):
        """Pieces of a parameter from its owners, on rank 0 (tp pieces, or one if replicated).
        Other ranks send theirs and get None."""
        tp, rank = self.topo.tp, self.topo.rank
        owners = [stage * tp + t for t in range(tp if split is not None else 1)]
        piece = list(shape)
        if split is not None:
            piece[split] //= tp
        if rank in owners and rank != 0:
            torch.distributed.send(self._local(kind, layer).float().contiguous(), 0)
        if rank != 0:
            return None
        pieces = []
        for owner in owners:
            if owner == 0:
                pieces.append(self._local(kind, layer).float())
            else:
                buf = torch.empty(piece, dtype=torch.float32)
                torch.distributed.recv(buf, owner)
                pieces.append(buf)
        return pieces

    def stage_of(self, layer: int) -> int:
        return layer // self.per_stage


def _vocab_rows(pieces: list[torch.Tensor], vocab: int) -> torch.Tensor:
    return torch.cat(pieces)[:vocab]


def _layer_tensors(g: Gatherer, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
    a, spec = g.spec.arch, g.spec
    h, hd, ng, ffn = a.hidden_size, a.head_dim, a.num_query_groups, a.ffn_hidden_size
    per_group = a.num_attention_heads // ng
    qkv_rows = ng * (per_group + 2) * hd
    stage, p = g.stage_of(layer), f"model.layers.{layer}."
    norm = (lambda w: w - 1.0) if spec.gemma else (lambda w: w)

    def pieces(kind, shape, split):
        return g.gather(kind, layer, stage, shape, split)

    attn_norm = pieces(ATTN_NORM, (h,), None)
    qkv = pieces(QKV, (qkv_rows, h), 0)
    bias = pieces(QKV_BIAS, (qkv_rows,), 0) if a.qkv_bias else None
    proj = pieces(PROJ, (h, a.num_attention_heads * hd), 1)
    mlp_norm = pieces(MLP_NORM, (h,), None)
    fc1 = pieces(FC1, (2 * ffn, h), 0)
    fc2 = pieces(FC2, (h, ffn), 1)
    if g.topo.rank != 0:
        return
    yield p + "input_layernorm.weight", norm(attn_norm[0])
    w = torch.cat(qkv).view(ng, per_group + 2, hd, h)
    b = torch.cat(bias).view(ng, per_group + 2, hd) if bias is not None else None
    for name, sel in (("q_proj", slice(0, per_group)), ("k_proj", slice(per_group, per_group + 1))):
        yield p + f"self_attn.{name}.weight", w[:, sel].reshape(-1, h)
        if b is not None:
            yield p + f"self_attn.{name}.bias", b[:, sel].reshape(-1)
    yield p + "self_attn.v_proj.weight", w[:, per_group + 1 :].reshape(-1, h)
    if b is not None:
        yield p + "self_attn.v_proj.bias", b[:, per_group + 1 :].reshape(-1)
    yield p + "self_attn.o_proj.weight", torch.cat(proj, dim=1)
    if spec.gemma and a.qkv_bias:
        yield p + "self_attn.o_proj.bias", torch.zeros(h)  # Gemma's attention_bias covers o_proj too
    yield p + "post_attention_layernorm.weight", norm(mlp_norm[0])
    halves = [piece.chunk(2) for piece in fc1]
    yield p + "mlp.gate_proj.weight", torch.cat([gate for gate, _ in halves])
    yield p + "mlp.up_proj.weight", torch.cat([up for _, up in halves])
    yield p + "mlp.down_proj.weight", torch.cat(fc2, dim=1)


def export_tensors(model: Denoiser, topo: Topology, spec: ExportSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective generator: yields (HF name, full tensor) in `spec.hf_shapes()` order on
    global rank 0; on other ranks it yields nothing and sends this rank's pieces."""
    g, a = Gatherer(model, topo, spec), spec.arch
    vocab_shape, last = (spec.padded_vocab, a.hidden_size), topo.pp - 1
    embed = g.gather(EMBEDDING, None, 0, vocab_shape, 0)
    if embed is not None:
        rows = _vocab_rows(embed, a.vocab_size)
        yield "model.embed_tokens.weight", rows / spec.embed_normalizer() if spec.gemma else rows
    del embed
    for layer in range(a.num_layers):
        yield from _layer_tensors(g, layer)
    norm = g.gather(FINAL_NORM, None, last, (a.hidden_size,), None)
    if norm is not None:
        yield "model.norm.weight", norm[0] - 1.0 if spec.gemma else norm[0]
    if not a.tie_embeddings:
        head = g.gather(OUTPUT, None, last, vocab_shape, 0)
    elif spec.gemma:  # Gemma scales the input embedding only: the output needs its own copy
        head = g.gather(EMBEDDING, None, 0, vocab_shape, 0)
    else:
        return
    if head is not None:
        yield "lm_head.weight", _vocab_rows(head, a.vocab_size)


# -- forward (checks) -------------------------------------------------------------------------------
@torch.no_grad()
def full_logits(model: Denoiser, topo: Topology, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Collective: logits [b, s, padded vocab] of `input_ids` [b, s] through all pipeline
    stages, gathered over tensor-parallel ranks; returned on global rank 0, None elsewhere."""
    model.eval()
    b, s = input_ids.shape
    h = model.config.hidden_size
    if not topo.is_first_stage:
        hidden = torch.empty(s, b, h)
        torch.distributed.recv(hidden, topo.rank - topo.tp * topo.dp)
        model.set_input_tensor([hidden])
    out = model(input_ids.to(topo.device))
    if not topo.is_last_stage:
        torch.distributed.send(out.contiguous(), topo.rank + topo.tp * topo.dp)
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(out).transpose(0, 1).contiguous()
    source = topo.rank - topo.tp_rank  # tp rank 0 of the last stage
    if topo.rank == 0:
        return logits
    if topo.rank == source and source != 0:
        torch.distributed.send(logits, 0)
    return None


def receive_logits(topo: Topology, shape: tuple) -> torch.Tensor | None:
    """Rank 0's side of `full_logits` when the last stage is another rank."""
    if topo.rank != 0 or topo.is_last_stage:
        return None
    buf = torch.empty(shape)
    torch.distributed.recv(buf, (topo.pp - 1) * topo.tp * topo.dp)
    return buf


def logits_on_rank0(model: Denoiser, topo: Topology, input_ids: torch.Tensor, padded_vocab: int):
    """`full_logits` on every layout: the [b, s, padded vocab] logits on rank 0, None elsewhere."""
    local = full_logits(model, topo, input_ids)
    received = receive_logits(topo, (*input_ids.shape, padded_vocab))
    return local if local is not None else received
