"""model/metrics: the MFU peak per GPU model and the memory figures of a step row."""

from __future__ import annotations

import pytest

from model.metrics import memory, peak_flops


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),    # SXM
    ("NVIDIA H100 80GB HBM3", "fp8", 1979e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),         # not the SXM figure its name also matches
    ("NVIDIA H100 NVL", "fp8", 1671e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "fp8", None),        # no FP8 on Ampere
    ("Tesla T4", "bf16", None),
])
def test_peak_flops_by_device_name(name, precision, peak):
    assert peak_flops(precision, name) == peak


def test_memory_on_cpu_is_the_resident_set():
    import psutil

    m = memory()
    assert list(m) == ["memory_mb"]   # no reserved figure: that is the GPU caching allocator's
    rss = psutil.Process().memory_info().rss / 2**20
    assert 0.5 * rss < m["memory_mb"] < 2 * rss
