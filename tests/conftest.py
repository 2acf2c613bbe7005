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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real Slurm cluster of one node for the tests of a module (tests/slurm_cluster.py; it
    skips, saying why, only when the packages cannot be installed), torn down after them:
    nothing it started is left running."""
    from tests.slurm_cluster import cluster_or_skip

    c = cluster_or_skip(tmp_path_factory.mktemp("slurm"))
    yield c
    c.close()
    assert c.leftovers() == []
