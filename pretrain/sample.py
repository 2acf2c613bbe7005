"""`dlm sample`: generate with an exported masked diffusion LM (LLaDA's sampler).

The sampler of LLaDA's reference `generate.py` (github.com/ML-GSAI/LLaDA, generate.py:
`get_num_transfer_tokens`, `add_gumbel_noise`, `generate`), run on a plain transformers
model such as the ones `dlm export-hf` writes:

- the answer (`gen_length` tokens) starts fully masked after the prompt and is decoded in
  `gen_length / block_length` blocks, left to right ("semi-autoregressive"); each block
  gets `steps / num_blocks` denoising steps;
- at each step the denoiser predicts every position at once; a prediction is the argmax
  of the logits (temperature 0) or of the logits with Gumbel noise (Gumbel-max sampling
  at `temperature`, in float64 as LLaDA does); then the `k` masked positions of the
  current block with the highest confidence are unmasked (`remasking=low_confidence`,
  confidence = softmax probability of the predicted token) or `k` random ones
  (`remasking=random`), the others stay masked. `k` per step follows LLaDA's
  `get_num_transfer_tokens`: the block's masked tokens spread evenly over the steps,
  the first `masked % steps` steps taking one more.

The model runs as a bidirectional denoiser whatever its class: every forward call gets
an explicit 4D attention mask that lets every position attend to every position (an
additive mask of zeros, shape (batch, 1, L, L)). transformers 5 passes a 4D mask through
unchanged (`masking_utils._preprocess_mask_arguments` returns it as-is; SDPA then gets
it as `attn_mask` with `is_causal=False`, eager attention adds it to the scores). This
makes a causal-by-default `LlamaForCausalLM`/`Qwen2ForCausalLM`/`MistralForCausalLM`
(`dlm export-hf format=source`) a denoiser, and is a no-op for the default export,
`GemmaForCausalLM` with `use_bidirectional_attention=True`. It also overrides sliding
windows. Flash/flex attention take no such mask: `load` uses SDPA.

`logit_shift` models (DiffuLLaMA/Dream style, from AR checkpoints): the logits at
position i predict token i+1, so the prediction for position j is read from logits[j-1]
(a shifted model needs a non-empty prompt). The mask token id and the shift default to
the `dlm` block of the exported config.json (`model.config.dlm`).

Differences from LLaDA's generate.py: only the current block's masked positions can be
unmasked (LLaDA would also fill mask tokens typed in the prompt, taking slots the block
needs); the mask token and ids beyond the tokenizer's vocabulary (padding rows of the
output layer) are never predicted; no classifier-free guidance; batched prompts must
have equal lengths.

    from pretrain.sample import generate, load
    model, tokenizer = load("exports/stdlib")
    print(generate(model, tokenizer, "def parse(", gen_length=64, steps=64, block_length=32))

    dlm sample model=exports/stdlib prompt="'def parse('" gen_length=64 steps=64
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

REMASKING = ("low_confidence", "random")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
ATTENTION_WITH_4D_MASK = (None, "eager", "sdpa")


# ----------------------------------------------------------------------------- sampler


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.LongTensor:
    """Tokens to unmask at each of `steps` steps, per row of `mask_index` (B, block):
    the row's masked count spread evenly, the first `count % steps` steps taking one more
    (LLaDA generate.py `get_num_transfer_tokens`: with a linear schedule every step
    should unmask the same expected number of tokens). Returns (B, steps) int64."""
    count = mask_index.sum(dim=1, keepdim=True)
    base, remainder = count // steps, count % steps
    extra = torch.arange(steps, device=mask_index.device).unsqueeze(0) < remainder
    return (base + extra).to(torch.int64)


def check_schedule(gen_length: int, steps: int, block_length: int) -> int:
    """Validate the sampling schedule (messages name the argument/config key); returns
    the number of steps per block."""
    for key, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if value <= 0:
            raise ValueError(f"{key}={value} must be positive")
    if gen_length % block_length:
        raise ValueError(f"block_length={block_length} does not divide gen_length={gen_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps={steps} is not a multiple of the number of blocks gen_length/block_length={num_blocks}"
        )
    if steps > gen_length:
        raise ValueError(f"steps={steps} exceeds gen_length={gen_length}: a step unmasks at least one token")
    return steps // num_blocks


def full_attention_mask(batch: int, length: int, *, dtype: torch.dtype, device) -> torch.Tensor:
    """A 4D additive attention mask (batch, 1, length, length) of zeros: every query
    attends to every key. transformers uses a 4D mask as given (no causal mask added)."""
    return torch.zeros(batch, 1, length, length, dtype=dtype, device=device)


def _device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    first = next(params, None)
    device = getattr(model, "device", None) or (first.device if first is not None else torch.device("cpu"))
    dtype = getattr(model, "dtype", None) or (first.dtype if first is not None else torch.float32)
    if not dtype.is_floating_point:
        dtype = torch.float32
    return torch.device(device), dtype


def denoiser_logits(model, x: torch.Tensor, *, logit_shift: bool = False) -> torch.Tensor:
    """Logits (B, L, V) of `model` on `x` under full bidirectional attention, aligned so
    that [:, j] is the prediction for position j (with `logit_shift`, logits[j-1]; row 0
    is then a copy of row 0, which predicts nothing: position 0 must be a prompt token)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in ATTENTION_WITH_4D_MASK:
        raise ValueError(
            f"attention implementation {impl!r} cannot take the full 4D attention mask the denoiser "
            "needs: load the model with attn_implementation='sdpa' (or 'eager')"
        )
    _, dtype = _device_and_dtype(model)
    mask = full_attention_mask(x.shape[0], x.shape[1], dtype=dtype, device=x.device)
    logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
    if logit_shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


