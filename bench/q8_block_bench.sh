#!/bin/sh
# Builds and runs bench/q8_block_bench.cpp (the 8-bit block step per phase, AVX-512 build).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -c "
import importlib.util, torch
spec = importlib.util.spec_from_file_location('q', 'python/fusedopt/_quantization.py')
q = importlib.util.module_from_spec(spec); spec.loader.exec_module(q)
q.maps(torch.device('cpu')).numpy().tofile('/tmp/q8_maps.bin')"
g++ -O3 -fopenmp -fno-math-errno -fno-trapping-math -ffp-contract=off -mavx512f -mavx512bw -mavx512vl \
  -mavx512dq -mavx2 -mfma -mf16c -mprefer-vector-width=512 -DFUSEDOPT_ISA=avx512 -Icsrc \
  bench/q8_block_bench.cpp -o /tmp/q8_block_bench
/tmp/q8_block_bench /tmp/q8_maps.bin "$@"
