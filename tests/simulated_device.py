"""A device that is not the CPU, for CPU-only machines: catches the tensor-device mixes
that fail only on a GPU ("Expected all tensors to be on the same device").

Inside `simulated_device()`, tensors moved with `.to(DEVICE)` or created with
`device=DEVICE` report PyTorch's `meta` device, so code that follows its inputs
(`device=x.device`, `zeros_like`) keeps them there, while a tensor created without a
device lands on the CPU. Unlike real meta tensors these carry their values on the
CPU, so the data-dependent steps of the objective (selecting masked positions,
counting them, `.item()`) run and give the CPU results. Every op checks its tensor
arguments by CUDA's rules: a CPU tensor may join a device tensor only as a 0-dim
scalar of an element-wise op, or as an index; `cat`/`stack` take no CPU tensor.
Anything else raises as a GPU would.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
_COPYING_FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)  # copy outside the dispatcher
_INDEX_OPS = {"index.Tensor", "index_put.default", "index_put_.default", "_index_put_impl_.default"}


class OnDevice(torch.Tensor):
    """A tensor on the simulated device: reports DEVICE, holds `value` on the CPU."""

    @staticmethod
    def __new__(cls, value: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            value.shape,
            strides=value.stride(),
            dtype=value.dtype,
            device=DEVICE,
            requires_grad=value.requires_grad,
        )

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __repr__(self) -> str:
        return f"OnDevice({self.value!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("OnDevice tensors are used inside simulated_device() only")


def _cpu_tensors_that_mix(func, args, kwargs) -> list[torch.Tensor]:
    """CPU tensors in this call that CUDA would refuse next to a device tensor."""
    name = func._overloadpacket.__name__ + "." + func._overloadname
    if name in _INDEX_OPS:
        args = args[:1]  # index tensors may stay on the CPU
    mixed = []
    for arg in list(args) + list(kwargs.values()):
        inside_list = isinstance(arg, (list, tuple))
        for leaf in tree_flatten(arg)[0]:
            if type(leaf) is torch.Tensor and leaf.device.type == "cpu" and (inside_list or leaf.dim() > 0):
                mixed.append(leaf)
    return mixed


class _SimulatedDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = kwargs.get("device")
        if target == DEVICE:
            kwargs["device"] = torch.device("cpu")
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, OnDevice)]
        if inputs and (mixed := _cpu_tensors_that_mix(func, args, kwargs)):
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{DEVICE} and cpu! ({func}: CPU tensor of shape {tuple(mixed[0].shape)})"
            )
        result = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if target == DEVICE or (inputs and target is None):
            same = {id(x.value): x for x in inputs}  # in-place ops return their input itself
            return tree_map(lambda x: _on_device(x, same), result)
        return result  # created on, or moved to, the CPU


def _on_device(x, same: dict):
    if not isinstance(x, torch.Tensor):
        return x
    return same[id(x)] if id(x) in same else OnDevice(x)


def _unwrap(x):
    return x.value if isinstance(x, OnDevice) else x


class _CopyingFactories(TorchFunctionMode):
    """torch.tensor(data, device=DEVICE) copies its data without passing the dispatcher:
    build it on the CPU, then move it (which the dispatch mode sees)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in _COPYING_FACTORIES and device is not None and torch.device(device) == DEVICE:
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated_device():
    with _SimulatedDevice(), _CopyingFactories():
        yield DEVICE


def values(x):
    """The CPU values of a (nested) result, for comparison with a CPU run."""
    return tree_map(_unwrap, x)