class LiveDenoiser:
    """A model being trained as this sampler's denoiser: `forward_logits(ids [b, s]) ->
    [b, s, V]` full-vocabulary logits (the engine's, under any TP/PP layout, the same on
    every rank, so that every rank takes the same sampling steps)."""

    def __init__(self, forward_logits, device: torch.device):
        self.forward_logits = forward_logits
        self.device, self.dtype = torch.device(device), torch.float32
        self.config = type("LiveConfig", (), {"_attn_implementation": None})()

    def __call__(self, input_ids: torch.Tensor, attention_mask=None, use_cache: bool = False):
        return type("Output", (), {"logits": self.forward_logits(input_ids)})()


def _dlm_config(model) -> dict:
    dlm = getattr(getattr(model, "config", None), "dlm", None)
    return dlm if isinstance(dlm, dict) else {}


def resolve_mask_token_id(model, tokenizer=None, mask_token_id: int | None = None) -> int:
    """The mask id: `mask_token_id` if given, else model.config.dlm["mask_token_id"], else
    model.config.mask_token_id, else the tokenizer's mask token."""
    candidates = (
        mask_token_id,
        _dlm_config(model).get("mask_token_id"),
        getattr(getattr(model, "config", None), "mask_token_id", None),
        getattr(tokenizer, "mask_token_id", None),
        getattr(tokenizer, "mask_id", None),  # dlm's own tokenizers (data/tokenizer.py, data/corpus.py)
    )
    for value in candidates:
        if value is not None:
            return int(value)
    raise ValueError(
        "no mask token id known: the model config has no dlm.mask_token_id or mask_token_id and the "
        "tokenizer no mask token; pass mask_token_id=..."
    )


def resolve_logit_shift(model, logit_shift: bool | None = None) -> bool:
    """`logit_shift` if given, else model.config.dlm["logit_shift"], else False."""
    if logit_shift is not None:
        return bool(logit_shift)
    return bool(_dlm_config(model).get("logit_shift", False))


