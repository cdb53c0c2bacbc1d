#!/usr/bin/env bash
# The GPU checks of the training engine, as run on the device machine (one H100/H200):
# the ~1B BF16/FP8 benchmark, then the pipeline's own torchrun entry on the default pack
# (bf16 auto-selected, NCCL, dist_checkpointing on GPU) with a kill-and-resume comparison.
# Needs megatron-core (+ pydantic) importable; results go to ${OUT:-/tmp/gpu_check}.
#   TE_DIR=DIR   first install Transformer Engine from DIR without an index
#                (infra/install_te_offline.sh says what DIR holds)
#   BENCH_MBS="8 16"   micro-batches at which BF16 and FP8 are also compared (the first
#                profiled: where the step's GPU time goes, and how much of it the GPU is busy)
#   BENCH_TC="cuda_graph_impl=local fp8_dot_product_attention=true"   TransformerConfig
#                fields tried one at a time, BF16 against FP8 at micro-batch 8 (train_gpu.py --tc)
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
python3 bench/train_gpu.py --steps 10 --json "$OUT/train_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
compare() {  # compare NAME ARGS...: megatron BF16 against FP8, results under $OUT/*_NAME.*
  local name=$1; shift
  python3 bench/train_gpu.py --steps 10 --only megatron-bf16 --only megatron-fp8 "$@" \
    --json "$OUT/train_gpu_$name.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_$name.log"
}
profile=--profile
for mbs in ${BENCH_MBS-8 16}; do
  compare "mbs$mbs" $profile --set pretrain.micro_batch_size=$mbs
  profile=
done
for tc in ${BENCH_TC:-}; do
  compare "${tc%%=*}" --tc "$tc" --set pretrain.micro_batch_size=8
done

run() {  # run DIR [extra env]: 30 steps of the default pretrain on this GPU
  python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m model.train --phase pretrain \
    --params params.yaml --pack "$PACK" --out "$1" --steps-log "$1/steps.jsonl" \
    --set pretrain.steps=30 --set pretrain.save_interval=10 --set pretrain.eval_interval=10 \
    > "$1.log" 2>&1
  echo "run $1: exit $?"
}
mkdir -p /tmp/gpu_a /tmp/gpu_b
run /tmp/gpu_a
CODEWORLD_FAULT_KILL_AFTER_STEP=15 run /tmp/gpu_b
run /tmp/gpu_b
cp /tmp/gpu_a/steps.jsonl "$OUT/steps_uninterrupted.jsonl" 2>/dev/null
cp /tmp/gpu_b/steps.jsonl "$OUT/steps_resumed.jsonl" 2>/dev/null
grep -v -i warn /tmp/gpu_a.log | tail -5
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    a = [json.loads(l) for l in (out / "steps_uninterrupted.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (out / "steps_resumed.jsonl").read_text().splitlines()]
except OSError as err:
    sys.exit(f"no steps log: {err}")
print("uninterrupted:", [(r["step"], round(r["loss"], 4)) for r in a[::5]], "mfu", a[-1].get("mfu"), "tok/s", a[-1]["tokens_per_s"])
keys = ("loss", "grad_norm", "lr")
same = [r["step"] for r, s in zip(a, b) if all(r.get(k) == s.get(k) for k in keys)]
print(f"resumed run: {len(b)} rows; identical (loss, grad norm, lr) at {len(same)}/{len(a)} steps")
diff = [(r["step"], r["loss"], s["loss"]) for r, s in zip(a, b) if r["loss"] != s["loss"]]
print("first differences:", diff[:5])
PY
