#!/usr/bin/env bash
# 2026-12-03 (issue 12): decode_tail, one persistent launch for a block's projections after its
# attention and the next block's QKV at batch 1 (csrc/decode_tail.cu). Build, the CUDA tests of
# the decode path, decode_tail alone and the step's kernels (eager, exact times), then bench decode with the fused
# tail against the decode_linear launches (OPTIMUS_DECODE_TAIL=0) in the same process, and the
# default bench (transformers beside it when HF=1). Needs .carry/tiktoken_cache. PART: a
# comma-separated subset of tests,kernels,bench (default all); stages limited by TEST_LIMIT_S,
# BENCH_LIMIT_S; TESTS overrides the test files.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
PART="${PART:-tests,kernels,bench}"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage "build: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
if [[ ",$PART," == *",tests,"* ]]; then
  stage "CUDA tests"
  timeout "${TEST_LIMIT_S:-240}" python3 -m pytest -q -p no:cacheprovider -x ${TESTS:-tests/test_decode_tail.py \
      tests/test_decode_linear.py tests/test_sample.py tests/test_rope_append_attention.py tests/test_decode_attention.py \
      tests/test_model.py tests/test_serve.py} -k cuda 2>&1 | grep -v "Warn\|warn(" | tail -15
fi
if [[ ",$PART," == *",kernels,"* ]]; then
  stage "decode_tail alone against the decode_linear launches"
  timeout 60 python3 tools/bench_decode_tail.py 2>&1 | grep -v "Warn\|warn("
  stage "one step's kernels, eager (exact times), batch 1"
  timeout 90 python3 tools/step_kernels.py --eager --batches 1 --top 12 2>&1 | grep -v "Warn\|warn("
fi
if [[ ",$PART," == *",bench,"* ]]; then
  stage "bench decode, batch 1: the fused tail, then the decode_linear launches (OPTIMUS_DECODE_TAIL=0), twice"
  timeout 120 python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import os, torch, bench
for setting in ("1", "0", "1", "0"):
    os.environ["OPTIMUS_DECODE_TAIL"] = setting
    rows = [r for r in bench.bench_decode(torch.device("cuda"), hf=False, profile=False, batches=(1,)) if r.get("decode_linear")]
    print("OPTIMUS_DECODE_TAIL", setting, bench.format_table(rows), flush=True)
PY
  unset OPTIMUS_DECODE_TAIL
  stage "bench decode (transformers beside it: ${HF:-0})"
  timeout "${BENCH_LIMIT_S:-240}" python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import os, torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=os.environ.get("HF", "0") == "1", profile=os.environ.get("PROFILE", "0") == "1")
print(bench.format_table(rows))
PY
fi
stage done
