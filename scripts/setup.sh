#!/usr/bin/env bash
# Creates the virtual environment (default .venv, or $FUSEDOPT_VENV), installs torch if none
# is there, and builds + installs fusedopt into it. Sourced by test.sh and bench.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSEDOPT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
  # On this machine kind torch==2.13.0 is a CPU build on local disk; a bare `torch` would
  # pull a multi-GB CUDA build. Users with their own torch keep it (we need torch>=2.4).
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" numpy pytest matplotlib tqdm
# Test extras (not runtime requirements of fusedopt): trainer integration, the peer packages the
# algorithm tests compare against, and the large-batch demo's data (scikit-learn's digits).
# torch is held at the installed version, so no peer can replace it.
TORCH_PIN="$(mktemp)"
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN"
"$PY" -m pip install -q -c "$TORCH_PIN" "transformers==5.23.0" "accelerate==1.15.0" \
  "lion-pytorch==0.2.5" "torch-optimi==0.3.3" "schedulefree==1.4.1" "pytorch-optimizer==4.1.0" \
  "scikit-learn==1.9.1" "bitsandbytes==0.50.2"
rm -f "$TORCH_PIN"
# Build requirements are installed above, so no isolated build env (which would fetch them
# again); build/ keeps the CMake tree for incremental rebuilds.
"$PY" -m pip install -q --no-build-isolation "$ROOT"
