"""oneMKL's reproducible mode reaches the math of every process that imports the engine
(model/__init__.py): without it, two runs of the same training on 2 threads could differ."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

MATMUL = "a = torch.randn(64, 64); a @ a"


def _mkl_says(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "MKL_VERBOSE": "1", "OMP_NUM_THREADS": "2"}, check=True)
    return out.stdout + out.stderr


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch has no oneMKL")
def test_importing_the_engine_turns_on_mkl_reproducibility():
    assert "CNR:OFF" in _mkl_says("import torch; " + MATMUL)  # what torch alone runs with
    # imported after torch, as the training ranks and the stages do: still before MKL's 1st call
    assert "CNR:AUTO,STRICT" in _mkl_says("import torch, model; " + MATMUL)
