#!/usr/bin/env bash
# Issue 13 in one GPU call (under 300 s): build the extension, run the CUDA tests of the fused
# linear + cross-entropy and of the trainer, then `bench.py --only train` (Optimus beside
# transformers), the most telling cases first, cut off in time. Results in $OUT (default ./out):
# log lines here, train.json when the bench finishes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="$PWD/.ext"
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LIMIT="${GPU_LIMIT_S:-290}"  # the whole script, in seconds
PATH="$PATH:$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
failed=0

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "--- build ($SECONDS s)"
timeout 170 "$PY" -c "
import time, torch, optimus
start = time.time()
optimus.load_extension()
print(f'built in {time.time() - start:.0f} s; status {optimus.extension_status()}')
print('cross_entropy_fwd_bwd CUDA kernel:', torch._C._dispatch_has_kernel_for_dispatch_key('optimus::cross_entropy_fwd_bwd', 'CUDA'))
" || failed=1

echo "--- tests ($SECONDS s)"
timeout 75 "$PY" -m pytest -q -x -rs tests/test_kernels.py tests/test_train.py \
  -k "cuda and (cross_entropy or linear_cross or loss or model_ or registered or autocast or follows or swiglu)" || failed=1

echo "--- bench train ($SECONDS s)"
timeout $((LIMIT - SECONDS)) "$PY" bench.py --device cuda --only train --json "$OUT/train.json" \
  --train_cases "${TRAIN_CASES:-b8-ckpt,b64,b8}" 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "--- summary ($SECONDS s, failed=$failed)"
grep "^train " "$OUT/bench.txt" || true
exit $failed
