"""model/metrics: the MFU peak per GPU model and the memory figures of a step row; the FLOP
count per token (model/build.py) that MFU and TFLOP/s divide."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from model.metrics import memory, peak_flops

REPO = Path(__file__).resolve().parents[1]


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


MEMORY_PROBE = """
import json, sys, torch
from model import metrics

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
metrics.memory = lambda: {"memory_mb": [300.0, 1200.5, 700.0][rank]}   # rank 1 holds the most
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:   # (one file each: prints interleave)
    json.dump(metrics.memory_over_ranks(), f)
torch.distributed.destroy_process_group()
"""


def test_logged_memory_is_the_maximum_over_all_ranks(tmp_path):
    """The logging rank is the last pipeline stage's: its own figure hid a rank nearer to its
    memory's limit. Every rank gets the maximum, over gloo on CPU."""
    from stages.train_phase import run_in_own_group

    (tmp_path / "probe.py").write_text(MEMORY_PROBE)
    with open(tmp_path / "log", "w") as log:
        proc = run_in_own_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=3", str(tmp_path / "probe.py"), str(tmp_path)],
                                stdout=log, timeout=300, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 0, out[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert got == [{"memory_mb": 1200.5}] * 3
