"""The DeepSpeed engine's settings: presets, checks before start, the generated config."""

from __future__ import annotations

import pytest

from parallel.topology import ConfigError
from parallel.zero import DeepSpeedRun, ZeroConfig, check_checkpoint_engine, deepspeed_run
from pretrain.config import load_config

BATCH = dict(micro_batch_size=2, num_microbatches=3, dp=4, clip_grad=0.5, bf16=True)


def deepspeed_config(zero: ZeroConfig, **batch) -> dict:
    return DeepSpeedRun(zero, **batch).config()


def _config(*overrides: str):
    return load_config(["parallel.engine=deepspeed", *overrides])


@pytest.mark.parametrize(
    ("preset", "stage", "offload_optimizer", "offload_param"),
    [
        ("zero1", 1, "none", "none"),
        ("zero2", 2, "none", "none"),
        ("zero3", 3, "none", "none"),
        ("zero3_offload", 3, "cpu", "none"),
    ],
)
def test_presets_become_deepspeed_sections(preset, stage, offload_optimizer, offload_param):
    cfg = _config(f"zero={preset}")
    section = deepspeed_config(cfg.zero, **BATCH)["zero_optimization"]
    assert section["stage"] == stage
    assert section.get("offload_optimizer", {}).get("device", "none") == offload_optimizer
    assert section.get("offload_param", {}).get("device", "none") == offload_param
    assert ("stage3_param_persistence_threshold" in section) == (stage == 3)


def test_batch_clipping_and_precision_come_from_the_run_config():
    config = deepspeed_config(ZeroConfig(), **BATCH)
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert "optimizer" not in config and "scheduler" not in config


def test_extra_merges_nested_keys_last():
    zero = ZeroConfig(extra={"zero_optimization": {"round_robin_gradients": True}, "aio": {"queue_depth": 8}})
    config = deepspeed_config(zero, **BATCH)
    assert config["zero_optimization"]["round_robin_gradients"] is True
    assert config["zero_optimization"]["stage"] == 2  # kept
    assert config["aio"] == {"queue_depth": 8}


def test_infinity_preset_needs_an_nvme_path_and_then_offloads_both():
    with pytest.raises(ConfigError, match="zero.nvme_path"):
        _config("zero=infinity_nvme")
    cfg = _config("zero=infinity_nvme", "zero.nvme_path=/local/nvme")
    section = deepspeed_config(cfg.zero, **BATCH)["zero_optimization"]
    assert section["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/local/nvme"}
    assert section["offload_optimizer"]["device"] == "nvme"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["parallel.pp=2"], ["parallel.pp=2", "parallel.engine=deepspeed"]),
        (["zero.stage=4"], ["zero.stage=4"]),
        (["zero.offload_param=cpu"], ["zero.offload_param=cpu", "zero.stage=3"]),
        (["zero.offload_optimizer=disk"], ["zero.offload_optimizer='disk'"]),
        (["zero.optimizer=cpu_adam"], ["zero.optimizer=cpu_adam", "zero.offload_optimizer"]),
        (["+zero.extra.gradient_clipping=2.0"], ["zero.extra", "gradient_clipping"]),
        (["parallel.distributed_optimizer=false"], ["parallel.distributed_optimizer", "zero.stage"]),
    ],
)
def test_impossible_settings_fail_naming_the_keys(overrides, named):
    with pytest.raises(ConfigError) as error:
        _config(*overrides)
    for key in named:
        assert key in str(error.value)


def test_an_unknown_engine_is_refused():
    with pytest.raises(ConfigError, match="parallel.engine='fsdp'"):
        load_config(["parallel.engine=fsdp"])


def test_the_megatron_engine_ignores_the_zero_section():
    cfg = load_config(["zero.stage=3", "parallel.pp=2"])
    assert cfg.parallel.engine == "megatron"
    assert deepspeed_run(cfg.parallel.engine, cfg.zero, **BATCH) is None
    assert deepspeed_run("deepspeed", cfg.zero, **BATCH).zero.stage == 3


def test_checkpoints_are_matched_to_the_engine_that_can_resume_them():
    deepspeed = {"format": "deepspeed", "has_optimizer": True}
    megatron = {"format": "torch_dist", "has_optimizer": True}
    seed = {"has_optimizer": False}  # written before formats were recorded: torch_dist
    with pytest.raises(ConfigError, match="parallel.engine=deepspeed"):
        check_checkpoint_engine(deepspeed, "megatron", where="x", resuming=True)
    with pytest.raises(ConfigError, match="parallel.engine=megatron"):
        check_checkpoint_engine(megatron, "deepspeed", where="x", resuming=True)
    for state in (deepspeed, megatron, seed):  # weights only: either engine
        for engine in ("megatron", "deepspeed"):
            check_checkpoint_engine(state, engine, where="x", resuming=False)
    check_checkpoint_engine(seed, "deepspeed", where="x", resuming=True)
    check_checkpoint_engine(deepspeed, "deepspeed", where="x", resuming=True)


def test_a_deepspeed_checkpoint_resumes_within_its_zero_family():
    zero3 = {"format": "deepspeed", "has_optimizer": True, "zero_stage": 3}
    zero2 = {**zero3, "zero_stage": 2}
    with pytest.raises(ConfigError, match="zero.stage=3, resumed with zero.stage=1"):
        check_checkpoint_engine(zero3, "deepspeed", where="x", resuming=True, zero_stage=1)
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        check_checkpoint_engine(zero2, "deepspeed", where="x", resuming=True, zero_stage=3)
    check_checkpoint_engine(zero2, "deepspeed", where="x", resuming=True, zero_stage=1)  # universal
    check_checkpoint_engine(zero3, "deepspeed", where="x", resuming=False, zero_stage=1)  # weights
