"""Project rules that a grep can check."""

from __future__ import annotations

import ast
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


# The training step's own modules: every tensor they create must name its device (from
# an input's `.device` or the topology), else it lands on the CPU and fails on a GPU.
STEP_MODULES = (
    "pretrain/objective.py",
    "pretrain/train.py",
    "pretrain/curriculum.py",
    "pretrain/masks.py",
    "pretrain/likelihood.py",
)
FACTORIES = {
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "bernoulli", "scalar_tensor",
}  # fmt: skip


def factory_calls_without_device(source: str) -> list[int]:
    """Lines of `torch.<factory>(...)` calls without a `device=` keyword (the `*_like`
    factories follow their input and are fine)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        is_torch = isinstance(func.value, ast.Name) and func.value.id == "torch"
        if is_torch and func.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords):
            lines.append(node.lineno)
    return lines


def test_the_step_names_the_device_of_every_tensor_it_creates():
    offenders = [
        f"{name}:{line}"
        for name in STEP_MODULES
        if (REPO / name).exists()
        for line in factory_calls_without_device((REPO / name).read_text())
    ]
    assert not offenders, f"tensor factories without device= (a device mix on a GPU): {offenders}"


def test_the_factory_check_flags_a_device_less_factory():
    flagged = factory_calls_without_device(
        "import torch\na = torch.zeros(4)\nb = torch.zeros(4, device=x.device)\nc = torch.zeros_like(b)\n"
        "d = torch.tensor(3)\ne = torch.arange(2, device='cpu')\n"
    )
    assert flagged == [2, 5]
