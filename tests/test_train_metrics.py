"""model/metrics: the MFU peak per GPU model and the memory figures of a step row; the FLOP
count per token (model/build.py) that MFU and TFLOP/s divide."""

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


def test_tied_embeddings_share_the_output_weight_not_its_flops():
    """The output layer multiplies every token by a vocab x hidden matrix whether or not it is
    the input embedding's: tying halves the embedding parameters, never the FLOPs (counted
    without it, MFU read ~25% low for a small tied model)."""
    from codeworld.config import ModelConfig
    from model.build import count_parameters, flops_per_token

    vocab, seq = 32000, 2048
    untied, tied = ModelConfig(), ModelConfig(tie_embeddings=True)
    h = untied.hidden_size
    assert count_parameters(untied, vocab) - count_parameters(tied, vocab) == vocab * h
    assert flops_per_token(tied, vocab, seq) == flops_per_token(untied, vocab, seq)
    # 6 x (all parameters but the input embedding) + attention, written out for the untied model
    n = count_parameters(untied, vocab) - vocab * h
    assert flops_per_token(untied, vocab, seq) == 6 * n + 12 * untied.num_layers * h * seq
