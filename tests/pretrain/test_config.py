"""Config composition, validation and derived values (CPU, one process, no megatron).

Every preset under conf/ is discovered from the file system, so a new preset is
covered without touching this file. Expected values are computed here from the YAML
files and from first principles, not copied from the code under test.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import subprocess
import sys
import time

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from parallel.dims import count_parameters
from parallel.topology import ConfigError, Topology
from pretrain.config import CHOICES, CONF_DIR, derive, load_config, model_dims

GROUPS = ("model", "data", "parallel", "optim", "cluster")
BYTE_VOCAB = 260  # data.corpus.ByteTokenizer: 256 bytes + PAD, BOS, EOS, MASK


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _yaml(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), resolve=False)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    if isinstance(cfg, list) and cfg and dataclasses.is_dataclass(cfg[0]):  # e.g. data.sources
        return [{k: v for k, v in dataclasses.asdict(item).items() if v is not None} for item in cfg]
    return cfg


@functools.cache
def _composed(*overrides: str):
    return load_config(list(overrides))


def _cfg(overrides: tuple[str, ...] = (), **changes):
    """A composed config (cached) with fields then set directly: section__field=value.
    For derive(), which reads the dataclasses only; saves a Hydra composition per case."""
    cfg = copy.deepcopy(_composed(*overrides))
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _layer_params(m) -> int:
    """Llama-style block from its definition: Q, K, V, O projections (GQA: K and V have
    num_query_groups heads), optional QKV bias, SwiGLU MLP (gate, up, down), two RMSNorms;
    plus the final norm."""
    h, head_dim = m.hidden_size, m.hidden_size // m.num_attention_heads
    q = h * m.num_attention_heads * head_dim
    kv = 2 * h * m.num_query_groups * head_dim
    o = m.num_attention_heads * head_dim * h
    bias = (m.num_attention_heads + 2 * m.num_query_groups) * head_dim if m.qkv_bias else 0
    mlp = 3 * h * m.ffn_hidden_size
    norms = 2 * h
    return m.num_layers * (q + kv + o + bias + mlp + norms) + h


# -- every preset composes ----------------------------------------------------------------------
GROUP_OPTIONS = [(g, n) for g in GROUPS for n in _options(g) if (g, n) != ("model", "from_checkpoint")]
EXPERIMENTS = _options("experiment")


def test_discovery_finds_presets():
    for group in GROUPS:
        assert _options(group), f"no presets found in conf/{group}"
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    chosen = [e for e in root.defaults if not isinstance(e, str)]
    assert {g for e in chosen for g in e} >= set(GROUPS)
    for entry in chosen:
        for group, option in entry.items():
            if option is not None:
                assert option in _options(group), f"config.yaml default {group}={option} has no yaml"
    assert EXPERIMENTS


@pytest.mark.parametrize(("group", "name"), GROUP_OPTIONS, ids=[f"{g}={n}" for g, n in GROUP_OPTIONS])
def test_group_option_composes(group, name):
    needs = {("data", "stdlib_shards"): ["model=mini"]}  # its seq_len 128 > tiny's max_seq_len
    cfg = load_config([f"{group}={name}", *needs.get((group, name), [])])
    section = getattr(cfg, group)
    expected = _flatten(_yaml(group, name))
    assert expected, f"conf/{group}/{name}.yaml is empty"
    for key, value in expected.items():
        assert _get(section, key) == value, f"{group}.{key}: composed {_get(section, key)!r}, yaml {value!r}"
    if "name" in expected:
        assert section.name == name, f"conf/{group}/{name}.yaml: name should match the file name"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = load_config([f"experiment={name}"])
    spec = _yaml("experiment", name)
    defaults = spec.pop("defaults", [])
    body = _flatten(spec)
    for key, value in body.items():
        assert _get(cfg, key) == value, f"experiment={name}: {key}={_get(cfg, key)!r}, yaml {value!r}"
    for entry in defaults:
        if isinstance(entry, str):  # e.g. _self_
            continue
        for target, option in entry.items():
            group = target.removeprefix("override").strip().lstrip("/")
            for key, value in _flatten(_yaml(group, option)).items():
                if f"{group}.{key}" not in body:  # the experiment's own value wins
                    assert _get(cfg, f"{group}.{key}") == value, f"experiment={name}: {group}.{key}"


def test_every_allowed_choice_composes():
    # a few compositions cover every allowed value of every key
    for i in range(max(len(v) for v in CHOICES.values())):
        chosen = {key: values[i % len(values)] for key, values in CHOICES.items()}
        shards = chosen["data.source"] in ("shards", "megatron")
        extra = ["data.sources=[{path:/some/dataset,weight:1.0}]"] if shards else []
        cfg = load_config([f"{key}={value}" for key, value in chosen.items()] + extra)
        for key, value in chosen.items():
            assert _get(cfg, key) == value


# -- parameter counts of the big presets ------------------------------------------------------------
def _derive_for(model: str, vocab: int):
    cfg = load_config([f"model={model}"])
    return cfg, derive(cfg, 1, vocab_size=vocab, mask_id=vocab - 1)


def test_dense_100b_is_about_100b():
    cfg, d = _derive_for("dense_100b", 32000)
    assert 90e9 <= d.params["layers"] <= 110e9, d.params
    assert d.params["layers"] == _layer_params(cfg.model)
    assert d.params["total"] == d.params["layers"] + 2 * d.padded_vocab_size * cfg.model.hidden_size


def test_small_is_about_125m():
    cfg, d = _derive_for("small", 32000)
    assert 100e6 <= d.params["total"] <= 150e6, d.params
    assert d.params["layers"] == _layer_params(cfg.model)
    # tied embeddings: one vocab x hidden matrix
    assert d.params["total"] == d.params["layers"] + d.padded_vocab_size * cfg.model.hidden_size


def test_llama_8b_size():
    cfg, d = _derive_for("llama_8b", 128256)
    assert 6.5e9 <= d.params["total"] <= 8.5e9, d.params
    assert d.padded_vocab_size == 128256  # already a multiple of 128
    # Meta-Llama-3-8B's published parameter count (untied embeddings, vocab 128256)
    assert d.params["total"] == 8_030_261_248


# -- bad configs fail fast, naming the key ------------------------------------------------------------
def test_unknown_key_is_a_hydra_error():
    with pytest.raises(HydraException, match="tpp"):
        load_config(["parallel.tpp=2"])


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_wrong_choice_names_key(key):
    with pytest.raises(ConfigError) as e:
        load_config([f"{key}=definitely_not_a_choice"])
    assert key in str(e.value)
    assert "definitely_not_a_choice" in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["model=tiny", "model.num_attention_heads=5"], ["model.num_attention_heads", "model.hidden_size"]),
        (["model=tiny", "model.num_query_groups=3"], ["model.num_query_groups"]),
        (["model=tiny", "data.seq_len=128"], ["data.seq_len", "model.max_seq_len"]),
        (["train.steps=0"], ["train.steps"]),
        (["train.steps=-5"], ["train.steps"]),
        (["train.micro_batch_size=0"], ["train.micro_batch_size"]),
        (["model.hidden_size=0"], ["model.hidden_size"]),
        (["curriculum.t_min.values=[1.5]"], ["curriculum.t_min"]),
        (
            ["curriculum.t_min.values=[0.5]", "curriculum.t_max.values=[0.4]"],
            ["curriculum.t_min", "curriculum.t_max"],
        ),
        (["curriculum.t_max.interp=smooth"], ["curriculum.t_max.interp"]),
        (["curriculum.complementary=true", "train.micro_batch_size=3"], ["train.micro_batch_size"]),
        (["optim=adamw_wsd", "optim.decay_fraction=0"], ["optim.decay_fraction"]),
    ],
)
def test_invalid_values_name_keys(overrides, keys):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    for key in keys:
        assert key in str(e.value)


@pytest.mark.parametrize("fraction", ["1.0", "1.5"])
def test_eval_fraction_out_of_range_names_key(fraction):
    # BUG: data.eval_fraction is not validated. 1.0 leaves WindowDataset with 0 training
    # windows and the first train step dies with ZeroDivisionError (after the model is built).
    with pytest.raises(ConfigError, match=r"data\.eval_fraction"):
        load_config([f"data.eval_fraction={fraction}"])


def test_eval_every_without_held_out_data_names_key():
    # BUG: eval_every > 0 with eval_fraction=0 trains until the first evaluation, then
    # WindowDataset.eval_samples computes `indices % 0` -> RuntimeError: ZeroDivisionError.
    with pytest.raises(ConfigError, match=r"data\.eval_fraction"):
        load_config(["train.eval_every=10", "data.eval_fraction=0"])


# -- derive(): errors ---------------------------------------------------------------------------------
def test_derive_global_batch_not_multiple():
    cfg = load_config(["train.global_batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        derive(cfg, 1, vocab_size=BYTE_VOCAB, mask_id=259)
    # divisible by micro_batch alone, but not by micro_batch x dp
    cfg = load_config(["train.global_batch_size=8", "train.micro_batch_size=2"])
    derive(cfg, 1, vocab_size=BYTE_VOCAB, mask_id=259)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        derive(cfg, 8, vocab_size=BYTE_VOCAB, mask_id=259)


def test_derive_vocab_smaller_than_tokenizer():
    cfg = load_config(["model.vocab_size=200"])
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        derive(cfg, 1, vocab_size=BYTE_VOCAB, mask_id=259)


def test_derive_larger_model_vocab_is_used():
    cfg = load_config(["model.vocab_size=1000", "model.make_vocab_size_divisible_by=64"])
    d = derive(cfg, 1, vocab_size=BYTE_VOCAB, mask_id=259)
    assert d.vocab_size == 1000
    assert d.padded_vocab_size == 1024  # 16 x 64


@pytest.mark.parametrize(("world", "tp", "pp"), [(1, 3, 1), (4, 3, 1), (6, 2, 2), (8, 1, 3)])
def test_derive_tp_pp_not_dividing_world(world, tp, pp):
    cfg = load_config([f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.sequence_parallel=false"])
    with pytest.raises(ConfigError, match=r"parallel\.tp"):
        derive(cfg, world, vocab_size=BYTE_VOCAB, mask_id=259)


def test_topology_names_tp_and_heads():
    cfg = load_config(["model=tiny", "parallel.tp=3", "parallel.sequence_parallel=false"])
    d = derive(cfg, 6, vocab_size=BYTE_VOCAB, mask_id=259)  # world 6 is divisible by tp 3
    dims = model_dims(cfg, d.padded_vocab_size)
    with pytest.raises(ConfigError) as e:
        Topology.build(
            6,
            tp=cfg.parallel.tp,
            pp=cfg.parallel.pp,
            num_layers=dims.num_layers,
            num_attention_heads=dims.num_attention_heads,
            num_query_groups=dims.num_query_groups,
            ffn_hidden_size=dims.ffn_hidden_size,
            padded_vocab=dims.padded_vocab_size,
        )
    assert "parallel.tp" in str(e.value)
    assert "model.num_attention_heads" in str(e.value)


# -- derive(): values -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("world", "tp", "pp", "gbs", "mbs"),
    [
        (1, 1, 1, 8, 4),
        (2, 2, 1, 8, 4),
        (8, 2, 2, 32, 2),
        (16, 2, 4, 24, 3),
        (12, 3, 1, 16, 1),
        (64, 8, 8, 4, 4),
    ],
)
def test_derive_batch_arithmetic(world, tp, pp, gbs, mbs):
    cfg = _cfg(
        ("model=tiny",),
        parallel__tp=tp,
        parallel__pp=pp,
        train__global_batch_size=gbs,
        train__micro_batch_size=mbs,
    )
    d = derive(cfg, world, vocab_size=BYTE_VOCAB, mask_id=259)
    assert d.world_size == world
    assert d.dp * tp * pp == world
    assert d.samples_per_dp_rank * d.dp == gbs
    assert d.num_microbatches * mbs == d.samples_per_dp_rank
    assert d.num_microbatches >= 1
    assert d.tokens_per_step == gbs * cfg.data.seq_len
    assert d.mask_id == 259
    assert d.vocab_size == BYTE_VOCAB


@pytest.mark.parametrize("divisible_by", [1, 8, 64, 128, 200])
def test_derive_padded_vocab_independent_of_tp(divisible_by):
    padded = set()
    for tp in (1, 2, 4):
        cfg = _cfg(parallel__tp=tp, model__make_vocab_size_divisible_by=divisible_by)
        d = derive(cfg, tp, vocab_size=BYTE_VOCAB, mask_id=259)
        assert d.padded_vocab_size % divisible_by == 0
        assert BYTE_VOCAB <= d.padded_vocab_size < BYTE_VOCAB + divisible_by
        padded.add(d.padded_vocab_size)
    assert len(padded) == 1


@pytest.mark.parametrize("model", [m for m in _options("model") if m != "from_checkpoint"])
def test_derive_flops_per_token(model):
    cfg = load_config([f"model={model}"])
    d = derive(cfg, 1, vocab_size=32000, mask_id=0)
    m, seq = cfg.model, cfg.data.seq_len
    assert d.params["layers"] == _layer_params(m)
    assert d.flops_per_token == pytest.approx(
        6 * _layer_params(m) + 12 * m.num_layers * seq * m.hidden_size, rel=1e-12
    )
    assert d.flops_per_scored_token == pytest.approx(6 * m.hidden_size * d.padded_vocab_size, rel=1e-12)


def test_flops_grow_with_seq_len():
    # the attention term is quadratic in L over the full square, i.e. linear per token
    d1 = derive(_cfg(("model=small",), data__seq_len=1024), 1, vocab_size=32000, mask_id=0)
    d2 = derive(_cfg(("model=small",), data__seq_len=2048), 1, vocab_size=32000, mask_id=0)
    m = _cfg(("model=small",)).model
    assert d2.flops_per_token - d1.flops_per_token == pytest.approx(12 * m.num_layers * 1024 * m.hidden_size)


def test_derive_params_match_count_parameters():
    cfg = load_config(["model=tiny"])
    d = derive(cfg, 1, vocab_size=BYTE_VOCAB, mask_id=259)
    assert d.params == count_parameters(model_dims(cfg, d.padded_vocab_size))


# -- the CLI fails fast -----------------------------------------------------------------------------------
def _clean_env() -> dict:
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    env["WANDB_MODE"] = "disabled"
    return env


def test_cli_bad_config_fails_fast(tmp_path):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pretrain.train", "model=tiny", "parallel.tp=3", f"run.dir={run_dir}"],
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=90,  # a process group waiting for peers would hang for 30 minutes
        )
    except subprocess.TimeoutExpired:
        pytest.fail("pretrain.train with a bad config did not exit within 90 s")
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    assert "parallel.tp" in proc.stderr, proc.stderr[-2000:]
    assert "invalid configuration" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists(), "nothing should be written before the config is checked"
    assert elapsed < 90


# -- model=from_checkpoint ---------------------------------------------------------------------------
def _fake_checkpoint(root, **model) -> None:
    """A run dir whose latest checkpoint carries a config.yaml (what import-hf writes)."""
    from pretrain.config import to_yaml

    cfg = load_config(["model=small", *(f"model.{k}={v}" for k, v in model.items())])
    step = root / "checkpoints" / "step_0"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (step / "config.yaml").write_text(to_yaml(cfg))
    (root / "checkpoints" / "latest").write_text("step_0")


def test_model_from_checkpoint_adopts_the_saved_model_and_applies_model_overrides(tmp_path):
    _fake_checkpoint(tmp_path, name="imported", logit_shift=True, mask_token_id=7, qkv_bias=True)
    cfg = load_config(["model=from_checkpoint", f"checkpoint.init_from={tmp_path}", "model.recompute=full"])
    small = load_config(["model=small"]).model
    assert cfg.model.name == "imported"
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (small.hidden_size, small.num_layers)
    assert cfg.model.logit_shift and cfg.model.qkv_bias and cfg.model.mask_token_id == 7
    assert cfg.model.recompute == "full"  # the command line still wins
    derived = derive(cfg, 1, vocab_size=300, mask_id=4)
    assert derived.mask_id == 7  # model.mask_token_id wins over the tokenizer's


def test_model_from_checkpoint_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        load_config(["model=from_checkpoint"])
    with pytest.raises(ConfigError, match="no checkpoint there"):
        load_config(["model=from_checkpoint", f"checkpoint.init_from={tmp_path}"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_9")
    with pytest.raises(ConfigError, match="step_9"):
        load_config(["model=from_checkpoint", f"checkpoint.init_from={tmp_path}"])


def test_mask_token_id_outside_the_vocabulary_is_refused():
    cfg = load_config(["model.mask_token_id=400"])
    with pytest.raises(ConfigError, match="model.mask_token_id=400"):
        derive(cfg, 1, vocab_size=300, mask_id=4)


# -- sequence parallelism and overlapped communication (parallel.*) ---------------------------
def test_sequence_parallel_is_on_by_default_with_tensor_parallelism_on_the_megatron_engine():
    def resolved(*overrides: str, world: int = 2):
        cfg = load_config(["model=tiny", *overrides])
        return derive(cfg, world, vocab_size=BYTE_VOCAB, mask_id=259).parallel

    assert resolved("parallel.tp=2").sequence_parallel is True
    assert resolved().sequence_parallel is False  # tp=1: nothing to shard
    assert resolved("parallel.tp=2", "parallel.sequence_parallel=false").sequence_parallel is False
    assert resolved("parallel.tp=2", "parallel.engine=deepspeed").sequence_parallel is False
    # the overlapped all-gather needs the distributed optimizer's sharded weights
    assert resolved("parallel.distributed_optimizer=false").overlap_param_gather is False
    assert resolved().overlap_param_gather is True and resolved().overlap_grad_reduce is True


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            ["parallel.tp=2", "parallel.engine=deepspeed", "parallel.sequence_parallel=true"],
            "parallel.engine",
        ),
        (["parallel.tp=2", "data.seq_len=63"], "data.seq_len=63"),
        (["parallel.tp=2", "curriculum.random_length_prob.values=[0.1]"], "curriculum.length_multiple"),
        (["parallel.tp=2", "eval.samples=2", "eval.sample_length=31"], "eval.sample_prompt"),
        (["curriculum.random_length_prob.values=[0.1]", "curriculum.length_multiple=128"], "data.seq_len"),
        (["parallel.bucket_size=0"], "parallel.bucket_size"),
    ],
)
def test_layouts_that_cannot_shard_the_sequence_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(["model=tiny", *overrides])


def test_random_lengths_under_sequence_parallelism_with_a_matching_multiple_are_accepted():
    cfg = load_config(
        [
            "model=tiny",
            "parallel.tp=2",
            "curriculum.random_length_prob.values=[0.1]",
            "curriculum.length_multiple=8",
        ]
    )
    assert derive(cfg, 2, vocab_size=BYTE_VOCAB, mask_id=259).parallel.sequence_parallel


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.attention=document"], "model.attention=document"),
        (["curriculum.bidirectional_ratio.values=[0.5]"], "curriculum.bidirectional_ratio"),
        (["curriculum.block_size.values=[8]"], "curriculum.block_size"),
        (["parallel.engine=deepspeed"], "parallel.engine=deepspeed"),
        (["data.seq_len=62", "model.max_seq_len=64"], "data.seq_len=62"),
    ],
)
def test_context_parallelism_refuses_what_it_does_not_run_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(["model=tiny", "parallel.cp=2", *overrides])


def test_context_parallelism_divides_the_data_parallel_size():
    cfg = load_config(["model=tiny", "parallel.cp=2", "parallel.tp=2"])
    derived = derive(cfg, 8, vocab_size=BYTE_VOCAB, mask_id=259)
    assert derived.dp == 2 and derived.num_microbatches == 8 // (4 * 2)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["parallel.tp=1"], "parallel.tp > 1"),
        (["parallel.sequence_parallel=false"], "parallel.sequence_parallel"),
        (
            ["curriculum.random_length_prob.values=[0.1]", "curriculum.length_multiple=2"],
            "random_length_prob",
        ),
        (["eval.samples=2", "train.eval_every=10"], "eval.samples"),
    ],
)
def test_tp_comm_overlap_needs_sequence_parallelism_and_one_batch_shape(overrides, key):
    base = ["model=tiny", "parallel.tp=2", "parallel.tp_comm_overlap=true"]
    assert load_config(base).parallel.tp_comm_overlap
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config([*base, *overrides])


def test_tp_comm_overlap_without_transformer_engine_fails_before_start(monkeypatch):
    import parallel
    from pretrain.train import preflight

    monkeypatch.setattr(parallel, "HAVE_TE", False)  # this machine, or a GPU one without TE
    cfg = load_config(["model=tiny", "parallel.tp=2", "parallel.tp_comm_overlap=true"])
    with pytest.raises(ConfigError, match="needs GPUs with Transformer Engine"):
        preflight(cfg, world_size=2)
