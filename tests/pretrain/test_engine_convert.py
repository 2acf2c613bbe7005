"""Moving weights between the engines' formats. The conversion itself (DeepSpeed ->
dist copy, read by the megatron engine and `dlm export-hf`) runs end to end in
tests/parallel/test_deepspeed_engine.py; here, what needs no process."""

from __future__ import annotations

import json

import pytest

from pretrain.engine_convert import DIST_COPY, checkpoint_format, dist_weights


def _checkpoint(path, **state):
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": 3, **state}))
    return path


def test_a_checkpoint_without_a_format_is_a_dist_checkpoint_and_needs_no_copy(tmp_path):
    old = _checkpoint(tmp_path / "step_3")  # written before the DeepSpeed engine existed
    assert checkpoint_format(old) == "torch_dist"
    assert dist_weights(old) == old
    assert not (old / DIST_COPY).exists()


def test_a_deepspeed_checkpoint_with_its_copy_made_is_not_converted_again(tmp_path):
    checkpoint = _checkpoint(tmp_path / "step_3", format="deepspeed")
    _checkpoint(checkpoint / DIST_COPY, format="torch_dist")
    assert dist_weights(checkpoint) == checkpoint / DIST_COPY


def test_a_failed_conversion_is_an_error_naming_the_checkpoint(tmp_path):
    checkpoint = _checkpoint(tmp_path / "step_3", format="deepspeed")  # no config.yaml, no files
    with pytest.raises(RuntimeError, match="step_3"):
        dist_weights(checkpoint)
    assert not (checkpoint / DIST_COPY).exists()
