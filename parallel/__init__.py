"""Everything that touches megatron-core and DeepSpeed lives in this package.

pretrain/ uses only the names below. They are resolved lazily so that importing
`parallel.topology` (config validation) does not pay megatron-core's import time.
"""

from __future__ import annotations

import importlib
import warnings

import pretrain  # noqa: F401  (refuses `python -m parallel.<module>`: pretrain/__init__.py)

# megatron-core and torch announce at every import that optional GPU kernels (Apex,
# Transformer Engine) are absent and that some collectives were renamed. Silence exactly
# those; anything else still shows.
for _message in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
):
    warnings.filterwarnings("ignore", message=_message)

_EXPORTS = {
    "ConfigError": "parallel.topology",
    "LaunchEnv": "parallel.topology",
    "Topology": "parallel.topology",
    "PipelineLayout": "parallel.topology",
    "init_distributed": "parallel.topology",
    "shutdown_distributed": "parallel.topology",
    "any_rank": "parallel.topology",
    "padded_vocab_size": "parallel.topology",
    "ModelDims": "parallel.dims",
    "build_model": "parallel.model",
    "build_model_chunks": "parallel.model",
    "start_tp_comm_overlap": "parallel.model",
    "use_transformer_engine": "parallel.model",
    "HAVE_TE": "parallel.model",
    "Engine": "parallel.engine",
    "OptimConfig": "parallel.optim",
    "StepResult": "parallel.engine",
    "build_engine": "parallel.engine",
    "model_context": "parallel.engine",
    "deepspeed_run": "parallel.zero",
    "save_checkpoint": "parallel.checkpoint",
    "load_checkpoint": "parallel.checkpoint",
    "latest_checkpoint": "parallel.checkpoint",
    "prune_checkpoints": "parallel.checkpoint",
    "finish_checkpoints": "parallel.checkpoint",
    "start_writer_helpers": "parallel.checkpoint",
    "save_model_checkpoint": "parallel.checkpoint",
    "load_model_checkpoint": "parallel.checkpoint",
    "save_weights_copy": "parallel.checkpoint",
    "ensure_universal": "parallel.deepspeed_engine",
    "universal_weights": "parallel.deepspeed_engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
