#!/usr/bin/env bash
# Makes a fresh machine ready: installs what is missing (never replaces an installed
# torch: GPU machines have a CUDA build) and builds the extension against that torch.
#   bash scripts/bootstrap.sh          # main job and tests
#   bash scripts/bootstrap.sh --bench  # also the benchmark baselines (ONNX Runtime)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
has() { "$PY" -c "import $1" 2>/dev/null; }

has torch || pip_install torch==2.13.0  # the CPU build; only when no torch is importable
need=()
for pkg in ninja pytest numpy tqdm; do has "$pkg" || need+=("$pkg"); done
has triton || need+=(triton)  # CPU machines: Triton's interpreter runs the Triton kernels' tests
# timm's EfficientViT is a conversion source; its torchvision import is stubbed in the tests
for pkg in yaml:pyyaml PIL:pillow huggingface_hub:huggingface_hub safetensors:safetensors; do
  has "${pkg%%:*}" || need+=("${pkg#*:}")
done
if [ "${1:-}" = "--bench" ]; then
  for pkg in onnx onnxruntime onnxscript pytest_benchmark:pytest-benchmark; do
    has "${pkg%%:*}" || need+=("${pkg#*:}")
  done
fi
[ ${#need[@]} -eq 0 ] || pip_install "${need[@]}"
has timm || pip_install --no-deps timm  # --no-deps: timm would pull torchvision and a second torch

# (Re)build the extension when it is missing or older than its sources.
so=$(ls efficientvit_kernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
fi
