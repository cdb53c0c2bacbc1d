#!/usr/bin/env bash
# The GPU checks of the training engine, as run on the device machine (one H100/H200): the ~1B
# BF16/FP8 benchmark in its variants, and the pipeline's own torchrun entry on the default pack
# (precision auto-selected, NCCL, dist_checkpointing on GPU), in the order a plan file gives:
#   PLAN=bench/gpu_plans/full.txt (default)   everything, ~12 min on an H200
#   PLAN=bench/gpu_plans/graphs.txt           CUDA graphs and FP8 attention, ~9 min
#   PLAN=bench/gpu_plans/fp8_next.txt         the next levers for FP8 >= 1.3x on an H100, ~9 min
# Each plan line is `bench NAME ARGS` (bench/train_gpu.py --steps 10 ARGS), `train NAME
# [kill-after=N] ARGS` (30 steps of the default pretrain in /tmp/gpu_NAME; the first train
# line's run is the reference the others are compared with, step by step) or `export NAME`
# (train NAME's checkpoint as a Hugging Face folder, checked against transformers on the GPU)
# or `rl NAME FROM ARGS` (bench/rl_step_check.py: one GRPO update from train FROM's checkpoint
# on the default's RL pool: RL samples with the model it trains, in FP8 too).
# Needs megatron-core (+ pydantic) importable. Results go to ${OUT:-/tmp/gpu_check}, in at most
# 8 files (what the device machine returns) for a plan of at most 4 train names:
#   te_install.log, bench.log (every benchmark's table), bench.jsonl (a line per benchmark:
#   its name and train_gpu.py's results, each step's loss among them), pipeline.log (the runs'
#   exit codes, a failure's traceback, the comparisons) and steps_NAME.jsonl per train name.
#   TE_DIR=DIR   first install Transformer Engine from DIR without an index
#                (infra/install_te_offline.sh says what DIR holds; a wheel it builds is kept
#                in $OUT for the next session to carry)
#   PACK=DIR     the pack the train lines read (default data/pack)
#   KIT=DIR      all of it from one carried folder built by bench/device_kit.sh: its wheels
#                installed in /tmp/site, TE from DIR/te, and its data (pack, tokenizer, traces)
#                unpacked in /tmp/devdata, read by the train and export lines
# `bash bench/gpu_check.sh --check` only reads and checks the plan (no GPU needed).
set -u -f
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if [ -n "${KIT:-}" ]; then
  [ -r "$KIT/data.tgz" ] || { echo "gpu_check: $KIT/data.tgz missing: build the kit with bench/device_kit.sh" >&2; exit 2; }
  TE_DIR=${TE_DIR:-$KIT/te}; PACK=/tmp/devdata/data/pack; export DATA=/tmp/devdata/data
fi
PACK=${PACK:-data/pack}
PLAN=${PLAN:-bench/gpu_plans/full.txt}
export PYTHONUNBUFFERED=1
# the plan is read and checked before any work
[ -r "$PLAN" ] || { echo "gpu_check: no plan file $PLAN" >&2; exit 2; }
mapfile -t plan < <(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$PLAN")
for line in "${plan[@]}"; do
  read -r kind name _ <<< "$line"
  case "$kind" in bench|train|export|rl) ;; *) echo "$PLAN: '$kind' is not bench, train, export or rl, in: $line" >&2; exit 2 ;; esac
  [ -n "$name" ] || { echo "$PLAN: a $kind line without a name" >&2; exit 2; }
done
[ "${1:-}" != --check ] || { echo "$PLAN: ${#plan[@]} steps"; exit 0; }
say() { echo "[$SECONDS s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -n "${KIT:-}" ]; then
  # (globbing is off in this script: the kit's wheels are listed by find)
  mapfile -t wheels < <(find "$KIT/whl" -name '*.whl')
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p /tmp/devdata && tar -xzf "$KIT/data.tgz" -C /tmp/devdata || exit 1
fi
if [ -n "${TE_DIR:-}" ]; then
  TE_WHEEL_OUT=$OUT bash infra/install_te_offline.sh "$TE_DIR" /tmp/te-site > "$OUT/te_install.log" 2>&1 \
    || { tail -20 "$OUT/te_install.log"; exit 1; }
  tail -2 "$OUT/te_install.log"
  export PYTHONPATH=/tmp/te-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)"

