#!/usr/bin/env bash
# 2026-12-02, third session (issue 12): the sampling inside the decode graph (Decoder.sample_step)
# and the coherent loads of earlier kernels' outputs (pdl.h): the CUDA tests of the decode path,
# then bench decode at batch 1 and 16 with transformers beside it. Needs .carry/tiktoken_cache.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage "build: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
stage "CUDA tests"
timeout "${TEST_LIMIT_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_rope_append_attention.py \
    tests/test_sample.py tests/test_decode_linear.py tests/test_decode_attention.py tests/test_model.py -k cuda 2>&1 | tail -6
stage "bench decode (transformers beside it: ${HF:-1})"
timeout "${BENCH_LIMIT_S:-240}" python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import os, torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=os.environ.get("HF", "1") == "1", profile=False)
print(bench.format_table(rows))
PY
stage done
