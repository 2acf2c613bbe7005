"""Peak live tensor memory of a CPU run, measured: what `dlm plan`'s memory model predicts
for a GPU (the allocator's peak of live tensors), which CPU tools do not report.

`LiveTensorBytes` is a TorchDispatchMode: every tensor an operator returns has its
storage counted once, until the storage is freed (a weakref callback); `peak` is the
largest total seen. torch's own MemTracker (torch.distributed._tools.mem_tracker) does
the same with module attribution, but fails on megatron's DDP (its `buffers` attribute
is a list, mod_tracker calls `module.buffers()`).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive at once: `current`, and `peak` (with `peak_at`,
    the label set by `mark` when the peak was reached)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage data_ptr -> bytes
        self.current = self.peak = 0
        self.label = self.peak_at = ""
        self._refs: dict[int, weakref.ref] = {}

    def mark(self, label: str) -> None:
        self.label = label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._count(leaf.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.current += size
        if self.current > self.peak:
            self.peak, self.peak_at = self.current, self.label

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)