def _predictable(logits: torch.Tensor, mask_id: int, vocab_size: int | None) -> torch.Tensor:
    """`logits` (a copy) with -inf at the ids never predicted: the mask token, and ids
    from `vocab_size` on (padding rows of the output layer the tokenizer cannot decode)."""
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[mask_id : mask_id + 1] = True
    if vocab_size is not None:
        banned[vocab_size:] = True
    return logits.masked_fill(banned, -torch.inf)


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """argmax of LLaDA's `add_gumbel_noise`: exp(logits) / (-log u)**temperature in float64,
    computed in log space (logits - temperature * log(-log u): the same argmax for the
    same u, without exp overflow). Gumbel-max: a sample of softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits.to(torch.float64) - temperature * torch.log(-torch.log(u))).argmax(dim=-1)


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids,
    *,
    gen_length: int = 64,
    steps: int = 64,
    block_length: int = 32,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_token_id: int | None = None,
    logit_shift: bool | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
) -> torch.LongTensor:
    """LLaDA's sampler (see the module doc) on token ids.

    `prompt_ids`: a sequence of ids or a (P,) / (B, P) tensor. Returns (B, P + gen_length)
    int64 on the model's device: the prompt unchanged, then the generated tokens (no mask
    token left). `mask_token_id` / `logit_shift` default to the model config's `dlm`
    values; `vocab_size` restricts predictions to ids below it (padded output layers);
    `seed` drives the Gumbel noise (temperature > 0) and `remasking=random`, through a
    private generator (the global RNG is untouched). With temperature 0 and
    low_confidence remasking the result does not depend on `seed`."""
    steps_per_block = check_schedule(gen_length, steps, block_length)
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r} is not one of {REMASKING}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    mask_id = resolve_mask_token_id(model, None, mask_token_id)
    shift = resolve_logit_shift(model, logit_shift)
    device, _ = _device_and_dtype(model)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if prompt.ndim == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.ndim != 2:
        raise ValueError(f"prompt ids must be 1D or 2D, got shape {tuple(prompt.shape)}")
    batch, prompt_len = prompt.shape
    if shift and prompt_len == 0:
        raise ValueError("logit_shift=True needs a non-empty prompt (position 0 has no preceding logits)")
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_len, int) and prompt_len + gen_length > max_len:
        warnings.warn(
            f"prompt ({prompt_len} tokens) + gen_length={gen_length} exceeds the model's "
            f"max_position_embeddings={max_len}",
            stacklevel=2,
        )
    generator = torch.Generator(device=device).manual_seed(seed)

    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt
    positions = torch.arange(x.shape[1], device=device)
    for block in range(gen_length // block_length):
        start = prompt_len + block * block_length
        in_block = (positions >= start) & (positions < start + block_length)
        schedule = get_num_transfer_tokens(x[:, start : start + block_length] == mask_id, steps_per_block)
        for step in range(steps_per_block):
            logits = _predictable(denoiser_logits(model, x, logit_shift=shift), mask_id, vocab_size)
            x0 = _gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                probs = torch.softmax(logits.to(torch.float64), dim=-1)
                confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                confidence = torch.rand(x0.shape, generator=generator, device=device, dtype=torch.float64)
            candidates = (x == mask_id) & in_block
            confidence = torch.where(candidates, confidence, -torch.inf)
            transfer = torch.zeros_like(candidates)
            for row in range(batch):
                picked = torch.topk(confidence[row], k=int(schedule[row, step])).indices
                transfer[row, picked] = True
            x[transfer] = x0[transfer]
    return x


# ----------------------------------------------------------------------------- text API


def _is_hf_tokenizer(tokenizer) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase)


def tokenizer_vocab_size(tokenizer) -> int | None:
    """Ids the tokenizer can decode: len() of an HF tokenizer, `vocab_size` of dlm's."""
    if tokenizer is None:
        return None
    if _is_hf_tokenizer(tokenizer):
        return len(tokenizer)
    size = getattr(tokenizer, "vocab_size", None)
    return int(size) if size is not None else None


