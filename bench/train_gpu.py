"""Benchmark on one GPU: tokens/s and MFU of our Megatron-Core training step for a ~1B-parameter
model in BF16 and (with Transformer Engine) FP8, beside a plain-PyTorch GPT of the same shape
in BF16 autocast with SDPA (flash) attention, in one run. Targets: >= 40% MFU in BF16; FP8
>= 1.3x BF16 tokens/s.

Each configuration runs in its own process (a failure is reported and the others go on):

    python bench/train_gpu.py [--steps 10] [--json out.json] [--set model.num_layers=20 ...]
                              [--profile]   # + where each step's GPU time goes (bench/gpu_profile.py)
                              [--tc cuda_graph_impl=local ...]   # TransformerConfig fields
                              [--set pretrain.cuda_graph=full_iteration]   # CUDA graphs
                              [--spec use_te_op_fuser=true ...]   # TE layer-spec arguments

`--tc FIELD=VALUE` sets a Megatron TransformerConfig field for the Megatron configs of this run
only (VALUE read as JSON when it parses, else as a string), to try what params.yaml does not
expose, e.g. FP8 attention (`fp8_dot_product_attention=true`); Megatron validates the result
as usual. CUDA graphs are a phase parameter (`pretrain.cuda_graph`: layer | full_iteration),
set with --set like any other. `--spec ARG=VALUE` passes an argument to Megatron's TE layer-spec
builder (`get_gpt_layer_with_transformer_engine_spec`) for this run only, e.g. its TE op fuser
(`use_te_op_fuser=true`: the MLP as one `te.ops.Sequential`, SwiGLU fused with its FP8 cast).
`--te-gated-fix` patches TE 2.11's gated activations first (bench/te_gated_fix.py: the op fuser
with FP8 delayed scaling gave NaN gradients on an H100).

MFU = training FLOPs per token (model.build.flops_per_token: 6N + attention) x tokens/s /
the GPU's peak dense BF16 FLOP/s (model.metrics.PEAK_FLOPS; 989 TFLOP/s on H100/H200). FP8
runs are divided by the same BF16 peak, so their MFU compares directly with BF16's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from gpu_profile import profile_steps  # noqa: E402
from gpu_summary import diverged  # noqa: E402

# ~1.03B parameters: 20 layers of hidden 2048 (16 heads, 4 KV groups, SwiGLU 5632), vocab 32k.
ONE_B = ["model.num_layers=20", "model.hidden_size=2048", "model.num_attention_heads=16",
         "model.num_query_groups=4", "model.ffn_hidden_size=5632",
         "model.max_position_embeddings=4096", "pretrain.seq_length=2048",
         "pretrain.micro_batch_size=4", "pretrain.global_batch_size=16", "pretrain.steps=100",
         "pretrain.warmup_steps=5", "pretrain.lr=0.0003", "pretrain.min_lr=0.00003"]
VOCAB = 32000
CONFIGS = ("plain-bf16", "megatron-bf16", "megatron-fp8")


def parse_assignments(items: list[str], option: str) -> dict:
    """FIELD=VALUE items (--tc, --spec) as a dict, VALUE read as JSON when it parses."""
    from codeworld.overrides import split_assignment

    def one(item: str) -> tuple[str, object]:
        try:
            return split_assignment(item)
        except ValueError:
            raise SystemExit(f"{option} {item!r}: expected FIELD=VALUE") from None
    return dict(map(one, items))


def with_overrides(build_config, overrides: dict):
    """model.build.transformer_config, then `overrides` applied (dataclasses.replace runs
    TransformerConfig's validation again)."""
    import dataclasses

    def build(*args, **kwargs):
        cfg = build_config(*args, **kwargs)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
        if unknown:
            raise SystemExit(f"--tc: TransformerConfig has no field {sorted(unknown)}")
        return dataclasses.replace(cfg, **overrides) if overrides else cfg
    return build


def with_spec_args(build_spec, spec_args: dict):
    """Megatron's TE layer-spec builder with `spec_args` added to every call; an argument it
    does not take fails here, naming it."""
    import inspect

    unknown = set(spec_args) - set(inspect.signature(build_spec).parameters)
    if unknown:
        raise SystemExit(f"--spec: {build_spec.__name__} has no argument {sorted(unknown)}")

    def build(*args, **kwargs):
        return build_spec(*args, **{**kwargs, **spec_args})
    return build


def worker(kind: str, steps: int, sets: list[str], profile: bool = False,
           tc: dict | None = None, spec_args: dict | None = None, te_gated_fix: bool = False) -> dict:
    import torch

    if te_gated_fix:
        from te_gated_fix import apply

        print(f"te_gated_fix: patched {apply() or 'nothing (TE >= 2.12)'}", file=sys.stderr, flush=True)

    from codeworld.config import load_params
    from codeworld.overrides import apply_overrides
    from model.build import check_cuda_graph, count_parameters, flops_per_token, resolve_precision
    from model.metrics import memory, peak_flops

    precision = kind.split("-")[1]
    params = apply_overrides(load_params(ROOT / "params.yaml"),
                             [*ONE_B, *sets, f'pretrain.precision="{precision}"'])
    m, cfg = params.model, params.pretrain
    from train import PlainGPT, batches   # bench/train.py

    data = [{k: v.cuda() for k, v in b.items()}
            for b in batches(VOCAB, cfg.global_batch_size // cfg.micro_batch_size,
                             cfg.micro_batch_size, cfg.seq_length)]
    warmup = 3
    if kind == "plain-bf16":
        torch.manual_seed(0)
        model = PlainGPT(VOCAB, m.hidden_size, m.num_layers, m.num_attention_heads,
                         m.num_query_groups, m.ffn_hidden_size, cfg.seq_length, m.rotary_base).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            total, loss_sum = 0, 0
            for b in data:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, n = model(b["tokens"], b["labels"], b["loss_mask"])
                loss.backward()
                total, loss_sum = total + n, loss_sum + loss.detach()
            for p in model.parameters():
                p.grad /= total
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            return loss_sum / total   # a tensor: read after the timing, not a sync in each step
        backend = "torch sdpa"
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        import model.trainer as trainer_mod
        from model.trainer import Trainer, init_distributed

        precision = resolve_precision(cfg)
        check_cuda_graph("pretrain", cfg.cuda_graph, precision)   # as model/train.py does
        if spec_args and not precision.use_te:
            raise SystemExit(f"--spec {spec_args}: arguments of the TE layer spec, but this run "
                             "has the local spec (no Transformer Engine)")
        trainer_mod.transformer_config = with_overrides(trainer_mod.transformer_config, tc or {})
        if spec_args:   # model.build.layer_spec imports the builder from its module at each call
            import megatron.core.models.gpt.gpt_layer_specs as specs

            specs.get_gpt_layer_with_transformer_engine_spec = with_spec_args(
                specs.get_gpt_layer_with_transformer_engine_spec, spec_args)
        init_distributed("auto")
        trainer = Trainer(params, "pretrain", VOCAB)
        cpu_data = [{k: v.cpu() for k, v in b.items()} for b in data]

        def step():
            return trainer.train_step(cpu_data)["loss"]
        backend = "TE spec" if trainer.precision.use_te else "local spec"
        if cfg.cuda_graph != "none":   # captured after Megatron's warm-up steps: time replays
            warmup += trainer.tcfg.cuda_graph_warmup_steps + 1
    # every step's loss, to check a variant (a CUDA graph mode, say) against the eager run
    losses = [step() for _ in range(warmup)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses += [step() for _ in range(steps)]
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    losses = [float(loss) for loss in losses]
    tps = steps * cfg.global_batch_size * cfg.seq_length / dt
    fpt = flops_per_token(m, VOCAB, cfg.seq_length)
    peak = peak_flops("bf16")
    prof = None
    if profile:
        try:
            prof = profile_steps(step)
        except Exception as err:   # the profiler must not cost the throughput figures
            prof = {"error": f"{type(err).__name__}: {err}"}
    mem = memory()
    return {"kind": kind, "backend": backend, "gpu": torch.cuda.get_device_name(), "profile": prof,
            "transformer_config": tc or {}, "layer_spec_args": spec_args or {}, "cuda_graph": cfg.cuda_graph,
            "te_gated_fix": te_gated_fix and __import__("te_gated_fix").STATS,
            "micro_batch_size": cfg.micro_batch_size, "losses": losses,
            "params": count_parameters(m, VOCAB), "tokens_per_s": tps,
            "tflops": fpt * tps / 1e12, "mfu": fpt * tps / peak if peak else None,
            "ms_per_step": dt / steps * 1000,
            # the training step rows' figures (peak allocated, and reserved: a CUDA graph's pool)
            "peak_memory_gib": mem["memory_mb"] / 1024, "reserved_memory_gib": mem["memory_reserved_mb"] / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--only", action="append", choices=CONFIGS)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--tc", action="append", default=[], metavar="FIELD=VALUE",
                    help="a Megatron TransformerConfig field for the Megatron configs (repeatable)")
    ap.add_argument("--spec", action="append", default=[], metavar="ARG=VALUE",
                    help="an argument of Megatron's TE layer-spec builder (repeatable)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 2 steps of each config: GPU busy time, time by kernel")
    ap.add_argument("--te-gated-fix", action="store_true",
                    help="patch TE 2.11's gated activations for FP8 delayed scaling (bench/te_gated_fix.py)")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # malformed or unknown ones fail here, before any config runs (the workers parse them again)
    tc = parse_assignments(args.tc, "--tc")
    spec_args = parse_assignments(args.spec, "--spec")
    if spec_args and not args.worker:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        with_spec_args(get_gpt_layer_with_transformer_engine_spec, spec_args)   # names checked
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.set, args.profile, tc, spec_args,
                                args.te_gated_fix)))
        return 0
    results: dict[str, dict] = {}
    for kind in args.only or CONFIGS:
        if kind.endswith("fp8"):
            from model.build import have_te

            if not have_te():
                results[kind] = {"kind": kind, "error": "transformer_engine is not installed"}
                print(f"{kind}: skipped (transformer_engine is not installed)", flush=True)
                continue
        cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps),
               *sum((["--set", s] for s in args.set), []), *sum((["--tc", t] for t in args.tc), []),
               *sum((["--spec", a] for a in args.spec), []),
               *(["--profile"] if args.profile else []),
               *(["--te-gated-fix"] if args.te_gated_fix else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[kind] = {"kind": kind, "error": f"timed out after {args.timeout:.0f} s"}
            print(f"{kind}: timed out", flush=True)
            continue
        if proc.returncode != 0:
            err = "\n".join(l for l in proc.stderr.splitlines() if "warn" not in l.lower())[-2500:]
            results[kind] = {"kind": kind, "error": err}
            print(f"{kind}: FAILED\n{err}", flush=True)
            continue
        results[kind] = res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{kind}: {res['tokens_per_s']:.0f} tokens/s, MFU {res['mfu'] or 0:.1%}, "
              f"{res['ms_per_step']:.0f} ms/step, {res['peak_memory_gib']:.1f} GiB "
              f"({res['reserved_memory_gib']:.1f} reserved), "
              f"loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}", flush=True)
        if why := diverged(res["losses"]):   # its speed is no result: left out of the ratios
            res["error"] = why
            print(f"{kind}: FAILED, {why}", flush=True)
            continue
        if res.get("profile") and "error" in res["profile"]:
            print(f"  profile failed: {res['profile']['error']}", flush=True)
        elif res.get("profile"):
            pr = res["profile"]
            print(f"  profile: GPU busy {pr['gpu_busy_ms_per_step']:.0f} of {pr['wall_ms_per_step']:.0f} ms "
                  f"a step, {pr['kernels_per_step']:.0f} kernels; by category (ms): "
                  f"{pr['ms_per_step_by_category']}", flush=True)
            for k in pr["kernels"][:12]:
                print(f"    {k['ms_per_step']:8.2f} ms  x{k['launches_per_step']:<5g} {k['category']:<22} "
                      f"{k['name'][:100]}", flush=True)
    print("\n| config | backend | tokens/s | TFLOP/s | MFU (of BF16 peak) | peak GiB |\n|---|---|---|---|---|---|")
    for kind, r in results.items():
        if "error" in r:
            print(f"| {kind} | - | failed: {r['error'].splitlines()[-1][:80]} | | | |")
        else:
            print(f"| {kind} | {r['backend']} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | "
                  f"{(r['mfu'] or 0):.1%} | {r['peak_memory_gib']:.1f} |")
    ok = {k: r for k, r in results.items() if "error" not in r}
    if "megatron-bf16" in ok:
        print(f"\nMegatron BF16 MFU {ok['megatron-bf16']['mfu'] or 0:.1%} (target >= 40%)")
        if "plain-bf16" in ok:
            print(f"Megatron BF16 / plain PyTorch BF16 = "
                  f"{ok['megatron-bf16']['tokens_per_s'] / ok['plain-bf16']['tokens_per_s']:.2f}x")
        if "megatron-fp8" in ok:
            print(f"FP8 / BF16 tokens/s = {ok['megatron-fp8']['tokens_per_s'] / ok['megatron-bf16']['tokens_per_s']:.2f}x (target >= 1.3x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
