"""bench/train_gpu.py's --tc: TransformerConfig fields set for a benchmark run only (the GPU
run itself needs a GPU; what it builds the config with is checked here, on CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import train_gpu  # noqa: E402


def test_tc_values_are_json_when_they_parse():
    assert train_gpu.parse_tc(["cuda_graph_impl=local", "fp8_dot_product_attention=true",
                               "cuda_graph_warmup_steps=2"]) == \
        {"cuda_graph_impl": "local", "fp8_dot_product_attention": True, "cuda_graph_warmup_steps": 2}
    with pytest.raises(SystemExit, match="expected FIELD=VALUE"):
        train_gpu.parse_tc(["cuda_graph_impl"])


def test_overrides_reach_the_config_and_megatron_validates_them():
    from codeworld.config import load_params
    from model.build import Precision, transformer_config

    p = load_params(ROOT / "params.yaml")
    args = (p.model, p.parallel, p.pretrain, Precision("fp32", False))
    plain = transformer_config(*args)
    build = train_gpu.with_overrides(transformer_config, {"cuda_graph_warmup_steps": 5})
    cfg = build(*args)
    assert cfg.cuda_graph_warmup_steps == 5 != plain.cuda_graph_warmup_steps
    assert (cfg.num_layers, cfg.hidden_size) == (plain.num_layers, plain.hidden_size)
    with pytest.raises(SystemExit, match="no field"):
        train_gpu.with_overrides(transformer_config, {"no_such_field": 1})(*args)
    # Megatron's own checks run on the result: 8 heads do not split over 3 TP ranks
    with pytest.raises((ValueError, AssertionError)):
        train_gpu.with_overrides(transformer_config, {"tensor_model_parallel_size": 3})(*args)
