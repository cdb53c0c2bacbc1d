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
    assert train_gpu.parse_assignments(["cuda_graph_impl=local", "fp8_dot_product_attention=true",
                                        "cuda_graph_warmup_steps=2"], "--tc") == \
        {"cuda_graph_impl": "local", "fp8_dot_product_attention": True, "cuda_graph_warmup_steps": 2}
    with pytest.raises(SystemExit, match="expected FIELD=VALUE"):
        train_gpu.parse_assignments(["cuda_graph_impl"], "--tc")


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


def result(kind, mbs, graph, tokens_per_s, losses, tc=None):
    return {"kind": kind, "micro_batch_size": mbs, "cuda_graph": graph, "transformer_config": tc or {},
            "tokens_per_s": tokens_per_s, "mfu": 0.5, "ms_per_step": 400.0, "peak_memory_gib": 20.0,
            "losses": losses}


def test_gpu_summary_ratios_and_loss_checks(tmp_path):
    """bench/gpu_summary.py: FP8 over the BF16 of its own benchmark, else of another benchmark
    at the same micro-batch and graph mode; each variant's loss difference from the eager run."""
    import json

    import gpu_summary

    bench = [
        {"name": "graph", "results": {
            "megatron-bf16": result("megatron-bf16", 8, "full_iteration", 80000.0, [10.0, 9.0, 8.5, 7.0]),
            "megatron-fp8": result("megatron-fp8", 8, "full_iteration", 104000.0, [10.0, 9.25, 8.0, 7.0])}},
        {"name": "fp8_attention", "results": {
            "megatron-fp8": result("megatron-fp8", 8, "full_iteration", 96000.0, [10.0, 9.0, 8.0],
                                   {"fp8_dot_product_attention": True})}},
        {"name": "eager", "results": {
            "megatron-bf16": result("megatron-bf16", 8, "none", 75000.0, [10.0, 9.0, 8.0]),
            "megatron-fp8": {"kind": "megatron-fp8", "error": "Traceback ...\nRuntimeError: no FP8 here"}}},
    ]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(e) + "\n" for e in bench))
    rows = {(line.split(" | ")[0][2:], line.split(" | ")[1]): line
            for line in gpu_summary.bench_table(gpu_summary.bench_rows(tmp_path))[2:]}
    assert "| 1.30x |" in rows["graph", "megatron-fp8"]
    assert "| 1.20x |" in rows["fp8_attention", "megatron-fp8"]   # the BF16 of "graph"
    assert "5.00e-01 over 3 steps" in rows["graph", "megatron-bf16"]   # against "eager"
    assert "failed: RuntimeError: no FP8 here" in rows["eager", "megatron-fp8"]
    assert rows["graph", "megatron-fp8"].endswith("|  |")   # no eager FP8 run to compare with


def test_a_run_whose_loss_went_nan_is_a_failure_not_a_speed(tmp_path):
    """The H100's op-fuser FP8 run: NaN from step 2 at 1.5x BF16's speed. Its bench.jsonl line
    (written before train_gpu.py checked) reads as failed, and gives no ratio."""
    import json

    import gpu_summary

    bench = [{"name": "fuser", "results": {
        "megatron-bf16": result("megatron-bf16", 16, "full_iteration", 76000.0, [10.8, 10.8, 7.5]),
        "megatron-fp8": result("megatron-fp8", 16, "full_iteration", 114000.0, [10.8, float("nan"), 7.0])}}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(e) + "\n" for e in bench))
    rows = gpu_summary.bench_rows(tmp_path)
    assert [r.get("error") for r in rows] == [None, "diverged: loss nan at step 2"]
    table = gpu_summary.bench_table(rows)
    assert "| fuser | megatron-fp8 | failed: diverged: loss nan at step 2 |" in table[3]
    assert not any("x |" in line for line in table)   # no FP8/BF16 ratio
    assert gpu_summary.diverged([3.0, float("inf")]) == "diverged: loss inf at step 2"
    assert gpu_summary.diverged([3.0, 2.0]) is None


def test_gpu_summary_reports_what_the_te_patch_found(tmp_path):
    """--te-gated-fix runs carry bench/te_gated_fix.py's STATS: the summary pairs them as one
    variant (BF16 rebuilt nothing, FP8 did) and prints what each found."""
    import json

    import gpu_summary

    fp8 = result("megatron-fp8", 16, "full_iteration", 99000.0, [10.8, 9.0, 7.0])
    bf16 = result("megatron-bf16", 16, "full_iteration", 76000.0, [10.8, 9.0, 7.0])
    fp8["te_gated_fix"] = {"rebuilt": 640, "stale": {"SwiGLU._activation_forward_impl": True}}
    bf16["te_gated_fix"] = {"rebuilt": 0, "stale": {}}
    (tmp_path / "bench.jsonl").write_text(json.dumps(
        {"name": "fuser_fix", "results": {"megatron-bf16": bf16, "megatron-fp8": fp8}}) + "\n")
    table = gpu_summary.bench_table(gpu_summary.bench_rows(tmp_path))
    assert "| 1.30x |" in table[3] and "'te_gated_fix': True" in table[3]
    assert ("te_gated_fix, fuser_fix megatron-fp8: {'rebuilt': 640, 'stale': "
            "{'SwiGLU._activation_forward_impl': True}}") in table


