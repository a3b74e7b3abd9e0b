#!/usr/bin/env bash
# Makes a fresh machine ready: installs what is missing (never replaces an installed
# torch: GPU machines have a CUDA build) and builds the extension against that torch.
#   bash scripts/bootstrap.sh           # the main job (python -m efficientvit_kernels)
#   bash scripts/bootstrap.sh --test    # and what the tests need (pytest, triton, timm, ...)
#   bash scripts/bootstrap.sh --bench   # and the benchmarks' baselines (ONNX Runtime)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TEST=0 BENCH=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    --bench) BENCH=1 ;;
    *) echo "bootstrap: unknown option $arg (use --test and/or --bench)" >&2; exit 2 ;;
  esac
done
say() { echo "bootstrap: $*" >&2; }
pip_install() { say "installing $*"; "$PY" -m pip install -q --disable-pip-version-check "$@"; }
has() { "$PY" -c "import $1" 2>/dev/null; }

if ! has torch; then
  say "no torch is importable: installing torch==2.13.0 (the CPU build)"
  pip_install torch==2.13.0
fi
need=()
has ninja || need+=(ninja)  # the build's
has tqdm || need+=(tqdm)  # the main job's progress bar
if [ "$TEST" = 1 ]; then
  for pkg in pytest numpy; do has "$pkg" || need+=("$pkg"); done
  has triton || need+=(triton)  # CPU machines: Triton's interpreter runs the Triton kernels' tests
  # timm's EfficientViT is a conversion source; its torchvision import is stubbed in the tests
  for pkg in yaml:pyyaml PIL:pillow huggingface_hub:huggingface_hub safetensors:safetensors; do
    has "${pkg%%:*}" || need+=("${pkg#*:}")
  done
fi
if [ "$BENCH" = 1 ]; then
  for pkg in onnx onnxruntime onnxscript; do has "$pkg" || need+=("$pkg"); done
fi
[ ${#need[@]} -eq 0 ] || pip_install "${need[@]}"
# (found, not imported: importing timm needs torchvision, which the tests stub)
if [ "$TEST" = 1 ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('timm'))"; then
  pip_install --no-deps timm  # --no-deps: timm would pull torchvision and a second torch
fi

# (Re)build the extension when it is missing or older than its sources, or when this checkout
# is not the one installed (an import from another directory would not find it).
so=$(ls efficientvit_kernels/_C*.so 2>/dev/null | head -n 1 || true)
installed=$(cd / && "$PY" -c "import efficientvit_kernels, os; print(os.path.dirname(os.path.dirname(efficientvit_kernels.__file__)))" 2>/dev/null || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ] ||
  [ "$installed" != "$(pwd -P)" ]; then
  say "building the extension against torch $("$PY" -c 'import torch; print(torch.__version__)') (a few minutes on 2 cores)"
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  say "built"
fi
