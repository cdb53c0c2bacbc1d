"""The summary of a bench/gpu_check.sh run, from the files it left in OUT:

    python bench/gpu_summary.py OUT [TRAIN_NAME ...]

- every benchmark result of bench.jsonl in one table, with FP8's tokens/s over BF16's at the
  same micro-batch and CUDA graph mode (the BF16 of the same benchmark, else of another one of
  this run), and each result's largest per-step loss difference from the eager run of its
  config at its micro-batch, when the run has one (a graph replaying stale inputs would train
  as fast and differ);
- for each benchmark that profiled both precisions (--profile), their GPU time a step by kernel
  category side by side (bench/gpu_profile.py), and how much shorter the FP8 step would have
  to be for the 1.3x target;
- each train run's steps_NAME.jsonl against the first name's, step by step (loss, grad norm,
  lr, and the validation loss where it was evaluated).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def diverged(losses: list[float]) -> str | None:
    """Why a run's speed is no result: a loss that is not finite. (TE's op fuser with FP8 delayed
    scaling gave NaN gradients from its first backward on the H100 and ran 1.5x BF16's speed.)"""
    bad = next(((i, x) for i, x in enumerate(losses, 1) if not math.isfinite(x)), None)
    return f"diverged: loss {bad[1]} at step {bad[0]}" if bad else None


def bench_rows(out: Path) -> list[dict]:
    """bench.jsonl's results; one whose loss went NaN or infinite is a failure, also where the run
    that wrote it did not say so."""
    path = out / "bench.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = json.loads(line)
        for res in entry["results"].values():
            why = "error" not in res and diverged(res.get("losses") or [])
            rows.append({"name": entry["name"], **res, **({"error": why} if why else {})})
    return rows


def variant(r: dict) -> dict:
    """What a run changed beyond params: TransformerConfig fields (--tc), layer-spec arguments
    (--spec), the TE patch (--te-gated-fix)."""
    return {**(r.get("transformer_config") or {}),
            **{f"spec.{k}": v for k, v in (r.get("layer_spec_args") or {}).items()},
            **({"te_gated_fix": True} if r.get("te_gated_fix") else {})}


def setting(r: dict) -> tuple:
    return r.get("micro_batch_size"), r.get("cuda_graph"), json.dumps(variant(r), sort_keys=True)


