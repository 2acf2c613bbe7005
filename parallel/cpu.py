"""CPU shims for megatron-core 0.16.1, applied only when CUDA is absent.

megatron-core is written for GPUs: it allocates with ``device="cuda"`` or
``torch.cuda.current_device()``, keeps its tensor-parallel RNG streams in CUDA
generators and checks ``tensor.type() == "torch.cuda.FloatTensor"``. On a
machine without CUDA (CI, laptops) those lines fail. Every patch below names
the library line it replaces. Nothing here changes behaviour on a GPU: `apply()`
returns immediately when ``torch.cuda.is_available()``.

This is the only module of dlm-pretrain that may mention CUDA device strings.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Install every shim once per process. Returns True when shims are active."""
    global _APPLIED
    if not needed():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        _patch_torch_cuda()
        _patch_rng_tracker()
        _patch_context_parallel_attention()
        _CudaToCpuMode().__enter__()  # process-wide; never exited
        _APPLIED = True
    return True


# ---------------------------------------------------------------------------------------
# 1. torch.cuda entry points megatron calls unconditionally.
# ---------------------------------------------------------------------------------------
def _patch_torch_cuda() -> None:
    # megatron-core allocates with `device=torch.cuda.current_device()` in ~40 places, e.g.
    # core/utils.py:631 (GlobalMemoryBuffer), tensor_parallel/mappings.py:91,
    # pipeline_parallel/p2p_communication.py:190-202, optimizer/distrib_optimizer.py:791,
    # and moves RoPE frequencies at models/common/embeddings/rotary_pos_embedding.py:162.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # pipeline_parallel/p2p_communication.py:242 and :398 call torch.cuda.synchronize()
    # after batch_isend_irecv; gloo ops are complete once wait() returns.
    torch.cuda.synchronize = lambda device=None: None


# ---------------------------------------------------------------------------------------
# 2. The tensor-parallel RNG tracker (tensor_parallel/random.py).
# ---------------------------------------------------------------------------------------
def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device="cpu", clone=False, graph_safe=False):
        # replaces random.py:41 _get_cuda_rng_state -> torch.cuda.random.get_rng_state()
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        # replaces random.py:72 _set_cuda_rng_state -> torch.cuda.default_generators[i].set_state
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Forks the CPU default generator instead of the CUDA one."""

        def add(self, name, seed):
            # replaces random.py:235-240 (torch.cuda.get_rng_state / torch.cuda.manual_seed)
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # replaces random.py:250-277, which also warns whenever the CPU state changes
            # inside the fork -- here the CPU generator *is* the forked state.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    # initialize_rng_tracker (random.py:330) instantiates the module-global class.
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random.initialize_rng_tracker(force_reset=True)


# ---------------------------------------------------------------------------------------
# 2b. Context-parallel attention, which only Transformer Engine implements (GPU kernels).
# ---------------------------------------------------------------------------------------
def _patch_context_parallel_attention() -> None:
    """megatron's local DotProductAttention refuses context parallelism
    (transformer/dot_product_attention.py:57, "Context parallelism is only supported by
    TEDotProductAttention!"); TE's CP attention needs CUDA. On CPU: each rank all-gathers the
    keys and values of the whole sequence over the context-parallel group (backward: their
    gradients reduce-scattered back) and attends to all of them -- exact for the
    bidirectional attention without mask tensors that parallel.cp runs (a softmax over all
    keys does not depend on their order; RoPE was applied before)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
    from megatron.core.transformer import dot_product_attention as attention

    cls = attention.DotProductAttention
    original_init, original_forward = cls.__init__, cls.forward

    def __init__(self, config, *args, **kwargs):
        context_parallel = config.context_parallel_size
        if context_parallel > 1:
            config = copy.copy(config)
            config.context_parallel_size = 1
        original_init(self, config, *args, **kwargs)
        self.cpu_context_parallel = context_parallel

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if getattr(self, "cpu_context_parallel", 1) > 1:
            group = parallel_state.get_context_parallel_group()
            key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=group)
            value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=group)
        return original_forward(self, query, key, value, attention_mask, *args, **kwargs)

    cls.__init__, cls.forward = __init__, forward


# ---------------------------------------------------------------------------------------
# 3. Hard-coded CUDA devices and type strings, redirected for the whole process.
# ---------------------------------------------------------------------------------------
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA placements to the CPU:

    - ``device="cuda"`` in factory calls: pipeline_parallel/schedules.py:596, 983, 2138
      (``total_num_tokens``) and transformer/utils.py:35 (default causal mask);
    - ``Tensor.cuda()`` / ``Tensor.to("cuda")``: optimizer/grad_scaler.py:140 and others;
    - ``pin_memory=True``: models/common/embeddings/rope_utils.py:61 (the zig-zag RoPE
      positions of a context-parallel rank), which fails without an accelerator;
    - ``Tensor.type()`` comparisons with ``'torch.cuda.FloatTensor'``:
      optimizer/distrib_optimizer.py:420 ("Wrapped parameters must be one of
      torch.cuda.FloatTensor...") and optimizer/clip_grads.py:167 (bare assert).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):  # pinned host memory needs an accelerator
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# 4. DeepSpeed (parallel/deepspeed_engine.py), before deepspeed.initialize.
# ---------------------------------------------------------------------------------------
def apply_deepspeed() -> bool:
    """On a machine without CUDA: DeepSpeed's CPU accelerator JIT-compiles its
    shared-memory all-reduce op (`deepspeed_shm_comm`, 21-43 s) at every process start,
    from deepspeed/comm/torch.py:207 (`self.shm_comm_op = build_shm_op()` in
    TorchBackend.__init__). Only inference_all_reduce uses it; training reduces through
    the gloo group. Returns True when the shim is active."""
    if not needed():
        return False
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    # `deepspeed.comm.torch` the attribute is torch itself (deepspeed/comm/__init__.py):
    # reach the module through sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return True


# ---------------------------------------------------------------------------------------
# 5. Pipeline messages (parallel/model.py pipeline_settings).
# ---------------------------------------------------------------------------------------
def overlaps_pipeline_messages() -> bool:
    """Whether the interleaved schedule may overlap its pipeline sends with compute
    (overlap_p2p_comm, Megatron-LM's default). Not on gloo: with deallocate_pipeline_outputs
    megatron frees a stage's output (pipeline_parallel/schedules.py deallocate_output_tensor,
    `out.data = torch.empty((1,))`) while gloo's asynchronous send still reads it -- measured:
    a different wrong loss every run. NCCL keeps the storage alive until the send completes
    (record_stream)."""
    return not needed()
