"""Self-test of tests/slurm_cluster.py: a real slurmctld + slurmd on this machine."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tests.slurm_cluster import SlurmCluster, alive, marked_pids

pytestmark = pytest.mark.slow

ALL_REDUCE = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            f.write(f"{world} {t.item()}")
    dist.destroy_process_group()
    """
)


def test_srun_two_tasks(cluster):
    out = cluster.run("srun", "-n2", "hostname").stdout
    assert len(out.splitlines()) == 2, out


def test_sbatch_gloo_all_reduce(cluster):
    program = cluster.dir / "all_reduce.py"
    program.write_text(ALL_REDUCE)
    result = cluster.dir / "all_reduce.txt"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --output={cluster.dir}/all_reduce-%j.out
        export MASTER_ADDR=127.0.0.1 MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
        export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
        srun {sys.executable} {program} {result}
        """
    )
    job = cluster.sbatch(script)
    state = cluster.wait(job, timeout=240)
    log = (cluster.dir / f"all_reduce-{job}.out").read_text()
    assert state == "COMPLETED", f"{cluster.job_info(job)}\n{log}"
    assert cluster.job_info(job)["ExitCode"] == "0:0"
    assert result.read_text() == "2 3.0"


def test_close_leaves_no_process(cluster, tmp_path):
    # A second cluster beside the module's one: its own ports, munged and job ids.
    with SlurmCluster(tmp_path / "second") as second:
        assert second.auth == cluster.auth  # its long tmp_path reached through a short link
        assert second.run("srun", "-n1", "true").returncode == 0
        job = second.sbatch("#!/bin/bash\nsleep 300\n")
        second.wait(job, states=("RUNNING",), timeout=60)
        daemons = second.pids()
        started = second.leftovers()
        assert set(daemons.values()) <= set(started)
        assert len(started) > len(daemons)  # slurmstepd, bash, sleep
    assert {"slurmctld", "slurmd"} <= set(daemons)
    for pid in started:
        assert not alive(pid), f"pid {pid} outlived close()"
    assert marked_pids(str(second.dir)) == []
    # The module's cluster is untouched.
    assert cluster.run("srun", "-n1", "true").returncode == 0
