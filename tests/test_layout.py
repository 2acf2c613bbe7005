"""Project rules that a grep can check."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pretrain", "data", "parallel")


def _sources(*dirs: str):
    for d in dirs:
        yield from sorted((REPO / d).rglob("*.py"))


def test_engines_are_imported_only_inside_parallel():
    pattern = re.compile(r"^\s*(from|import)\s+(megatron|deepspeed|transformer_engine)\b", re.M)
    offenders = [
        str(p.relative_to(REPO))
        for p in _sources("pretrain", "data", "bench")
        if pattern.search(p.read_text())
    ]
    assert not offenders, f"megatron/DeepSpeed/TE imported outside parallel/: {offenders}"


def test_no_cuda_literals_outside_the_cpu_shim():
    """With the CPU shim active, a 'cuda' device literal would be silently redirected on
    CPU and never exercised; devices come from the topology."""
    pattern = re.compile(r"""["']cuda["':]|\.cuda\(\)""")
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources(*CODE_DIRS)
        if p.name != "cpu.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