bench() {  # bench NAME ARGS...: one train_gpu.py run, its table to bench.log, results to bench.jsonl
  local name=$1; shift
  say "bench $name: $*" | tee -a "$OUT/bench.log"
  python3 bench/train_gpu.py --steps 10 --timeout 200 "$@" --json /tmp/gpu_check_bench.json 2>&1 \
    | grep -v -i warn | tee -a "$OUT/bench.log"
  python3 -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "results": json.load(open(sys.argv[2]))}))' \
    "$name" /tmp/gpu_check_bench.json >> "$OUT/bench.jsonl" 2>/dev/null
  rm -f /tmp/gpu_check_bench.json
}

traceback() {  # traceback LOG: a failed torchrun's own traceback to pipeline.log, not
  # torchrun's summary of it (a kill by the fault injection has none); torchrun prefixes its
  # workers' lines with "[rank0]: "
  grep -v -i warn "$1" | grep -v ChildFailedError | grep -E -B12 -m1 "^(\[rank[0-9]+\]: )?[A-Za-z_.]*Error" \
    | tail -12 | tee -a "$OUT/pipeline.log"
}

train() {  # train NAME [kill-after=N] [--set ...]: 30 steps of the default pretrain on this GPU
  local name=$1 dir=/tmp/gpu_$1 fault=(); shift
  case "${1:-}" in kill-after=*) fault=("CODEWORLD_FAULT_KILL_AFTER_STEP=${1#kill-after=}"); shift;; esac
  mkdir -p "$dir"
  env "${fault[@]}" python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m model.train \
    --phase pretrain --params params.yaml --pack "$PACK" --out "$dir" --steps-log "$dir/steps.jsonl" \
    --set pretrain.steps=30 --set pretrain.save_interval=10 --set pretrain.eval_interval=10 \
    "$@" > "$dir.log" 2>&1 < /dev/null
  local rc=$?
  say "train $name ${fault[*]} $*: exit $rc" | tee -a "$OUT/pipeline.log"
  [ $rc -eq 0 ] || traceback "$dir.log"
  cp "$dir/steps.jsonl" "$OUT/steps_$name.jsonl" 2>/dev/null
}

export_() {  # export NAME: train NAME's checkpoint through `codeworld export` on this GPU (the
  # TE spec's names, BF16 against transformers' BF16, tolerance_bf16); needs transformers and
  # safetensors importable and DATA (default data) holding the tokenizer and the traces
  local name=$1
  python3 -m codeworld.cli export --checkpoint "/tmp/gpu_$name" --out "/tmp/gpu_${name}_hf" \
    --params <(sed "s|^  root: data |  root: ${DATA:-data} |" params.yaml) > "/tmp/gpu_export_$name.log" 2>&1 < /dev/null
  say "export $name: exit $?" | tee -a "$OUT/pipeline.log"
  grep -v -i warn "/tmp/gpu_export_$name.log" | tail -4 | tee -a "$OUT/pipeline.log"
}

rl() {  # rl NAME FROM [--set ...]: one forced GRPO update from train FROM's checkpoint
  # (bench/rl_step_check.py: real sampling with the model set up for the precision, then a
  # step on padded rows and one on unpadded rows)
  local name=$1 from=$2 log=/tmp/gpu_rl_$1.log; shift 2
  sed "s|^  root: data |  root: ${DATA:-data} |" params.yaml > "/tmp/gpu_rl_$name.params.yaml"
  python3 -m torch.distributed.run --standalone --nproc-per-node=1 bench/rl_step_check.py \
    --params "/tmp/gpu_rl_$name.params.yaml" --pool "${DATA:-data}/checkpoints/rl/pool.jsonl" \
    --init-from "/tmp/gpu_$from" --unpadded "$@" > "$log" 2>&1 < /dev/null
  local rc=$?
  say "rl $name from $from $*: exit $rc" | tee -a "$OUT/pipeline.log"
  grep -m1 "^RL_STEP" "$log" | tee -a "$OUT/pipeline.log"
  [ $rc -eq 0 ] || traceback "$log"
}

trains=()
for line in "${plan[@]}"; do
  read -r kind name args <<< "$line"
  case "$kind" in
    bench) bench "$name" $args < /dev/null ;;
    train) train "$name" $args; [[ " ${trains[*]-} " == *" $name "* ]] || trains+=("$name") ;;
    export) export_ "$name" ;;
    rl) rl "$name" $args ;;
  esac
done
say "plan done"
python3 bench/gpu_summary.py "$OUT" "${trains[@]}" 2>&1 | tee -a "$OUT/pipeline.log"
