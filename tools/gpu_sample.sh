#!/usr/bin/env bash
# The sampling kernel on a GPU: build, its CUDA tests, then tools/bench_sample.py (timings and the
# draws' total variation). Everything it prints also lands in $OUT/sample.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
LOG="${OUT:-/tmp}/sample.txt"
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
  python3 -c "import optimus, time; t=time.time(); optimus.load_extension(); print(f'built in {time.time()-t:.0f} s')"
  # -k: the CUDA tests of the sampler (the greedy decoding ones never sample: gpu_decode.sh runs them)
  timeout 50 python3 -m pytest -q -rfEs --tb=line tests/test_sample.py -k "cuda and not graph_decoding and not default_model" 2>&1 | tail -40
  timeout 35 python3 tools/bench_sample.py
} 2>&1 | tee "$LOG"
