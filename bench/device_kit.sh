#!/usr/bin/env bash
# Build .devkit/, the one folder a device call carries for bench/gpu_check.sh (the device
# machine has torch and CUDA but no package index, no megatron-core and no project data):
#   .devkit/te/        Transformer Engine 2.11.0: the Python wheel, the core wheel cut to
#                      sm_90 (infra/te_slim_wheel.py: 179 -> 29 MB) and the extension's sdist
#                      (infra/install_te_offline.sh builds it there, ~1.5 min on 16 cores;
#                      the wheel it built comes back in the call's $OUT: copied into
#                      .devkit/te/, it is installed in seconds by the next call, as long as
#                      the device's torch is the same: 1.3 MB, cp312, torch 2.11.0+cu130)
#   .devkit/whl/       the wheels the training and export paths import that the device image
#                      lacks, at this venv's versions, for CPython 3.12 on x86-64
#   .devkit/data.tgz   data/pack, data/tokenizer, data/traces and RL's task pool
#                      (data/checkpoints/rl/pool.jsonl) of a finished `make run`
# then checks the whole kit fits a call beside the working tree (64 MiB together). The device
# call (run with carry [".devkit"]):
#   KIT=.devkit PLAN=bench/gpu_plans/fp8_next.txt bash bench/gpu_check.sh
# Needs network (pip download) and a finished `make run`. Rerunning reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.devkit}
VENV_PY=${VENV_PY:-.venv/bin/python}
LIMIT_MB=${LIMIT_MB:-60}   # of the call's 64 MiB, the rest for the working tree
# What the image (/work/.library/device/KINDS.md's package list) lacks or may hold too old,
# found by importing model.train, stages.export and codeworld.cli in this venv and reading
# each wheel's Requires-Dist. The image's huggingface-hub (1.33) is new enough for
# transformers 5.23 (>= 1.31), and ours would need httpx2, which the image lacks; its numpy,
# torch, yaml, fsspec, tqdm, typer... are used as they are.
PACKAGES=(megatron-core pydantic pydantic-core annotated-types typing-inspection
          typing-extensions webdataset braceexpand transformers safetensors tokenizers regex)
# TE 2.11.0 is what megatron-core 0.16.1 admits (< 2.12). TE 2.12 fixed the fused gated
# activation's FP8 transpose (NVIDIA/TransformerEngine#2486; bench/te_gated_fix.py repairs
# it on 2.11): to try a newer TE against megatron-core 0.16.1 anyway, build a second kit, e.g.
#   KIT=.devkit-te212 TE_VERSION=2.12.0 bash bench/device_kit.sh   (then carry [".devkit-te212"])
TE_VERSION=${TE_VERSION:-2.11.0}

for f in data/pack/manifest.json data/tokenizer data/traces/manifest.json data/checkpoints/rl/pool.jsonl; do
  [ -e "$f" ] || { echo "device_kit: $f missing: run \`make run\` first" >&2; exit 2; }
done
mkdir -p "$KIT/te" "$KIT/whl"
download() {  # download DIR SPEC...: wheels for the device's CPython 3.12 on x86-64
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }  # this machine's pip.conf's local mirrors
}
pins=()
for p in "${PACKAGES[@]}"; do
  v=$("$VENV_PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$p")
  pins+=("$p==$v")
done
download "$KIT/whl" "${pins[@]}"

shopt -s nullglob
download "$KIT/te" "transformer_engine==$TE_VERSION"
sdist=("$KIT"/te/transformer_engine_torch-*.tar.gz)
# pip would build the sdist's metadata to download it (which needs torch and CUDA here): the
# file is taken from PyPI's JSON API instead, checked against the sha256 PyPI gives
[ ${#sdist[@]} -eq 1 ] || python3 - "$KIT/te" "$TE_VERSION" <<'PY'
import hashlib, json, sys, urllib.parse, urllib.request
from pathlib import Path
dest, version = Path(sys.argv[1]), sys.argv[2]
index = "https://pypi.org/pypi/transformer-engine-torch/json"
with urllib.request.urlopen(index) as r:
    (src,) = [u for u in json.load(r)["releases"][version] if u["packagetype"] == "sdist"]
data = urllib.request.urlopen(urllib.parse.urljoin(index, src["url"])).read()  # a mirror's may be relative
if hashlib.sha256(data).hexdigest() != src["digests"]["sha256"]:
    sys.exit(f"device_kit: {src['filename']}: sha256 differs from PyPI's")
(dest / (src["filename"] + ".tmp")).write_bytes(data)
(dest / (src["filename"] + ".tmp")).rename(dest / src["filename"])
PY
slim=("$KIT"/te/transformer_engine_cu13-*.whl)
if [ ${#slim[@]} -eq 0 ]; then  # the 179 MB core wheel, cut to Hopper outside the kit
  tmp=$(mktemp -d)
  download "$tmp" "transformer_engine_cu13==$TE_VERSION"
  python3 infra/te_slim_wheel.py "$tmp"/transformer_engine_cu13-*.whl --arch 90 -o "$KIT/te"
  rm -rf "$tmp"
fi

[ -s "$KIT/data.tgz" ] && [ "$KIT/data.tgz" -nt data/pack/manifest.json ] \
  && [ "$KIT/data.tgz" -nt data/traces/manifest.json ] \
  && [ "$KIT/data.tgz" -nt data/checkpoints/rl/pool.jsonl ] || {
  tar -czf "$KIT/data.tgz.tmp" data/pack data/tokenizer data/traces data/checkpoints/rl/pool.jsonl
  mv "$KIT/data.tgz.tmp" "$KIT/data.tgz"
}

grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
kb=$(du -sk "$KIT" | cut -f1)
du -sh "$KIT"/te "$KIT"/whl "$KIT"/data.tgz
if [ "$kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "device_kit: $KIT is $((kb / 1024)) MiB, over $LIMIT_MB MiB: a device call would refuse it" >&2
  exit 1
fi
echo "device_kit: $KIT ready, $((kb / 1024)) MiB; run with carry [\"$KIT\"]:"
echo "  KIT=$KIT PLAN=bench/gpu_plans/fp8_next.txt bash bench/gpu_check.sh"