def test_gpu_summary_compares_train_runs_step_by_step(tmp_path):
    import json

    import gpu_summary

    def write(name, losses, valid):   # evaluated at the last step
        rows = [{"step": i + 1, "loss": l, "grad_norm": 1.0, "lr": 0.1, "tokens_per_s": 100.0 * (i + 1)}
                for i, l in enumerate(losses)]
        rows[-1]["valid_loss"] = valid
        (tmp_path / f"steps_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("eager", [8.0, 7.0, 6.0], valid=5.5)
    write("graph", [8.0, 7.0, 6.0], valid=5.5)
    write("other", [8.0, 7.5, 6.0], valid=5.5)
    write("valid_differs", [8.0, 7.0, 6.0], valid=5.25)
    lines = gpu_summary.train_comparison(tmp_path, ["eager", "graph", "other", "valid_differs", "missing"])
    assert any(l.startswith("graph: 3 rows; identical (loss, grad norm, lr, valid loss) at 3/3 steps") for l in lines)
    assert any(l.startswith("other: 3 rows; identical (loss, grad norm, lr, valid loss) at 2/3 steps; "
                            "largest loss difference 0.5") for l in lines)
    assert any(l.startswith("valid_differs: 3 rows; identical (loss, grad norm, lr, valid loss) at 2/3 steps; "
                            "largest loss difference 0.0") for l in lines)
    assert "missing: no steps log" in lines


def test_gpu_check_refuses_a_bad_plan_before_any_work(tmp_path):
    import subprocess

    plan = tmp_path / "plan.txt"
    plan.write_text("# a comment\nbench base\nbenchmark mbs8 --profile\n")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PLAN": str(plan), "OUT": str(out)})
    assert proc.returncode == 2
    assert f"{plan}: 'benchmark' is not bench, train, export or rl, in: benchmark mbs8 --profile" in proc.stderr
    assert proc.stdout == ""   # nothing ran: no nvidia-smi, no install
    # a kit folder without its data (bench/device_kit.sh not run, or not carried) is refused too
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(out), "KIT": str(tmp_path / "kit")})
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{tmp_path / 'kit'}/data.tgz missing: build the kit with bench/device_kit.sh" in proc.stderr


def test_gpu_check_installs_the_kits_wheels_by_name(tmp_path):
    """The kit's wheels reach pip as files (the script runs with globbing off: on the device
    they once reached it as a literal '*.whl'). python3, nvidia-smi and tar are stand-ins here
    that record what they are asked; the stand-in python3 refuses everything but pip, so the
    script stops at Transformer Engine's install, before any GPU work."""
    import subprocess

    kit, bin_ = tmp_path / "kit", tmp_path / "bin"
    (kit / "whl").mkdir(parents=True)
    (kit / "te").mkdir()
    (kit / "data.tgz").write_bytes(b"")
    wheels = ["a-1.0-py3-none-any.whl", "b_c-2.0-cp312-cp312-manylinux_2_28_x86_64.whl"]
    for w in wheels:
        (kit / "whl" / w).write_bytes(b"")
    bin_.mkdir()
    log = tmp_path / "calls"
    for name, body in {"python3": f'echo "python3 $*" >> {log}; [ "$2" = pip ]',
                       "nvidia-smi": "echo 'NVIDIA H100, 81559 MiB'", "tar": "exit 0"}.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": f"{bin_}:/usr/bin:/bin", "KIT": str(kit),
                                          "OUT": str(tmp_path / "out")})
    pip = [line for line in log.read_text().splitlines() if " pip install " in line]
    assert pip and "--target /tmp/site" in pip[0], (proc.stdout, proc.stderr)
    assert sorted(a for a in pip[0].split() if a.endswith(".whl")) == [str(kit / "whl" / w) for w in wheels]
    assert proc.returncode == 1   # then TE's install fails on the stand-in: nothing else ran


@pytest.mark.parametrize("plan", sorted((ROOT / "bench/gpu_plans").glob("*.txt")), ids=lambda p: p.name)
def test_committed_gpu_plans_read(plan):
    import subprocess

    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--check"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PLAN": str(plan), "OUT": "/tmp/gpu_check_plan"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("steps") and " 0 steps" not in proc.stdout


