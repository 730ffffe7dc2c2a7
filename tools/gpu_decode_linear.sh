#!/usr/bin/env bash
# decode_linear on a GPU: build, its CUDA tests, its benchmark (tools/bench_decode_linear.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
python3 -c "import optimus, time; t=time.time(); optimus.load_extension(); print(f'built in {time.time()-t:.0f} s')"
python3 -m pytest -q -x -rs tests/test_decode_linear.py -k cuda 2>&1 | tail -5
python3 tools/bench_decode_linear.py
