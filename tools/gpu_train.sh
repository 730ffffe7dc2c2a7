#!/usr/bin/env bash
# Issue 13's step in a CUDA graph and the lean optimizer step, in one GPU call (under 240 s):
# build the extension, run the CUDA graph tests of the trainer, then `bench.py --only train` at
# the seed's defaults (batch 8, checkpointing on: the product's choice, now the whole-step graph, the eager step and
# transformers side by side), batch 64 and the clip + AdamW step alone against its floor.
# Results in $OUT (default ./out): bench.txt, train.json when the bench finishes in time.
#   TRAIN_CASES=b8-ckpt:optimus-reduce-overhead tools/gpu_train.sh   # other cases (bench.py --help)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="$PWD/.ext"
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LIMIT="${GPU_LIMIT_S:-235}"  # the whole script, in seconds
PATH="$PATH:$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
CASES="${TRAIN_CASES:-b8-ckpt:optimus-auto,b8-ckpt:optimus-eager,b8-ckpt:hf,b64:optimus-auto,opt:optimizer-fused,opt:optimizer-foreach}"
failed=0

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "--- build ($SECONDS s)"
timeout 120 "$PY" -c "
import time, optimus
start = time.time()
optimus.load_extension()
print(f'built in {time.time() - start:.0f} s; status {optimus.extension_status()}')
" || failed=1

echo "--- tests ($SECONDS s)"
timeout 60 "$PY" -m pytest -q -x -rs tests/test_train.py -k "graph" 2>&1 | tail -n 30 | tee "$OUT/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "--- bench train ($SECONDS s): $CASES"
timeout $((LIMIT - SECONDS)) "$PY" bench.py --device cuda --only train --json "$OUT/train.json" \
  --train_cases "$CASES" 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "--- summary ($SECONDS s, failed=$failed)"
grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -n 3 || true
# The table when the bench finished, else the rows it printed before the cut.
sed -n '/^== train/,$p' "$OUT/bench.txt" | grep . || grep "^train " "$OUT/bench.txt" || true
exit $failed