def generate(
    model,
    tokenizer,
    prompt,
    *,
    gen_length: int = 64,
    steps: int = 64,
    block_length: int = 32,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_token_id: int | None = None,
    logit_shift: bool | None = None,
    seed: int = 0,
) -> str | list[int]:
    """Complete `prompt` with LLaDA's sampler; returns the completion (not the prompt).

    `tokenizer`: a Hugging Face tokenizer (the prompt is encoded with its default special
    tokens, the completion decoded without special tokens), an object with
    `encode(text)`/`decode(ids)` (dlm's `ByteTokenizer`, `Tokenizer`), or None: then
    `prompt` is a sequence of ids and the generated ids are returned as a list.
    The mask id defaults to the model config's, then the tokenizer's mask token.
    Other arguments: `generate_ids`."""
    ids = encode_prompt(tokenizer, prompt)
    out = generate_ids(
        model,
        ids,
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        temperature=temperature,
        remasking=remasking,
        mask_token_id=resolve_mask_token_id(model, tokenizer, mask_token_id),
        logit_shift=logit_shift,
        seed=seed,
        vocab_size=tokenizer_vocab_size(tokenizer),
    )
    return decode_completion(tokenizer, out[0, len(ids) :].tolist())


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids: an HF tokenizer's `input_ids` (its default special tokens, e.g. BOS),
    `tokenizer.encode(prompt)` for dlm's tokenizers, or `prompt` itself without tokenizer."""
    if tokenizer is None:
        return [int(i) for i in prompt]
    if _is_hf_tokenizer(tokenizer):
        return [int(i) for i in tokenizer(prompt).input_ids]
    return [int(i) for i in tokenizer.encode(prompt)]


def decode_completion(tokenizer, ids: list[int]) -> str | list[int]:
    """Text of generated ids (special tokens dropped by HF tokenizers); the ids without tokenizer."""
    if tokenizer is None:
        return ids
    if _is_hf_tokenizer(tokenizer):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids)


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: Any = "auto"):
    """(model, tokenizer) from a Hugging Face model directory (`dlm export-hf` output):
    `AutoModelForCausalLM` (no remote code, SDPA attention, eval mode, on `device`) and
    `AutoTokenizer` when tokenizer files are present, else None (byte-level models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False, local_files_only=True
    )
    model.to(device).eval()
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    return model, tokenizer


# ----------------------------------------------------------------------------- command


@dataclass
class SampleConfig:
    model: str = MISSING  # Hugging Face model directory (`dlm export-hf` output); mandatory
    prompt: str = ""  # the text to continue (or prompt_file)
    prompt_file: str | None = None  # read the prompt from this file instead
    gen_length: int = 64  # tokens to generate; a multiple of block_length
    steps: int = 64  # denoising steps in all: <= gen_length, a multiple of the number of blocks
    block_length: int = 32  # tokens per block; blocks are decoded left to right
    temperature: float = 0.0  # Gumbel-max sampling temperature; 0: argmax
    remasking: str = "low_confidence"  # which masked tokens a step unmasks: low_confidence | random
    seed: int = 0  # seed of the Gumbel noise and of remasking=random
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    mask_token_id: int | None = None  # id of the MASK token; None: config.json's dlm.mask_token_id
    logit_shift: bool | None = None  # position i predicts token i+1; None: config.json's dlm.logit_shift


def register_sample_config() -> str:
    """Store conf/sample.yaml and its schema in Hydra's ConfigStore; return its name there."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from pretrain.config import CONF_DIR

    store = ConfigStore.instance()
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="sample_command", node=OmegaConf.load(CONF_DIR / "sample.yaml"))
    return "sample_command"


