"""Where a training step's GPU time goes: kernels by category, for bench/train_gpu.py --profile.

FP8 only speeds up the GEMMs and adds its own quantisation kernels; whatever both precisions
spend alike (attention, activation, loss, optimizer) bounds the FP8/BF16 ratio. The categories
keep apart what an FP8 change can shrink from what it cannot: Transformer Engine's FP8
quantisation (cast/transpose/amax) apart from PyTorch's dtype conversions (whose kernel names
also say "cast": `LoadWithCast`), which a BF16 step has too.
"""

from __future__ import annotations

import time

# (category, substrings of the lower-cased kernel name), first match wins. The order matters:
# TE's fused RMSNorm writes FP8 and names it ("...fp8..."), and multi_tensor_l2norm is the
# optimizer's grad norm, not a layer norm.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet")),
    ("attention", ("flash", "fmha", "sdpa", "cudnn", "attn")),
    ("optimizer", ("adam", "multi_tensor")),
    ("norm", ("norm",)),
    ("activation", ("silu", "swiglu", "sigmoid", "gelu")),
    ("cross entropy/softmax", ("softmax", "cross_entropy", "crossentropy", "nll_loss", "logsumexp")),
    ("rope", ("rope", "rotary")),
    ("embedding", ("indexselect", "index_select", "embedding")),
    ("fp8 quantize", ("cast_transpose", "quantize", "amax", "fp8", "e4m3", "e5m2", "compute_scale",
                      "delayed_scaling")),
    ("dtype convert/copy", ("loadwithcast", "direct_copy", "copy_kernel", "cast")),
    ("grad accumulate (add)", ("functor_add",)),
)


def kernel_category(name: str) -> str:
    n = name.lower()
    for category, keys in CATEGORIES:
        if any(k in n for k in keys):
            if category == "gemm" and is_fp8_gemm(n):
                return "fp8 gemm"
            return category
    return "other"


def is_fp8_gemm(n: str) -> bool:
    # cuBLAS names its FP8 GEMMs "nvjet_sm90_qqtst..." / "..._qrtst..." (seen on H100/H200 with
    # TE 2.11: only FP8 runs have them); CUTLASS names carry the FP8 type
    return "e4m3" in n or "e5m2" in n or "fp8" in n or n.startswith("nvjet_sm90_q")


def profile_steps(step, n: int = 2, min_ms: float = 0.05) -> dict:
    """Run n steps under the CUDA profiler: GPU busy time per step (the union of kernel
    intervals; well under the wall time means the step waits on the host), the time by kernel
    category, and every kernel of at least min_ms a step with its category and launch count."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    return summarize(kernels, wall * 1000, n, min_ms)


def summarize(kernels: list[tuple[str, float, float]], wall_ms: float, n: int,
              min_ms: float = 0.05) -> dict:
    """kernels: (name, start us, end us) over n steps that took wall_ms."""
    from collections import Counter

    by_name, launches = Counter(), Counter()
    busy, end_so_far = 0.0, float("-inf")
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        by_name[name] += end - start
        launches[name] += 1
        busy += max(0.0, end - max(start, end_so_far))   # the part no earlier kernel covered
        end_so_far = max(end_so_far, end)
    category = {name: kernel_category(name) for name in by_name}   # once a distinct kernel
    by_category = Counter()
    for name, us in by_name.items():
        by_category[category[name]] += us
    per_step = lambda us: round(us / 1000 / n, 2)  # noqa: E731  (microseconds -> ms a step)
    return {"wall_ms_per_step": wall_ms / n, "gpu_busy_ms_per_step": busy / 1000 / n,
            "kernels_per_step": len(kernels) / n,
            "ms_per_step_by_category": {k: per_step(v) for k, v in by_category.most_common()},
            "kernels": [{"name": name[:200], "category": category[name], "ms_per_step": per_step(us),
                         "launches_per_step": launches[name] / n}
                        for name, us in by_name.most_common() if us / 1000 / n >= min_ms]}