def test_spec_args_reach_megatrons_te_spec_builder_and_unknown_ones_fail():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    calls = []

    def builder(num_experts=None, use_te_op_fuser=False):
        calls.append((num_experts, use_te_op_fuser))
    train_gpu.with_spec_args(builder, {"use_te_op_fuser": True})(num_experts=None)
    assert calls == [(None, True)]
    # the names are checked against Megatron's own builder, before any config runs
    train_gpu.with_spec_args(get_gpt_layer_with_transformer_engine_spec, {"use_te_op_fuser": True})
    with pytest.raises(SystemExit, match=r"--spec: get_gpt_layer_with_transformer_engine_spec has no argument \['use_op_fuser'\]"):
        train_gpu.with_spec_args(get_gpt_layer_with_transformer_engine_spec, {"use_op_fuser": True})
    with pytest.raises(SystemExit, match="--spec 'use_te_op_fuser': expected FIELD=VALUE"):
        train_gpu.parse_assignments(["use_te_op_fuser"], "--spec")


def test_kernel_categories_of_kernels_seen_on_h100_and_h200():
    """Names from the profiles of bench/train_gpu.py on the device machines (TE 2.11): FP8's own
    quantisation apart from PyTorch's dtype conversions, the fused norm apart from the FP8 it
    writes, the optimizer's grad norm apart from layer norms."""
    from gpu_profile import kernel_category

    seen = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "nvjet_sm90_qrtst_128x160_128x5_1x2_h_bz_coopA_algo2_TNT": "fp8 gemm",
        "nvjet_sm90_qqtst_192x192_128x4_1x2_h_bz_coopB_TNN": "fp8 gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1": "attention",
        "triton_poi_fused_add_cat_mul_rsub_sigmoid_silu_split_0": "activation",
        "cast_transpose_optimized_kernel(__nv_bfloat16 const*, float const*, __nv_fp8_e5m2*, __nv_f": "fp8 quantize",
        "void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>, std::arra": "grad accumulate (add)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const, memory::LoadWithCast<1>, memory::StoreWithCast<1> >": "dtype convert/copy",
        "void transformer_engine::normalization::rmsnorm_fwd_tuned_kernel<..., __nv_fp8_e4m3, ...>": "norm",
        "void multi_tensor_apply_kernel<TensorListMetadata<1>, L2NormFunctor<float, 512, 1>> multi_tensor_l2norm": "optimizer",
        "void transformer_engine::fused_rope_forward_kernel<__nv_bfloat16>": "rope",
        "void at::native::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>": "embedding",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MaxOps<float>>>": "other",
    }
    assert {name: kernel_category(name) for name in seen} == seen


def test_profile_summary_busy_time_and_kernel_list():
    from gpu_profile import summarize

    # two steps; the second kernel overlaps the first by 5 us; a 20 us idle gap
    kernels = [("nvjet_sm90_tst_a", 0.0, 100.0), ("triton_poi_fused_silu_0", 95.0, 115.0),
               ("nvjet_sm90_tst_a", 135.0, 235.0), ("tiny_kernel", 240.0, 240.01)]
    s = summarize(kernels, wall_ms=0.5, n=2)
    assert s["gpu_busy_ms_per_step"] == pytest.approx((100 + 15 + 100 + 0.01) / 1000 / 2)
    assert s["ms_per_step_by_category"] == {"gemm": 0.1, "activation": 0.01, "other": 0.0}
    assert s["kernels"] == [{"name": "nvjet_sm90_tst_a", "category": "gemm", "ms_per_step": 0.1,
                             "launches_per_step": 1.0}]   # the others are under 0.05 ms a step
    assert s["kernels_per_step"] == 2 and s["wall_ms_per_step"] == 0.25


def test_gpu_summary_profile_table_and_what_the_target_needs(tmp_path):
    import json

    import gpu_summary

    def profiled(kind, ms, cats):
        return {**result(kind, 16, "full_iteration", 16 * 2048 / ms * 1000, [1.0]), "ms_per_step": ms,
                "profile": {"ms_per_step_by_category": cats, "gpu_busy_ms_per_step": ms - 5,
                            "wall_ms_per_step": ms}}
    bench = [{"name": "p", "results": {
        "megatron-bf16": profiled("megatron-bf16", 432.0, {"gemm": 270.0, "dtype convert/copy": 20.0}),
        "megatron-fp8": profiled("megatron-fp8", 342.0, {"fp8 gemm": 150.0, "gemm": 5.0, "fp8 quantize": 30.0})}}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(e) + "\n" for e in bench))
    lines = gpu_summary.profile_tables(gpu_summary.bench_rows(tmp_path))
    assert "| gemm | 270.0 | 5.0 | -265.0 |" in lines and "| fp8 gemm | 0.0 | 150.0 | +150.0 |" in lines
    assert "| fp8 quantize | 0.0 | 30.0 | +30.0 |" in lines
    # 432 / 1.3 = 332.3 ms: 9.7 ms to go; or (1.3 x 342 - 432) / 0.3 = 42 ms off both steps
    assert lines[-1] == ("timed steps: BF16 432.0 ms, FP8 342.0 ms (1.263x); 1.3x needs an FP8 step of "
                         "<= 332.3 ms (+9.7 ms to go), or a time both steps lose alike of 42 ms")