def bench_table(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    lines = ["| benchmark | config | micro-batch | cuda_graph | --tc / --spec | tokens/s | MFU | "
             "ms/step | GiB | FP8/BF16 | loss vs eager |", "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['kind']} | failed: {r['error'].splitlines()[-1][:90]} |"
                         + " |" * 8)
            continue
        ratio = ""
        if r["kind"] == "megatron-fp8":
            mbs, graph, _ = setting(r)
            bf16 = ([b for b in ok if b["kind"] == "megatron-bf16" and b["name"] == r["name"]]
                    or [b for b in ok if b["kind"] == "megatron-bf16" and setting(b)[:2] == (mbs, graph)])
            if bf16:
                ratio = f"{r['tokens_per_s'] / bf16[0]['tokens_per_s']:.2f}x"
        eager = [b for b in ok if b["kind"] == r["kind"] and b is not r and b.get("losses")
                 and setting(b) == (r.get("micro_batch_size"), "none", "{}")]
        diff = ""
        if eager and r.get("losses") and setting(r) != setting(eager[0]):
            pairs = list(zip(r["losses"], eager[0]["losses"]))
            diff = f"{max(abs(a - b) for a, b in pairs):.2e} over {len(pairs)} steps"
        lines.append(f"| {r['name']} | {r['kind']} | {r.get('micro_batch_size')} | {r.get('cuda_graph')} | "
                     f"{variant(r) or ''} | {r['tokens_per_s']:.0f} | {(r['mfu'] or 0):.1%} | "
                     f"{r['ms_per_step']:.0f} | {r['peak_memory_gib']:.1f} | {ratio} | {diff} |")
    for r in ok:   # what --te-gated-fix found: a stale kernel transpose confirms the diagnosis
        if isinstance(r.get("te_gated_fix"), dict):
            lines.append(f"te_gated_fix, {r['name']} {r['kind']}: {r['te_gated_fix']}")
    return lines


TARGET = 1.3   # FP8 tokens/s over BF16's (issue 5)


def profile_tables(rows: list[dict]) -> list[str]:
    lines = []
    for name in dict.fromkeys(r["name"] for r in rows):
        pair = {r["kind"]: r for r in rows if r["name"] == name and "error" not in r
                and (r.get("profile") or {}).get("ms_per_step_by_category")}
        bf16, fp8 = pair.get("megatron-bf16"), pair.get("megatron-fp8")
        if not (bf16 and fp8):
            continue
        cb, cf = bf16["profile"]["ms_per_step_by_category"], fp8["profile"]["ms_per_step_by_category"]
        lines += [f"\n{name}: GPU ms a step by kernel category (micro-batch {fp8.get('micro_batch_size')}, "
                  f"cuda_graph {fp8.get('cuda_graph')})", "| category | BF16 | FP8 | FP8 - BF16 |", "|---|---|---|---|"]
        for cat in sorted(set(cb) | set(cf), key=lambda c: -max(cb.get(c, 0), cf.get(c, 0))):
            b, f = cb.get(cat, 0.0), cf.get(cat, 0.0)
            lines.append(f"| {cat} | {b:.1f} | {f:.1f} | {f - b:+.1f} |")
        lines.append(f"| GPU busy / wall | {bf16['profile']['gpu_busy_ms_per_step']:.0f} / "
                     f"{bf16['profile']['wall_ms_per_step']:.0f} | {fp8['profile']['gpu_busy_ms_per_step']:.0f} / "
                     f"{fp8['profile']['wall_ms_per_step']:.0f} | |")
        need = bf16["ms_per_step"] / TARGET
        lines.append(f"timed steps: BF16 {bf16['ms_per_step']:.1f} ms, FP8 {fp8['ms_per_step']:.1f} ms "
                     f"({bf16['ms_per_step'] / fp8['ms_per_step']:.3f}x); {TARGET}x needs an FP8 step of "
                     f"<= {need:.1f} ms ({fp8['ms_per_step'] - need:+.1f} ms to go), or a time both "
                     f"steps lose alike of {max(0.0, (TARGET * fp8['ms_per_step'] - bf16['ms_per_step']) / (TARGET - 1)):.0f} ms")
    return lines


def steps(out: Path, name: str) -> list[dict] | None:
    path = out / f"steps_{name}.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else None


def median(rows: list[dict], key: str):
    v = [r[key] for r in rows[1:] if r.get(key) is not None]   # step 1 includes warm-up
    return statistics.median(v) if v else None


def train_comparison(out: Path, names: list[str]) -> list[str]:
    if not names:
        return []
    ref = steps(out, names[0])
    if not ref:
        return [f"no steps log of the reference run {names[0]!r}"]
    lines = [f"{names[0]}: " + str([(r["step"], round(r["loss"], 4)) for r in ref[::5]])
             + f", valid {ref[-1].get('valid_loss')}, median tok/s {median(ref, 'tokens_per_s')}"]
    keys = ("loss", "grad_norm", "lr", "valid_loss")   # valid_loss: at the evaluation steps
    for name in names[1:]:
        other = steps(out, name)
        if other is None:
            lines.append(f"{name}: no steps log")
            continue
        same = [r["step"] for r, s in zip(ref, other) if all(r.get(k) == s.get(k) for k in keys)]
        worst = max((abs(r["loss"] - s["loss"]) for r, s in zip(ref, other)), default=None)
        lines.append(f"{name}: {len(other)} rows; identical (loss, grad norm, lr, valid loss) at {len(same)}/{len(ref)} "
                     f"steps; largest loss difference {worst}; median tok/s {median(other, 'tokens_per_s')}")
        lines.append("  first differences: " + str([(r["step"], r["loss"], s["loss"]) for r, s in zip(ref, other)
                                                   if r["loss"] != s["loss"]][:5]))
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out = Path(argv[0])
    rows = bench_rows(out)
    print("\n".join((bench_table(rows) if rows else ["no benchmark results"]) + profile_tables(rows)
                    + train_comparison(out, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
