#!/usr/bin/env bash
# Install Transformer Engine 2.11.0 without a package index, into TARGET (a --target folder put
# on PYTHONPATH; default /tmp/te-site), from a folder DIR holding:
#   transformer_engine-2.11.0-py3-none-any.whl          (the Python side)
#   transformer_engine_cu13-2.11.0-*.whl                 (the core; infra/te_slim_wheel.py can
#                                                         cut it to your GPU's architectures)
#   transformer_engine_torch-2.11.0.tar.gz               (the PyTorch extension, an sdist)
#   transformer_engine_torch-2.11.0-*linux_x86_64.whl    (optional: the extension as built
#                                                         earlier on a machine like this one)
# The extension is compiled here against the installed torch: C++ only, ~1.5 min on 16 cores
# (H200 machine, docs/gpu-h200-2026-11-26.md). Needs a CUDA toolkit (CUDA_HOME or nvcc on PATH)
# and cuDNN's headers, found in the nvidia-cudnn wheel next to torch when not on the system.
# A built wheel in DIR is tried first and kept only if TE then imports (an extension built
# against another torch fails to load); else it is built, and the wheel it built is copied to
# $TE_WHEEL_OUT when set, to be carried next time.
#
#   bash infra/install_te_offline.sh DIR [TARGET] && export PYTHONPATH=TARGET:$PYTHONPATH
set -euo pipefail
DIR=${1:?usage: install_te_offline.sh DIR [TARGET]}
TARGET=${2:-/tmp/te-site}
PY=${PYTHON:-python3}
shopt -s nullglob
core=("$DIR"/transformer_engine_cu13-*.whl)
meta=("$DIR"/transformer_engine-*-py3-none-any.whl)
sdist=("$DIR"/transformer_engine_torch-*.tar.gz)
for what in core meta sdist; do
  declare -n found=$what
  [ ${#found[@]} -eq 1 ] || { echo "install_te_offline: need exactly one $what file in $DIR" >&2; exit 2; }
done
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$TARGET" "${meta[0]}" "${core[0]}"

check() {  # TE importable from TARGET, its extension loaded
  PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    "import transformer_engine as te, transformer_engine.pytorch; print('transformer_engine', te.__version__, 'installed in $TARGET')"
}
built=("$DIR"/transformer_engine_torch-*linux_x86_64.whl)
if [ ${#built[@]} -eq 1 ]; then
  "$PY" -m zipfile -e "${built[0]}" "$TARGET"
  if check 2>/dev/null; then echo "(extension: the built wheel ${built[0]##*/})"; exit 0; fi
  echo "install_te_offline: ${built[0]##*/} does not load here; building the extension" >&2
fi

cudnn_h=$(find /usr/include /usr/local/cuda/include \
  "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  -name cudnn.h 2>/dev/null | head -1)
[ -n "$cudnn_h" ] || { echo "install_te_offline: cudnn.h not found (install cuDNN or nvidia-cudnn)" >&2; exit 2; }
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar xzf "${sdist[0]}" -C "$build"
# FORCE_BUILD: its setup.py otherwise first tries to download a prebuilt wheel from GitHub.
( cd "$build"/transformer_engine_torch-* && \
  NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-$(nproc)} CPATH=$(dirname "$cudnn_h")${CPATH:+:$CPATH} \
  "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-index -w "$build/wheel" . )
# Unpacked, not pip-installed: `pip install --target` would replace the transformer_engine/
# folder the two wheels above share with it, or (without --upgrade) skip the extension.
"$PY" -m zipfile -e "$build"/wheel/transformer_engine_torch-*.whl "$TARGET"
[ -z "${TE_WHEEL_OUT:-}" ] || cp "$build"/wheel/transformer_engine_torch-*.whl "$TE_WHEEL_OUT"
check
