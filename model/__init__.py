"""The training engine: a Megatron-Core GPT trained with tensor, pipeline, context and data
parallelism (torchrun), Transformer Engine FP8 on Hopper GPUs; the same code on CPU (gloo)."""

import os

# CPU matrix products go through oneMKL, which without its strict Conditional Numerical
# Reproducibility mode may split a product's sums differently from one run to the next once it
# uses more than one thread: the same 3-step training on 2 threads gave another loss at step 3
# in 3 of 11 runs (AUTO,STRICT: 28 of 28 the same), and two `make run`s trained different
# weights. STRICT also makes the sums independent of the thread count, which the pipeline takes
# from the machine's cores: 30 steps on 1, 2 and 4 threads gave one loss curve and the same
# weights (without STRICT, 1 and 4 threads differed). MKL reads this at its first call, so it
# holds for this process when set here, before any tensor math, and for every process started
# from it (torchrun ranks, the benchmark's peer). AUTO keeps each CPU's fastest code path:
# results are the same on one kind of CPU, not across kinds.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402  (after MKL_CBWR: torch's import makes no MKL call)

# torch computes contiguous float cos, exp, sqrt... with oneMKL's vector math (VML), each
# intra-op thread on its chunk, and oneMKL 2024.2 (torch's wheels) picks a VML function's
# kernel at its first call: when that first call runs on several threads at once, one thread
# may run a low-accuracy kernel for its whole chunk, that call only (pytorch/pytorch#188792;
# MKL_CBWR does not prevent it). Here the first torch.cos of a process, on mid-training's
# rotary frequencies (512 positions, errors up to 1.5e-4), hit it in ~1 process in 6; in
# training, where a cos first runs in the first step, ~1 run in 100 trained other weights
# (the step-1 loss 6.315738677978516 against 6.315736293792725). One call of each such function
# on one element, on this thread, settles every kernel before any parallel call.
_VML_FUNCTIONS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10",
                  "log2", "sin", "sqrt", "tan", "tanh", "trunc")   # ATen/cpu/vml.h's MKL list
for _dtype in (torch.float32, torch.float64):
    _one = torch.full((1,), 0.5, dtype=_dtype)
    for _name in _VML_FUNCTIONS:
        getattr(torch, _name)(_one)
del _dtype, _one, _name
