#!/usr/bin/env bash
# One command for a GPU machine: builds fusedopt with its CUDA module, prints the config,
# runs the whole test suite (CUDA tests included), compute-sanitizer on a small case, and the
# benchmark on the GPU.
#
#   bash scripts/gpu_test.sh [extra pytest args]
#
# Needs a Python with torch (CUDA build), numpy, pytest, pybind11 and scikit-build-core, plus
# cmake and nvcc; it downloads nothing (pip runs with --no-build-isolation --no-deps).
# Environment:
#   PYTHON               interpreter to build and test with (default: python3)
#   FUSEDOPT_CUDA_ARCHS  CUDA architectures to compile (default: 90, i.e. H100/H200)
#   FUSEDOPT_TEST_HUGE   1 (default here): also run the > 2**31-element test if memory allows
#   SANITIZER_TOOLS      compute-sanitizer tools to run (default: "memcheck racecheck")
#   OUT                  directory for the logs (default: build/gpu-test-logs)
# Exit status: 0 when every stage passed; otherwise the number of failed stages.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
LOGS="${OUT:-$ROOT/build/gpu-test-logs}"
mkdir -p "$LOGS"
export FUSEDOPT_CUDA=ON
export FUSEDOPT_CUDA_ARCHS="${FUSEDOPT_CUDA_ARCHS:-90}"
export FUSEDOPT_TEST_HUGE="${FUSEDOPT_TEST_HUGE:-1}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
SANITIZER_TOOLS="${SANITIZER_TOOLS:-memcheck racecheck}"

# nvcc and compute-sanitizer usually live in /usr/local/cuda/bin, which is not always on PATH.
for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin; do
  if [ -d "$dir" ] && [[ ":$PATH:" != *":$dir:"* ]]; then
    PATH="$PATH:$dir"
  fi
done
export PATH

failed=()
# run_stage NAME CMD...: runs CMD, its output shown and kept in $LOGS/NAME.log.
run_stage() {
  local name="$1"; shift
  echo "==== $name: $*" | tee "$LOGS/$name.log"
  "$@" 2>&1 | tee -a "$LOGS/$name.log"
  local status=${PIPESTATUS[0]}
  echo "==== $name: exit $status" | tee -a "$LOGS/$name.log"
  if [ "$status" -ne 0 ]; then
    failed+=("$name")
  fi
  return "$status"
}

summary() {
  echo
  echo "logs: $LOGS"
  if [ "${#failed[@]}" -eq 0 ]; then
    echo "gpu_test: all stages passed"
  else
    echo "gpu_test: FAILED stages: ${failed[*]}"
  fi
}
trap summary EXIT

# ---- the machine -----------------------------------------------------------------------------
{
  command -v nvidia-smi >/dev/null && nvidia-smi
  command -v nvcc >/dev/null && nvcc --version || echo "nvcc: not found on PATH"
  command -v cmake >/dev/null && cmake --version | head -1 || echo "cmake: not on PATH (the cmake Python package may still provide it)"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} 2>&1 | tee "$LOGS/machine.log"

# ---- build and install (CUDA module required) ------------------------------------------------
# A build tree of its own (build/gpu-<wheel tag>), so a CPU-only build elsewhere in build/ is
# neither reused nor disturbed.
if ! run_stage build "$PY" -m pip install --no-build-isolation --no-deps -v \
    --config-settings=build-dir="build/gpu-{wheel_tag}" .; then
  echo "gpu_test: the build failed; see $LOGS/build.log (is nvcc on PATH? is the Python externally managed?" \
       "then set PIP_BREAK_SYSTEM_PACKAGES=1 or use a virtual environment with --system-site-packages)"
  exit 1
fi

# The tests run against the installed package: run them from the repository root, where
# python/fusedopt is not importable as `fusedopt`, and check that the CUDA module is there
# (otherwise every CUDA test would merely skip).
if ! run_stage config "$PY" -m fusedopt; then
  exit 1
fi
if ! run_stage cuda-module "$PY" -c "
import torch, fusedopt, fusedopt._backend as B
print('fusedopt from', fusedopt.__file__)
assert torch.cuda.is_available(), 'torch sees no CUDA device'
assert B.cuda_built(), 'fusedopt._C_cuda is missing: the CUDA tests would all be skipped'
print('CUDA module archs', B.cuda_module().archs())
"; then
  exit 1
fi

# ---- the whole suite ---------------------------------------------------------------------------
run_stage pytest "$PY" -m pytest -m "cuda or not cuda" -ra --durations=15 \
  --junitxml="$LOGS/pytest.xml" "$@"

# ---- compute-sanitizer ---------------------------------------------------------------------------
# Without torch's caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1): it rounds every tensor
# up to a 512-byte block carved from a larger segment, so an access a few elements past a
# tensor stays inside memory the sanitizer considers allocated and goes unreported. With a
# cudaMalloc per tensor, the first byte past each one is out of bounds.
if command -v compute-sanitizer >/dev/null; then
  for tool in $SANITIZER_TOOLS; do
    run_stage "sanitizer-$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 1 --log-file "$LOGS/sanitizer-$tool.report" "$PY" scripts/memcheck_case.py
    cat "$LOGS/sanitizer-$tool.report" 2>/dev/null | tail -20
  done
else
  echo "gpu_test: compute-sanitizer not found (PATH, /usr/local/cuda/bin): sanitizer stage skipped" \
    | tee "$LOGS/sanitizer-skipped.log"
fi

# ---- the benchmark on the GPU (results to commit under bench/results/) -------------------------
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo gpu)
run_stage bench "$PY" -m fusedopt.bench --device cuda --no-progress \
  --json "$LOGS/cuda-$GPU_NAME.json" --plot "$LOGS/cuda-$GPU_NAME.png"
echo "gpu_test: copy $LOGS/cuda-$GPU_NAME.json into bench/results/ and run python bench/update_readme.py"

exit "${#failed[@]}"
