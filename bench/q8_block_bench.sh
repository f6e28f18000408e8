#!/bin/sh
# Builds and runs bench/q8_block_bench.cpp (the 8-bit block step per phase, AVX-512 build;
# ISA=avx2 in the environment: the AVX2 build's, with the library's AVX2 flags).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -c "
import importlib.util, torch
spec = importlib.util.spec_from_file_location('q', 'python/fusedopt/_quantization.py')
q = importlib.util.module_from_spec(spec); spec.loader.exec_module(q)
q.maps(torch.device('cpu')).numpy().tofile('/tmp/q8_maps.bin')"
if [ "${ISA:-avx512}" = avx2 ]; then
  FLAGS="-mavx2 -mfma -mf16c -DFUSEDOPT_ISA=avx2"
else
  FLAGS="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mprefer-vector-width=512 -DFUSEDOPT_ISA=avx512"
fi
g++ -O3 -fopenmp -fno-math-errno -fno-trapping-math -ffp-contract=off $FLAGS -Icsrc \
  bench/q8_block_bench.cpp -o /tmp/q8_block_bench
/tmp/q8_block_bench /tmp/q8_maps.bin "$@"
