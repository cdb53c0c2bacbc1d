"""Megatron-Core on a CPU-only torch: the one place where its CUDA-only calls are redirected.

Megatron-Core 0.16 assumes CUDA in a few fixed ways (see ../shared/notes/megatron-core-on-cpu.md):
1. buffers allocated with `device=torch.cuda.current_device()` or `device="cuda"`, and `.cuda()`
   calls (pipeline p2p buffers, optimizer found-inf flags, clip-grad buffers, DDP buffers);
2. unconditional `torch.cuda.synchronize()` / `torch.cuda.manual_seed()`;
3. the model-parallel RNG tracker, which saves and restores CUDA generator states;
4. asserts that grads are `torch.cuda.FloatTensor`;
5. pinned host buffers (`pin_memory=True`, e.g. context parallel's RoPE chunk indices), which
   need a CUDA allocator: on CPU they are plain tensors.
`enable()` redirects all of them to the CPU: a TorchFunctionMode rewrites CUDA devices to CPU
and reports CPU tensors' type names with `cuda`, and the torch.cuda RNG calls act on the CPU
generator. The autograd engine runs backward passes without the thread's TorchFunctionModes,
so custom autograd Functions' backward (Megatron's sequence-parallel linear layers allocate
their reduce-scatter buffer there) enter the mode again. It is called only when no GPU is
present; the GPU path never enters this module.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_enabled = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal (torch.cuda.current_device() returns one).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def enable() -> None:
    """Idempotent; for the process's lifetime (training processes are single-purpose)."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("model.cpu_compat is for CPU-only runs; a GPU is present")
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The tracker's own copies of the CUDA generator accessors.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _CudaAsCpu().__enter__()
    from torch.autograd.function import BackwardCFunction

    backward = BackwardCFunction.apply   # what the engine calls for a custom Function's backward

    def backward_as_cpu(self, *args):
        with _CudaAsCpu():
            return backward(self, *args)
    BackwardCFunction.apply = backward_as_cpu
    _enabled = True
