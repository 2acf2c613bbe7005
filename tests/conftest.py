import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process runs of the real trainer (CI runs them)")
    config.addinivalue_line(
        "markers", "gpu: needs CUDA (Transformer Engine, NCCL, bf16 kernels); not run on CPU machines"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skipif(True, reason="marked gpu: this machine has no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
