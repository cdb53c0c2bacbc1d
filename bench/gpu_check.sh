#!/usr/bin/env bash
# The GPU checks of the training engine, as run on the device machine (one H100/H200):
# the ~1B BF16/FP8 benchmark, then the pipeline's own torchrun entry on the default pack
# (precision auto-selected, NCCL, dist_checkpointing on GPU) with a kill-and-resume comparison.
# Needs megatron-core (+ pydantic) importable. Results go to ${OUT:-/tmp/gpu_check}, in at most
# 7 files (the device machine returns 8): te_install.log, bench.log (every benchmark's table),
# bench.jsonl (a line per benchmark run: its name and train_gpu.py's results), pipeline.log and
# the pipeline runs' steps_*.jsonl.
#   TE_DIR=DIR   first install Transformer Engine from DIR without an index
#                (infra/install_te_offline.sh says what DIR holds)
#   BENCH_BASE=0   skip the first benchmark run (plain PyTorch, BF16 and FP8 at micro-batch 4)
#   BENCH_MBS="8 16"   micro-batches at which BF16 and FP8 are also compared (the first
#                profiled: where the step's GPU time goes, and how much of it the GPU is busy)
#   BENCH_GRAPH="full_iteration layer"   CUDA graph modes (pretrain.cuda_graph) tried one at a
#                time, BF16 against FP8 at micro-batch ${GRAPH_MBS:-8}, the first profiled
#   BENCH_TC="fp8_dot_product_attention=true"   TransformerConfig fields tried one at a time,
#                BF16 against FP8 at micro-batch 8 (train_gpu.py --tc); none by default
#   PIPELINE_GRAPH=full_iteration   the pipeline part also trains the default pretrain in this
#                CUDA graph mode and compares its losses and speed with the eager run's
#                (PIPELINE_GRAPH= skips it)
# Each benchmark run of two configs takes ~1 min on an H200, the pipeline part ~3 min, the TE
# install ~1.5 min: all of it passes a device call's 10 minutes. One call that fits:
#   TE_DIR=DIR BENCH_BASE=0 BENCH_MBS=16 bash bench/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PACK=${PACK:-data/pack}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -n "${TE_DIR:-}" ]; then
  bash infra/install_te_offline.sh "$TE_DIR" /tmp/te-site > "$OUT/te_install.log" 2>&1 \
    || { tail -20 "$OUT/te_install.log"; exit 1; }
  tail -1 "$OUT/te_install.log"
  export PYTHONPATH=/tmp/te-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)"

bench() {  # bench NAME ARGS...: one train_gpu.py run, its table to bench.log, results to bench.jsonl
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/bench.log"
  python3 bench/train_gpu.py --steps 10 "$@" --json /tmp/gpu_check_bench.json 2>&1 \
    | grep -v -i warn | tee -a "$OUT/bench.log"
  python3 -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "results": json.load(open(sys.argv[2]))}))' \
    "$name" /tmp/gpu_check_bench.json >> "$OUT/bench.jsonl" 2>/dev/null
  rm -f /tmp/gpu_check_bench.json
}
compare() { bench "$1" --only megatron-bf16 --only megatron-fp8 "${@:2}"; }   # BF16 against FP8

[ "${BENCH_BASE:-1}" = 0 ] || bench all
profile=--profile
for mbs in ${BENCH_MBS-8 16}; do
  compare "mbs$mbs" $profile --set pretrain.micro_batch_size=$mbs
  profile=
done
profile=--profile
for graph in ${BENCH_GRAPH-full_iteration layer}; do
  compare "graph_$graph" $profile --set pretrain.cuda_graph=\"$graph\" \
    --set pretrain.micro_batch_size=${GRAPH_MBS:-8}
  profile=
done
for tc in ${BENCH_TC:-}; do
  compare "${tc%%=*}" --tc "$tc" --set pretrain.micro_batch_size=8
done

run() {  # run DIR [--set ...]: 30 steps of the default pretrain on this GPU
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m model.train --phase pretrain \
    --params params.yaml --pack "$PACK" --out "$dir" --steps-log "$dir/steps.jsonl" \
    --set pretrain.steps=30 --set pretrain.save_interval=10 --set pretrain.eval_interval=10 \
    "$@" > "$dir.log" 2>&1
  local rc=$?
  echo "run $dir $*: exit $rc" | tee -a "$OUT/pipeline.log"
  # a failure's own traceback, not torchrun's summary of it (a kill by the fault injection has none)
  [ $rc -eq 0 ] || grep -v -i warn "$dir.log" | grep -v ChildFailedError | grep -B12 -m1 "^[A-Za-z_.]*Error" \
    | tail -12 | tee -a "$OUT/pipeline.log"
}
run /tmp/gpu_a
CODEWORLD_FAULT_KILL_AFTER_STEP=15 run /tmp/gpu_b
run /tmp/gpu_b
cp /tmp/gpu_a/steps.jsonl "$OUT/steps_uninterrupted.jsonl" 2>/dev/null
cp /tmp/gpu_b/steps.jsonl "$OUT/steps_resumed.jsonl" 2>/dev/null
if [ -n "${PIPELINE_GRAPH-full_iteration}" ]; then
  run /tmp/gpu_c --set pretrain.cuda_graph=\"${PIPELINE_GRAPH-full_iteration}\"
  cp /tmp/gpu_c/steps.jsonl "$OUT/steps_graph.jsonl" 2>/dev/null
fi
grep -v -i warn /tmp/gpu_a.log | tail -5
python3 - "$OUT" <<'PY' 2>&1 | tee -a "$OUT/pipeline.log"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    path = out / name
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else None
def median(rs, key):
    v = sorted(r[key] for r in rs[1:])   # step 1 includes warm-up
    return v[len(v) // 2] if v else None
a, b, c = rows("steps_uninterrupted.jsonl"), rows("steps_resumed.jsonl"), rows("steps_graph.jsonl")
if not a:
    sys.exit("no steps log of the uninterrupted run")
print("uninterrupted:", [(r["step"], round(r["loss"], 4)) for r in a[::5]], "mfu", a[-1].get("mfu"),
      "median tok/s", median(a, "tokens_per_s"))
keys = ("loss", "grad_norm", "lr")
for name, other in (("resumed", b), ("cuda_graph", c)):
    if other is None:
        continue
    same = [r["step"] for r, s in zip(a, other) if all(r.get(k) == s.get(k) for k in keys)]
    worst = max((abs(r["loss"] - s["loss"]) for r, s in zip(a, other)), default=None)
    print(f"{name} run: {len(other)} rows; identical (loss, grad norm, lr) at {len(same)}/{len(a)} "
          f"steps; largest loss difference {worst}; median tok/s {median(other, 'tokens_per_s')}")
    print("  first differences:", [(r["step"], r["loss"], s["loss"]) for r, s in zip(a, other)
                                   if r["loss"] != s["loss"]][:5])
PY
