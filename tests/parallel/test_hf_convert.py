"""`dlm import-hf` / `dlm export-hf` on tiny random Llama, Mistral and Qwen2 models (no downloads).

- import at TP=1, TP=2 and PP=2: the imported denoiser run causally reproduces the HF logits;
- export to Gemma (bidirectional): transformers' `model(ids).logits` equal the denoiser's
  bidirectional logits (QKV bias, tied embeddings, fp32 and bf16), under eager, sdpa and
  flex_attention, for a padded batch too, computed in bf16 too, and after save_pretrained;
  export format=source gives back the source weights bit for bit (mask row aside);
- config.json's bos/eos/pad ids come from the tokenizer of a shards run (or its dataset
  manifest) and are the byte ids of a byte-level run;
- a model trained 2 steps at TP=2, exported under torchrun at TP=2, loads with
  AutoModelForCausalLM and is bidirectional;
- bad sources fail with the file/key named and nothing written.
Each layout is one process launch; its assertions share it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.dist import QUIET, launch, spawn

VOCAB, SEQ = 300, 16
DIMS = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
# name -> (config class, extra config, max_shard_size or None for one file)
MODELS = {
    "llama": ("LlamaConfig", {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}, "200KB"),
    "mistral": ("MistralConfig", {"tie_word_embeddings": True, "sliding_window": None}, None),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}, "100KB"),
}
INPUT = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
ATOL = 1e-5
# A padded batch: row 0 is INPUT[0], row 1 is INPUT[1, :SHORT] followed by padding.
SHORT = 10
PADDED_MASK = (torch.arange(SEQ) < torch.tensor([[SEQ], [SHORT]])).long()
PADDED = INPUT.masked_fill(PADDED_MASK == 0, 0)
PATHS_MODEL = "llama"  # the export checked under every attention implementation, padded and in bf16


def _save_model(name: str, path: Path) -> Path:
    import transformers

    cls, extra, shard = MODELS[name]
    torch.manual_seed(sum(map(ord, name)))
    config = getattr(transformers, cls)(**DIMS, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1 so that the w - 1 of the Gemma export is exercised
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size=shard or "1GB")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_convert")


@pytest.fixture(scope="module")
def sources(root) -> dict[str, Path]:
    return {name: _save_model(name, root / "hf" / name) for name in MODELS}


def _hf_logits(path: Path, ids: torch.Tensor = INPUT) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# -- workers (run in fresh processes by tests.dist.spawn) --------------------------------------------
def _reset_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _our_logits(ckpt: str, tp: int, pp: int, causal: bool, ids: torch.Tensor):
    """The denoiser of checkpoint `ckpt` at this layout: logits [b, s, vocab] on rank 0."""
    import dataclasses

    import parallel
    from parallel.hf_convert import logits_on_rank0
    from pretrain.config import model_dims
    from pretrain.convert import load_checkpoint_config, resolve_checkpoint

    path = resolve_checkpoint(Path(ckpt))
    cfg = load_checkpoint_config(path)
    state = json.loads((path / "state.json").read_text())
    vocab = cfg.model.vocab_size or state["derived"]["vocab_size"]
    padded = parallel.padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by)
    dims = dataclasses.replace(model_dims(cfg, padded), causal=causal, spec="local")
    m = cfg.model
    layout = dict(
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        padded_vocab=padded,
    )
    topo = parallel.init_distributed(tp=tp, pp=pp, dp=1, seed=0, model_dims=layout)
    model = parallel.build_model(dims, topo, initialize=False)
    parallel.load_model_checkpoint(path, model)
    logits = logits_on_rank0(model, topo, ids, padded)
    _reset_model_parallel()
    return None if logits is None else logits[..., :vocab].clone()


def _convert(command: str, argv: list[str]) -> None:
    from pretrain import convert

    name, run = ("import_hf", convert.ImportRun) if command == "import" else ("export_hf", convert.ExportRun)
    cfg = convert._load(name, [*argv, "progress=false"])
    run.execute(cfg, run.prepare(cfg))
    _reset_model_parallel()


def _import_layout(sources: dict, out: str, tp: int, pp: int, exports: list) -> dict:
    """Import every source at tp x pp; causal logits of each; then the listed exports
    (name, format, dtype) and the bidirectional logits of those models."""
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}"]
    result = {"causal": {}, "bidirectional": {}}
    for name, src in sources.items():
        _convert("import", [f"source={src}", f"output={out}/{name}", "mask_token=append", *layout])
        result["causal"][name] = _our_logits(f"{out}/{name}", tp, pp, True, INPUT)
    for name, fmt, dtype in exports:
        argv = [f"checkpoint={out}/{name}", f"output={out}/export/{name}-{fmt}-{dtype}"]
        _convert("export", [*argv, f"format={fmt}", f"dtype={dtype}", "max_shard_size=100KB", *layout])
        if name not in result["bidirectional"]:
            result["bidirectional"][name] = _our_logits(f"{out}/{name}", tp, pp, False, INPUT)
        if name == PATHS_MODEL and "short" not in result:
            result["short"] = _our_logits(f"{out}/{name}", tp, pp, False, INPUT[1:, :SHORT])
    return result


def _trained_logits(run_dir: str, ids: torch.Tensor) -> torch.Tensor:
    return _our_logits(run_dir, 1, 1, False, ids)


# -- fixtures: one launch per layout -----------------------------------------------------------------
EXPORTS_TP1 = [
    ("llama", "bidirectional", "float32"),
    ("llama", "bidirectional", "bfloat16"),
    ("llama", "source", "float32"),
    ("llama", "source", "bfloat16"),
    ("mistral", "bidirectional", "float32"),
    ("qwen2", "bidirectional", "float32"),
    ("qwen2", "source", "float32"),
]
LAYOUTS = {
    "tp1": (1, 1, EXPORTS_TP1),
    "tp2": (2, 1, [("qwen2", "bidirectional", "float32")]),
    "pp2": (1, 2, []),
}


@pytest.fixture(scope="module")
def imported(root, sources) -> dict:
    srcs = {k: str(v) for k, v in sources.items()}
    out = {}
    for name, (tp, pp, exports) in LAYOUTS.items():
        out[name] = spawn(_import_layout, tp * pp, srcs, str(root / name), tp, pp, exports, timeout=600)[0]
    return out


@pytest.fixture(scope="module")
def reference_logits(sources) -> dict[str, torch.Tensor]:
    return {name: _hf_logits(path) for name, path in sources.items()}


# -- import -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_import_reproduces_causal_logits(layout, imported, reference_logits):
    for name, want in reference_logits.items():
        got = imported[layout]["causal"][name][..., :VOCAB]
        diff = (got - want).abs().max().item()
        assert diff < ATOL, f"{layout} {name}: max |ours - HF| = {diff}"


@pytest.mark.slow
def test_import_writes_a_train_checkpoint(root, imported, sources):
    ckpt = root / "tp2" / "qwen2" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_0"
    state = json.loads((ckpt / "step_0" / "state.json").read_text())
    assert state["step"] == 0 and state["consumed_samples"] == 0 and state["has_optimizer"] is False
    assert state["imported_from"]["architecture"] == "Qwen2ForCausalLM"
    assert state["imported_from"]["mask_token"] == {"policy": "append", "id": VOCAB, "appended": True}
    from pretrain.convert import load_checkpoint_config

    m = load_checkpoint_config(ckpt / "step_0").model
    assert (m.name, m.vocab_size, m.mask_token_id, m.logit_shift) == ("imported", VOCAB + 1, VOCAB, True)
    assert (m.hidden_size, m.num_layers, m.num_query_groups, m.ffn_hidden_size) == (64, 4, 2, 176)
    assert m.qkv_bias and not m.tie_embeddings and m.max_seq_len == 128
    llama = load_checkpoint_config(root / "tp1" / "llama" / "checkpoints" / "step_0").model
    assert llama.rope_base == 50000.0 and not llama.qkv_bias
    assert load_checkpoint_config(root / "pp2" / "mistral" / "checkpoints" / "step_0").model.tie_embeddings
    assert not list(root.glob("*/*.tmp"))


# -- export -------------------------------------------------------------------------------------------
def _export_dir(root: Path, name: str, fmt: str, dtype: str, layout: str = "tp1") -> Path:
    return root / layout / "export" / f"{name}-{fmt}-{dtype}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,layout", [("llama", "tp1"), ("mistral", "tp1"), ("qwen2", "tp1"), ("qwen2", "tp2")]
)
def test_gemma_export_gives_bidirectional_logits(root, imported, name, layout):
    """Untied (llama), tied (mistral), QKV bias with a zero o_proj bias (qwen2), exported at TP=2."""
    path = _export_dir(root, name, "bidirectional", "float32", layout)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["GemmaForCausalLM"] and config["use_bidirectional_attention"]
    assert (
        config["mask_token_id"] == VOCAB and config["dlm"]["bidirectional"] and config["dlm"]["logit_shift"]
    )
    got = _hf_logits(path)
    want = imported[layout]["bidirectional"][name]
    diff = (got - want).abs().max().item()
    assert diff < ATOL, f"{name}: max |gemma - ours| = {diff}"
    changed = INPUT.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    assert (_hf_logits(path, changed)[:, 0] - got[:, 0]).abs().max() > 1e-4, (
        "position 0 ignores the last token"
    )


@pytest.mark.slow
def test_bf16_gemma_export_error(root, imported):
    """bf16 rounding of w - 1 and of embed / sqrt(h), against bf16 rounding of the plain weights."""
    want = imported["tp1"]["bidirectional"]["llama"]
    gemma = _hf_logits(_export_dir(root, "llama", "bidirectional", "bfloat16"))
    source = _export_dir(root, "llama", "source", "bfloat16")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(INPUT, attention_mask=torch.ones(2, 1, SEQ, SEQ, dtype=torch.bool)).logits
    err_gemma, err_plain = (gemma - want).abs().max().item(), (plain - want).abs().max().item()
    print(f"bf16 export, max |logit error|: gemma layout {err_gemma:.2e}, llama layout {err_plain:.2e}")
    assert err_gemma < 2 * err_plain + 1e-3


def _load_hf(path: Path, attention: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).eval()


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


def _padded_errors(model, want: torch.Tensor, want_short: torch.Tensor) -> dict[str, float]:
    """Max |logit error| of `model` on the padded batch, under torch.no_grad: its full row
    against our logits, its padded row against ours on the same text alone."""
    with torch.no_grad():
        padded = model(PADDED, attention_mask=PADDED_MASK).logits
    return {
        "padded batch, full row": _max_error(padded[0], want[0]),
        "padded batch, padded row": _max_error(padded[1, :SHORT], want_short[0]),
    }


def _path_errors(model, want: torch.Tensor, want_short: torch.Tensor) -> dict[str, float]:
    """_padded_errors, and the max |logit error| with no attention mask at all."""
    with torch.no_grad():
        plain = model(INPUT).logits
    return {"no mask": _max_error(plain, want), **_padded_errors(model, want, want_short)}


def _causal_copy(path: Path, dest: Path) -> Path:
    """The export as it was before is_causal=False was written: use_bidirectional_attention only."""
    shutil.copytree(path, dest)
    config = json.loads((dest / "config.json").read_text())
    del config["is_causal"]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.slow
def test_gemma_export_is_bidirectional_on_every_attention_path(root, imported, tmp_path):
    """eager and sdpa, no mask and a padded batch, after save_pretrained too; flex_attention (it
    runs on CPU, each mask pattern costs a torch.compile) on the padded batch. The control
    (use_bidirectional_attention without is_causal: today's export) fails these checks."""
    path = _export_dir(root, PATHS_MODEL, "bidirectional", "float32")
    config = json.loads((path / "config.json").read_text())
    assert config["is_causal"] is False and config["use_bidirectional_attention"] is True
    want, want_short = imported["tp1"]["bidirectional"][PATHS_MODEL], imported["tp1"]["short"]
    errors = {a: _path_errors(_load_hf(path, a), want, want_short) for a in ("eager", "sdpa")}
    errors["flex_attention"] = _padded_errors(_load_hf(path, "flex_attention"), want, want_short)
    _load_hf(path, "eager").save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["is_causal"] is False
    errors["eager, resaved"] = _path_errors(_load_hf(tmp_path / "resaved", "eager"), want, want_short)
    print("max |HF - ours| per path:", json.dumps(errors, indent=1))
    assert max(e for path_errors in errors.values() for e in path_errors.values()) < ATOL, errors
    causal = _causal_copy(path, tmp_path / "causal")
    control = {a: _path_errors(_load_hf(causal, a), want, want_short) for a in ("eager", "sdpa")}
    print("without is_causal=False:", json.dumps(control, indent=1))
    assert min(control["eager"].values()) > 1e-3 and control["sdpa"]["padded batch, full row"] > 1e-3


@pytest.mark.slow
def test_bf16_gemma_export_is_bidirectional_in_bf16(root, imported, tmp_path):
    """Loaded and run in bf16 (eager and sdpa, no mask and padded): within the existing bf16
    bound (twice the error of plain Llama-layout bf16 weights run in bf16 with a full 4D mask,
    + 1e-3), a bound that the causal control exceeds."""
    want, want_short = imported["tp1"]["bidirectional"][PATHS_MODEL], imported["tp1"]["short"]
    source = _load_hf(_export_dir(root, PATHS_MODEL, "source", "bfloat16"), "sdpa", torch.bfloat16)
    with torch.no_grad():
        full = source(INPUT, attention_mask=torch.ones(2, 1, SEQ, SEQ, dtype=torch.bool)).logits
        alone = source(
            INPUT[1:, :SHORT], attention_mask=torch.ones(1, 1, SHORT, SHORT, dtype=torch.bool)
        ).logits
    bound = 2 * max(_max_error(full, want), _max_error(alone, want_short)) + 1e-3
    path = _export_dir(root, PATHS_MODEL, "bidirectional", "bfloat16")
    errors = {a: _path_errors(_load_hf(path, a, torch.bfloat16), want, want_short) for a in ("eager", "sdpa")}
    print(f"bf16 bound {bound:.2e}; max |HF - ours| per path:", json.dumps(errors, indent=1))
    assert max(e for path_errors in errors.values() for e in path_errors.values()) < bound, errors
    causal = _path_errors(
        _load_hf(_causal_copy(path, tmp_path / "causal"), "eager", torch.bfloat16), want, want_short
    )
    assert min(causal.values()) > bound, causal


@pytest.mark.slow
def test_source_export_round_trip_is_exact(root, imported, sources):
    from safetensors import safe_open

    for name in ("llama", "qwen2"):
        out = _export_dir(root, name, "source", "float32")
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == [f"{'Llama' if name == 'llama' else 'Qwen2'}ForCausalLM"]
        assert not config["dlm"]["bidirectional"] and config["vocab_size"] == VOCAB + 1
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        src_index = json.loads((sources[name] / "model.safetensors.index.json").read_text())["weight_map"]
        assert index.keys() == src_index.keys()
        for key, file in src_index.items():
            with safe_open(sources[name] / file, "pt") as f, safe_open(out / index[key], "pt") as g:
                a, b = f.get_tensor(key), g.get_tensor(key)
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                b = b[:VOCAB]
            assert torch.equal(a, b), f"{name}: {key} differs"
    # causal in transformers: the source export reproduces the source model's logits
    assert (
        _hf_logits(_export_dir(root, "qwen2", "source", "float32"))[..., :VOCAB]
        - _hf_logits(sources["qwen2"])
    ).abs().max() < ATOL


# -- a trained model, exported under torchrun at TP=2 --------------------------------------------------
TRAIN = [
    "model=tiny",
    "parallel.tp=2",
    "train.steps=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "data.max_bytes=100000",
    "optim.warmup_steps=1",
    *QUIET,
]


@pytest.mark.slow
def test_export_of_a_tp2_trained_run(root):
    run_dir, out = root / "trained", root / "trained-hf"
    launch(2, ["train", *TRAIN, f"run.dir={run_dir}"], module="pretrain.cli")
    proc = launch(
        2, ["export-hf", f"checkpoint={run_dir}", f"output={out}", "parallel.tp=2"], module="pretrain.cli"
    )
    assert "byte-level run: no tokenizer written" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert (
        config["dlm"]["mask_token_id"] == 259 and config["dlm"]["source_architecture"] == "LlamaForCausalLM"
    )
    assert config["dlm"]["step"] == 2 and not list(out.glob("tokenizer*"))
    from data.corpus import ByteTokenizer

    ids = [config[f"{name}_token_id"] for name in ("pad", "bos", "eos")]
    assert ids == [ByteTokenizer.PAD, ByteTokenizer.BOS, ByteTokenizer.EOS]
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    want = spawn(_trained_logits, 1, str(run_dir), ids, timeout=300)[0]
    got = _hf_logits(out, ids)
    assert (got - want).abs().max().item() < ATOL
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    assert (_hf_logits(out, changed)[:, 0] - got[:, 0]).abs().max() > 1e-5


@pytest.mark.slow
def test_imported_model_trains_exports_and_samples(root, imported):
    """The whole AR -> DLM path: an imported Llama (appended mask row, logit shift) trained
    with model=from_checkpoint, exported, and sampled with plain transformers."""
    from pretrain.sample import generate_ids, load

    imported_dir, run_dir, out = root / "tp1" / "llama", root / "from-import", root / "from-import-hf"
    overrides = [a for a in TRAIN if not a.startswith(("model=", "parallel."))]
    launch(
        1,
        [
            "train",
            *overrides,
            "model=from_checkpoint",
            f"checkpoint.init_from={imported_dir}",
            f"run.dir={run_dir}",
        ],
        module="pretrain.cli",
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    derived = json.loads((run_dir / "derived.json").read_text())
    assert derived["mask_id"] == VOCAB and derived["vocab_size"] == VOCAB + 1
    launch(1, ["export-hf", f"checkpoint={run_dir}", f"output={out}"], module="pretrain.cli")
    config = json.loads((out / "config.json").read_text())
    assert config["dlm"]["logit_shift"] and config["dlm"]["mask_token_id"] == VOCAB
    assert config["dlm"]["source_architecture"] == "LlamaForCausalLM"
    want = spawn(_trained_logits, 1, str(run_dir), INPUT, timeout=300)[0]
    assert (_hf_logits(out) - want).abs().max().item() < ATOL
    model, _ = load(out)
    ids = generate_ids(model, INPUT[0, :4], gen_length=8, steps=8, block_length=4, vocab_size=VOCAB)
    assert ids.shape == (1, 12) and torch.equal(ids[0, :4], INPUT[0, :4]) and not (ids == VOCAB).any()


# -- special token ids of a from-scratch shards run (export planning only: no weights, no processes) -----
@pytest.fixture(scope="module")
def shards_run_data(tmp_path_factory) -> tuple[Path, Path]:
    """`dlm tokenizer` (sentencepiece + HF files) on the stdlib json package, and a dataset
    prepared with a copy of its .model that has no HF files beside it."""
    import sysconfig

    from data.config import PrepareConfig, TokenizerConfig
    from data.prepare import run as prepare
    from data.tokenizer import run as train_tokenizer

    root = tmp_path_factory.mktemp("shards_run")
    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    model = train_tokenizer(TokenizerConfig(input=[corpus], output=str(root / "tok"), vocab_size=512))
    (root / "sp_only").mkdir()
    sp_only = shutil.copy(model, root / "sp_only" / model.name)
    prepare(
        PrepareConfig(
            input=[corpus], output=str(root / "shards"), tokenizer=str(sp_only), seq_len=64, progress=False
        )
    )
    return model, root / "shards"


def _planned_run(run_dir: Path, overrides: list[str], vocab: int) -> Path:
    """A run directory holding what export planning reads: checkpoints/latest, config.yaml, state.json."""
    from pretrain.config import load_config, to_yaml

    step = run_dir / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text(to_yaml(load_config(["model=tiny", *overrides])))
    (step / "state.json").write_text(json.dumps({"step": 1, "derived": {"vocab_size": vocab}}))
    (run_dir / "checkpoints" / "latest").write_text("step_1")
    return run_dir


def test_export_config_carries_the_special_ids_of_a_shards_run(shards_run_data, tmp_path):
    """From the exported tokenizer's HF files (data.tokenizer set), else from the dataset
    manifest (no HF files next to the manifest's tokenizer): the ids AutoTokenizer reports."""
    from transformers import AutoTokenizer

    from data.tokenizer import Tokenizer
    from pretrain.convert import FORMATS, ExportHFConfig, build_export_plan, build_hf_config

    model, dataset = shards_run_data
    auto = AutoTokenizer.from_pretrained(model.parent)
    want = {key: getattr(auto, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert None not in want.values()
    data = ["data.source=shards", f"data.sources=[{{path:{dataset},weight:1.0}}]"]
    for name, extra, tokenizer in (("hf", [f"data.tokenizer={model}"], True), ("manifest", [], False)):
        run_dir = _planned_run(tmp_path / name, [*data, *extra], Tokenizer(model).vocab_size)
        for fmt in FORMATS:
            cfg = ExportHFConfig(checkpoint=str(run_dir), output=str(tmp_path / f"{name}-out"), format=fmt)
            plan = build_export_plan(cfg)
            assert (plan.tokenizer is not None) == tokenizer, plan.tokenizer_note
            config = build_hf_config(cfg, plan)
            assert {key: config[key] for key in want} == want, (name, fmt)


# -- bad inputs: clear errors, nothing written (no process group is ever created) ----------------------
def _run_import(argv: list[str], capsys) -> tuple[int, str]:
    from pretrain.convert import import_main

    code = import_main([*argv, "progress=false"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> Path:
    return _save_model("llama", tmp_path_factory.mktemp("bad") / "llama")


def _bad_copy(small_source: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "src"
    shutil.copytree(small_source, dest)
    return dest


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def _shard(src: Path, i: int) -> Path:
    return sorted(src.glob("model-*.safetensors"))[i]


def _break_missing_shard(src: Path) -> str:
    path = _shard(src, 1)
    path.unlink()
    return f"names {path.name}, which is missing"


def _break_truncated(src: Path) -> str:
    path = _shard(src, 2)
    path.write_bytes(path.read_bytes()[:-100])
    return f"{path.name}: truncated safetensors file"


def _break_architecture(src: Path) -> str:
    _edit_config(src, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return "is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"


def _break_shape(src: Path) -> str:
    _edit_config(src, intermediate_size=200)
    return "mlp.gate_proj.weight has shape [176, 64], config.json implies [200, 64]"


def _break_rope(src: Path) -> str:
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    _edit_config(src, rope_parameters=rope)
    return "rope_type 'linear') is not supported"


def _break_dtype(src: Path) -> str:
    path = _shard(src, 0)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].replace(b'"F32"', b'"I32"', 1)
    path.write_bytes(data[:8] + header + data[8 + n :])
    return "has dtype I32; supported: F32, BF16, F16"


BREAKS = {
    "missing_shard": _break_missing_shard,
    "truncated": _break_truncated,
    "architecture": _break_architecture,
    "shape": _break_shape,
    "rope_scaling": _break_rope,
    "dtype": _break_dtype,
}


@pytest.mark.parametrize("what", list(BREAKS))
def test_bad_source_fails_clearly_and_writes_nothing(what, small_source, tmp_path, capsys):
    src = _bad_copy(small_source, tmp_path)
    expected = BREAKS[what](src)
    code, err = _run_import([f"source={src}", f"output={tmp_path / 'out'}"], capsys)
    assert code == 1 and expected in err, err
    _assert_nothing_written(tmp_path)


def test_import_refuses_layout_and_output_problems(small_source, tmp_path, capsys):
    code, err = _run_import([f"source={small_source}", f"output={tmp_path / 'out'}", "parallel.tp=2"], capsys)
    assert code == 2 and "must equal the number of processes (1)" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    code, err = _run_import([f"source={small_source}", f"output={tmp_path / 'out'}"], capsys)
    assert code == 1 and "is not empty (overwrite=true replaces it)" in err
    code, err = _run_import([f"source={small_source}", f"output={tmp_path / 'o2'}", "mask_token=999"], capsys)
    assert code == 1 and "mask_token=999 is outside the source vocabulary [0, 300)" in err
    code, err = _run_import([f"output={tmp_path / 'o3'}"], capsys)
    assert code == 2 and "source" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_export_refuses_bad_options(tmp_path, capsys):
    from pretrain.convert import export_main

    assert export_main([f"checkpoint={tmp_path}", f"output={tmp_path / 'o'}", "format=onnx"]) == 2
    assert "format='onnx' is not one of ('bidirectional', 'source')" in capsys.readouterr().err
    assert export_main([f"checkpoint={tmp_path}", f"output={tmp_path / 'o'}"]) == 2
    assert f"checkpoint={tmp_path}: no checkpoint there" in capsys.readouterr().err
