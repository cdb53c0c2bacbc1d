"""A stopgap for Transformer Engine 2.11 on Hopper, for `bench/train_gpu.py --te-gated-fix`:
TE's op fuser (`--spec use_te_op_fuser=true`) with FP8 delayed scaling gave NaN gradients from
the first backward on an H100 (2026-11-27, docs/gpu-h200-2026-11-26.md).

The likely cause, read in TE 2.11's source (not yet confirmed on a GPU): te.ops' gated
activations (SwiGLU, ...) quantize their output (forward) and their input gradient (backward)
with the next op's delayed-scaling quantizer through the fused kernels `cast_gated_fwd` /
`cast_gated_bwd`, which write only the row-wise FP8 data. On SM90 the quantizer also allocates
the transposed copy that the weight-gradient GEMM reads, and marks it valid, but nothing writes
it: FC2's and FC1's weight gradients come from uninitialised memory. TE 2.12 transposes after
the kernel (commit 99df881, squashed into NVIDIA/TransformerEngine#2486); megatron-core 0.16.1
pins TE < 2.12 in its dev extra only (NVIDIA locked 0.16.1 itself to TE 2.12). `apply()` does
the same from Python: after each gated activation, the transposed copy is rebuilt from the
row-wise data. No-op on TE >= 2.12.
"""
from __future__ import annotations

import functools

GATED = ("GEGLU", "QGEGLU", "ReGLU", "SReGLU", "SwiGLU", "ClampedSwiGLU")
# What the patch did, for the run's report: transposes rebuilt, and per method whether the
# kernel's own transpose differed from the rebuilt one at its first eager call (True: the
# kernel had left it unwritten, the diagnosis above; False: the NaN has another cause)
STATS: dict = {"rebuilt": 0, "stale": {}}


def _fill_transpose(y, quantizer, tag):
    import torch
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer
    from transformer_engine.pytorch.tensor.storage.float8_tensor_storage import Float8TensorStorage

    # Float8Quantizer exactly: delayed scaling (current scaling's quantizer builds the transpose)
    if (type(quantizer) is Float8Quantizer and isinstance(y, Float8TensorStorage)
            and y._data is not None and y._transpose is not None):
        check = tag not in STATS["stale"] and not torch.cuda.is_current_stream_capturing()
        before = y._transpose.clone() if check else None
        y._create_transpose()   # tex.fp8_transpose into the buffer the quantizer allocated
        STATS["rebuilt"] += 1
        if check:
            STATS["stale"][tag] = not torch.equal(before, y._transpose)
    return y


def _wrap(impl, tag):
    @functools.wraps(impl)
    def wrapped(self, *args, **kwargs):
        # forward (x, next op's input quantizer); backward (dy, x, previous op's grad quantizer),
        # passed positionally by op_forward/op_backward (TE 2.11 activation.py)
        return _fill_transpose(impl(self, *args, **kwargs), args[-1] if args else None, tag)
    wrapped.codeworld_gated_fix = True
    return wrapped


def apply() -> list[str]:
    """Patch the gated activations of te.ops; the names of the methods patched."""
    import transformer_engine
    from packaging.version import Version

    if Version(transformer_engine.__version__.split("+")[0]) >= Version("2.12"):
        return []
    import transformer_engine.pytorch.ops.basic.activation as act

    patched = []
    for name in GATED:
        cls = getattr(act, name, None)
        for attr in ("_activation_forward_impl", "_activation_backward_impl"):
            impl = cls.__dict__.get(attr) if cls is not None else None
            if impl is not None and not getattr(impl, "codeworld_gated_fix", False):
                setattr(cls, attr, _wrap(impl, f"{name}.{attr}"))
                patched.append(f"{name}.{attr}")
    if not getattr(getattr(act, "SwiGLU", None), "_activation_forward_impl", None) or not getattr(
            act.SwiGLU._activation_forward_impl, "codeworld_gated_fix", False):
        # a silent no-op would read as "fixed upstream" in the report
        raise RuntimeError("te_gated_fix: TE < 2.12, but SwiGLU has no _activation_forward_impl "
                           "to patch: this TE's layout is not the one the patch was written for")
    return patched