def load_sample_config(overrides: list[str] | None = None) -> SampleConfig:
    """Compose conf/sample.yaml (schema SampleConfig) with command-line overrides and
    validate everything that can be checked before loading the model. Raises ConfigError
    (or Hydra/OmegaConf errors) naming the key.

    conf/sample.yaml is composed through Hydra's ConfigStore, not from the conf/ directory
    as the other commands are: conf/ has a `model/` config group, so there `model=DIR`
    would be read as a choice of that group instead of this command's `model` key."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from parallel.topology import ConfigError

    GlobalHydra.instance().clear()
    with initialize(config_path=None, version_base="1.3"):
        node = compose(config_name=register_sample_config(), overrides=list(overrides or []))
    cfg: SampleConfig = OmegaConf.to_object(node)  # MissingMandatoryValue names 'model'
    try:
        check_schedule(cfg.gen_length, cfg.steps, cfg.block_length)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.remasking not in REMASKING:
        raise ConfigError(f"remasking={cfg.remasking!r} is not one of {REMASKING}")
    if cfg.temperature < 0:
        raise ConfigError(f"temperature={cfg.temperature} must be >= 0")
    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise ConfigError(f"model={cfg.model}: directory does not exist")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model={cfg.model}: no config.json (expected a `dlm export-hf` directory)")
    if cfg.prompt_file is not None:
        if cfg.prompt:
            raise ConfigError("prompt and prompt_file are both set: give one")
        if not Path(cfg.prompt_file).is_file():
            raise ConfigError(f"prompt_file={cfg.prompt_file}: file does not exist")
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError as e:
            raise ConfigError(f"device={cfg.device!r}: {e}") from None
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        if device.type != "cpu" and (accelerator is None or accelerator.type != device.type):
            raise ConfigError(f"device={cfg.device!r} but this machine has {accelerator or 'no accelerator'}")
    return cfg


def _byte_tokenizer_for(model, cfg: SampleConfig):
    """The byte-level tokenizer for a model directory without tokenizer files, if the
    model is byte-level (its mask id is the byte tokenizer's); else ConfigError."""
    from data.corpus import ByteTokenizer
    from parallel.topology import ConfigError

    try:
        mask_id = resolve_mask_token_id(model, None, cfg.mask_token_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mask_id != ByteTokenizer.MASK:
        raise ConfigError(
            f"model={cfg.model}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) and the model is not "
            f"byte-level (mask_token_id={mask_id}, the byte tokenizer's is {ByteTokenizer.MASK})"
        )
    return ByteTokenizer()


def main(argv: list[str] | None = None) -> int:
    """`dlm sample key=value ...`: print the completion of `prompt`. Exit 2 on a bad
    configuration (naming the key), 1 when loading or sampling fails."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from parallel.topology import ConfigError, cause_line

    argv = list(sys.argv[1:] if argv is None else argv)

    def config_error(e: Exception) -> int:
        print(f"dlm sample: invalid configuration: {e}{cause_line(e)}", file=sys.stderr)
        return 2

    try:
        cfg = load_sample_config(argv)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        return config_error(e)
    accelerator = torch.accelerator.current_accelerator(check_available=True)  # None on a CPU machine
    device = str(accelerator or "cpu") if cfg.device == "auto" else cfg.device
    prompt = Path(cfg.prompt_file).read_text(encoding="utf-8") if cfg.prompt_file else cfg.prompt
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, tokenizer = load(cfg.model, device=device)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"dlm sample: cannot load {cfg.model}: {e}", file=sys.stderr)
        return 1
    try:
        if tokenizer is None:
            tokenizer = _byte_tokenizer_for(model, cfg)
        mask_token_id = resolve_mask_token_id(model, tokenizer, cfg.mask_token_id)
        if not encode_prompt(tokenizer, prompt) and resolve_logit_shift(model, cfg.logit_shift):
            raise ConfigError("prompt is empty but the model has logit_shift=true: it needs a prompt")
    except ConfigError as e:
        return config_error(e)
    except ValueError as e:
        return config_error(ConfigError(str(e)))
    try:
        text = generate(
            model,
            tokenizer,
            prompt,
            gen_length=cfg.gen_length,
            steps=cfg.steps,
            block_length=cfg.block_length,
            temperature=cfg.temperature,
            remasking=cfg.remasking,
            mask_token_id=mask_token_id,
            logit_shift=cfg.logit_shift,
            seed=cfg.seed,
        )
    except (ValueError, RuntimeError) as e:
        print(f"dlm sample: error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":  # python -m pretrain.sample: the `dlm sample` application
    from pretrain.cli import main as dlm

    sys.exit(dlm(["sample", *sys.argv[1:]]))
