"""Hugging Face checkpoints on disk, without megatron-core: what `dlm import-hf` accepts
(Llama, Mistral, Qwen2 causal LMs in safetensors), checked from the file headers alone
before anything is built or written; slice reads through `safetensors.safe_open`; and a
streaming safetensors writer whose memory use is one tensor, for `dlm export-hf`.

Nothing here unpickles: config.json and the index are JSON, safetensors headers are JSON
and tensor data is raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {v: k for k, v in SUPPORTED_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Keys some checkpoints carry that hold nothing the model needs (recomputed buffers).
IGNORED_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class ConvertError(ValueError):
    """A checkpoint that cannot be converted. The message names the file and key."""


@dataclass(frozen=True)
class HFArch:
    """The architecture both sides agree on (a Llama-family decoder)."""

    architecture: str  # LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int  # rows of the embedding in the checkpoint
    max_seq_len: int
    rope_base: float
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_shapes(self, *, o_bias: bool = False, untied: bool = False) -> dict[str, tuple]:
        """Every tensor of the HF model, in file order, with its shape. `o_bias`: a (zero) o_proj
        bias as Gemma's attention_bias has; `untied`: an lm_head even with tied embeddings."""
        h, f, hd = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv, v = self.num_attention_heads * hd, self.num_query_groups * hd, self.vocab_size
        shapes = {"model.embed_tokens.weight": (v, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"self_attn.{name}.weight"] = (rows, h)
                if self.qkv_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            if o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings or untied:
            shapes["lm_head.weight"] = (v, h)
        return shapes


@dataclass
class HFSource:
    """A checked HF checkpoint directory: its architecture and where each tensor is."""

    path: Path
    arch: HFArch
    config: dict  # config.json as written
    files: list[str]  # safetensors files, in index order
    where: dict[str, str]  # tensor name -> file
    dtypes: dict[str, str]  # tensor name -> safetensors dtype (F32, BF16, F16)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)


# -- reading ---------------------------------------------------------------------------------------
def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ConvertError(f"{path}: truncated safetensors file (header of {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ConvertError(
            f"{path}: truncated safetensors file: the header declares {end} bytes of tensor data, "
            f"the file holds {size - 8 - n}"
        )
    return header


def _locate_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """Safetensors files of a checkpoint and, when sharded, the index's weight map."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConvertError(f"{index}: not a safetensors index (no weight_map): {e}") from e
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                keys = [k for k, v in weight_map.items() if v == name]
                raise ConvertError(
                    f"{index} names {name}, which is missing from {path} (it holds {len(keys)} tensors, "
                    f"e.g. {keys[0]})"
                )
        return files, weight_map
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    extra = (
        f" (found {', '.join(found)}: pickled weights are not read; re-save with safetensors)"
        if found
        else ""
    )
    raise ConvertError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}{extra}")


def _rope_base(cfg, config_path: Path) -> float:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConvertError(
            f"{config_path}: rope scaling {rope} (rope_type {kind!r}) is not supported: the denoiser "
            "uses plain RoPE (rope_type 'default', rope_theta only)"
        )
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def describe_arch(path: Path) -> tuple[HFArch, dict, list[str]]:
    """Parse and check config.json. Returns the architecture, the raw config and notes."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{path}: no config.json (not a Hugging Face model directory)")
    raw = json.loads(config_path.read_text())
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED:
        raise ConvertError(
            f"{config_path}: architecture {archs or raw.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))  # fills the architecture's defaults
    problems = []
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (only 'silu', SwiGLU)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(f"head_dim={head_dim} x num_attention_heads != hidden_size={cfg.hidden_size}")
    if getattr(cfg, "attention_bias", False) and archs[0] != "Qwen2ForCausalLM":
        problems.append("attention_bias=true (a bias on o_proj too; only Qwen2's QKV bias is supported)")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=true")
    if getattr(cfg, "use_sliding_window", False):
        problems.append("use_sliding_window=true (the denoiser attends to the whole sequence)")
    if problems:
        raise ConvertError(f"{config_path}: unsupported {archs[0]} settings: " + "; ".join(problems))
    notes = []
    window = getattr(cfg, "sliding_window", None)
    if archs[0] == "MistralForCausalLM" and window and window < cfg.max_position_embeddings:
        notes.append(f"sliding_window={window} dropped: full attention (identical for sequences <= {window})")
    arch = HFArch(
        architecture=archs[0],
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads or cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_position_embeddings,
        rope_base=_rope_base(cfg, config_path),
        norm_eps=float(cfg.rms_norm_eps),
        qkv_bias=archs[0] == "Qwen2ForCausalLM",
        tie_embeddings=bool(cfg.tie_word_embeddings),
        init_std=float(getattr(cfg, "initializer_range", 0.02)),
    )
    return arch, raw, notes


def describe_source(path: str | Path) -> HFSource:
    """Check a HF checkpoint from its config and safetensors headers (no tensor data is read):
    supported architecture, every file present and complete, every tensor present with the
    expected shape and a supported dtype, nothing unexpected."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"source={path}: not a directory")
    arch, raw, notes = describe_arch(path)
    files, weight_map = _locate_files(path)
    where, dtypes, shapes = {}, {}, {}
    for name in files:
        header = read_header(path / name)
        for key, info in header.items():
            if weight_map is not None and weight_map.get(key) != name:
                continue  # listed under another file by the index (or not at all): not ours
            where[key], dtypes[key], shapes[key] = name, info["dtype"], tuple(info["shape"])
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in where:
                raise ConvertError(f"{path / INDEX_FILE} places {key} in {name}, whose header lacks it")
    expected = arch.hf_shapes()
    for key, shape in expected.items():
        if key not in where:
            raise ConvertError(f"{path}: tensor {key} is missing (a {arch.architecture} checkpoint needs it)")
        if shapes[key] != shape:
            raise ConvertError(
                f"{path / where[key]}: {key} has shape {list(shapes[key])}, config.json implies {list(shape)}"
            )
        if dtypes[key] not in SUPPORTED_DTYPES:
            raise ConvertError(
                f"{path / where[key]}: {key} has dtype {dtypes[key]}; "
                f"supported: {', '.join(SUPPORTED_DTYPES)}"
            )
    allowed = set(expected) | ({"lm_head.weight"} if arch.tie_embeddings else set())
    unexpected = sorted(k for k in where if k not in allowed and not IGNORED_KEYS.fullmatch(k))
    if unexpected:
        raise ConvertError(
            f"{path / where[unexpected[0]]}: unexpected tensors for {arch.architecture} "
            f"({len(unexpected)}: {', '.join(unexpected[:4])}): not a plain {arch.architecture}"
        )
    return HFSource(path, arch, raw, files, where, dtypes, notes)


class SliceReader:
    """Row/column slices of source tensors as float32, through safetensors' get_slice:
    only the requested bytes are read. Counts them. Each read maps the file anew and unmaps
    it after: a long-lived mapping would keep every page read so far in this process's RSS."""

    def __init__(self, source: HFSource):
        self.source = source
        self.bytes_read = 0

    def read(self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        from safetensors import safe_open

        index = (slice(*rows) if rows else slice(None),)
        if cols:
            index = (*index, slice(*cols))
        with safe_open(str(self.source.path / self.source.where[key]), framework="pt") as f:
            t = f.get_slice(key)[index]
            self.bytes_read += t.numel() * t.element_size()
            return t.to(torch.float32)

    def row_mean(self, key: str, chunk: int = 4096) -> torch.Tensor:
        """The mean of all rows of a 2-D tensor, read `chunk` rows at a time (float64 sum)."""
        rows = self.source.arch.vocab_size
        total = torch.zeros(self.source.arch.hidden_size, dtype=torch.float64)
        for start in range(0, rows, chunk):
            total += self.read(key, (start, min(rows, start + chunk))).double().sum(0)
        return (total / rows).float()


# -- mask token ------------------------------------------------------------------------------------
def tokenizer_mask_id(path: Path) -> int | None:
    """The id of the tokenizer's declared mask token (tokenizer_config.json), if any."""
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    mask = data.get("mask_token")
    if isinstance(mask, dict):
        mask = mask.get("content")
    if not mask:
        return None
    for token_id, info in (data.get("added_tokens_decoder") or {}).items():
        if info.get("content") == mask:
            return int(token_id)
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.is_file():
        tok = json.loads(tokenizer_json.read_text())
        for added in tok.get("added_tokens", []):
            if added.get("content") == mask:
                return int(added["id"])
        vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and mask in vocab:
            return int(vocab[mask])
    return None


def resolve_mask_token(policy: str, source: HFSource) -> tuple[int, bool, str]:
    """(mask id, whether a row is appended, how it was chosen) for mask_token=append|auto|<id>."""
    v = source.arch.vocab_size
    if policy == "append":
        return v, True, f"appended row {v} (mean of the {v} source rows)"
    if policy == "auto":
        found = tokenizer_mask_id(source.path)
        if found is not None and found < v:
            return found, False, f"the tokenizer's mask token (id {found})"
        return (
            v,
            True,
            f"appended row {v} (mean of the {v} source rows; the tokenizer declares no mask token)",
        )
    try:
        token_id = int(policy)
    except ValueError:
        raise ConvertError(f"mask_token={policy!r}: use append, auto or a token id") from None
    if not 0 <= token_id < v:
        raise ConvertError(f"mask_token={token_id} is outside the source vocabulary [0, {v})")
    return token_id, False, f"given id {token_id}"


# -- writing ---------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertError(f"max_shard_size={text!r}: expected e.g. 2GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def plan_shards(specs: dict[str, tuple], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_bytes` (a bigger tensor gets its own)."""
    size = torch.tensor([], dtype=dtype).element_size()
    files, current, used = [], [], 0
    for name, shape in specs.items():
        nbytes = math.prod(shape) * size
        if current and used + nbytes > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        files.append(current)
    return files


class SafetensorsWriter:
    """Writes tensors, in the announced order, into safetensors files of bounded size,
    holding one tensor at a time: each file's header is computed from the shapes up front."""

    def __init__(self, out_dir: Path, specs: dict[str, tuple], dtype: torch.dtype, max_bytes: int):
        self.out_dir, self.specs, self.dtype = Path(out_dir), specs, dtype
        groups = plan_shards(specs, dtype, max_bytes)
        n = len(groups)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = list(zip(names, groups, strict=True))
        self.order = [(f, t) for f, group in self.files for t in group]
        self._pos, self._handle, self._file = 0, None, None
        self.bytes_written = 0

    def _open(self, name: str, group: list[str]) -> None:
        size = torch.tensor([], dtype=self.dtype).element_size()
        header, offset = {}, 0
        for t in group:
            nbytes = math.prod(self.specs[t]) * size
            header[t] = {"dtype": DTYPE_NAMES[self.dtype], "shape": list(self.specs[t])}
            header[t]["data_offsets"] = [offset, offset + nbytes]
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._handle = open(self.out_dir / name, "wb")
        self._handle.write(struct.pack("<Q", len(text)) + text)
        self._file = name
        self.bytes_written += 8 + len(text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file, expected = self.order[self._pos]
        if name != expected:
            raise RuntimeError(f"export order: got {name}, expected {expected}")
        if tuple(tensor.shape) != tuple(self.specs[name]):
            raise RuntimeError(f"export: {name} has shape {list(tensor.shape)}, expected {self.specs[name]}")
        if file != self._file:
            self._close_current()
            self._open(file, dict(self.files)[file])
        data = tensor.detach().to(self.dtype).contiguous().view(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self.bytes_written += data.nbytes
        self._pos += 1

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        """Finish the last file and write the index (sharded output only)."""
        if self._pos != len(self.order):
            raise RuntimeError(f"export: {len(self.order) - self._pos} tensors were never written")
        self._close_current()
        if len(self.files) > 1:
            size = torch.tensor([], dtype=self.dtype).element_size()
            total = sum(math.prod(s) * size for s in self.specs.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t: f for f, group in self.files for t in group},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_tensors(out_dir: Path, specs: dict[str, tuple], dtype, max_bytes: int, tensors: Iterable) -> int:
    writer = SafetensorsWriter(out_dir, specs, dtype, max_bytes)
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.close()
    return writer.bytes_written


def iter_tokenizer_files(path: Path) -> Iterator[Path]:
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            yield path / name
    yield from sorted(path.glob("*.tiktoken"))
