#!/usr/bin/env bash
# Issue 13, selective activation checkpointing and the training step's profile, in one GPU call
# (under 300 s): build the extension, the trainer's CUDA tests (checkpointing full and selective,
# eager, compiled and inside the whole-step CUDA graph), then `bench.py --only train` at the seed's
# defaults (batch 8, checkpointing on: full against selective, transformers beside them), batch 8
# without checkpointing, batch 64 eager and in the graph, with the per-part kernel profile of one
# step for the two b8-ckpt optimus sides and b64 auto; a summary last.
# Results in $OUT (default ./out): pytest.txt, bench.txt, train.json when the bench finishes in time.
#   TRAIN_CASES=b8-ckpt:optimus-auto,b8-ckpt:optimus-selective PROFILE= tools/gpu_train13.sh   # fewer cases
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="$PWD/.ext"
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LIMIT="${GPU_LIMIT_S:-290}"  # the whole script, in seconds
CASES="${TRAIN_CASES:-b8-ckpt:optimus-auto,b8-ckpt:hf,b8-ckpt:optimus-selective,b64:optimus-auto,b8:optimus-auto,b64:optimus-graph}"
PROFILE="${PROFILE-b8-ckpt:optimus-auto,b8-ckpt:optimus-selective,b64:optimus-auto}"
failed=0

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "--- build ($SECONDS s)"
timeout 150 "$PY" -c "
import time, optimus
start = time.time()
optimus.load_extension(verbose=False)
print(f'built in {time.time() - start:.0f} s; status {optimus.extension_status()}')
" || failed=1

echo "--- tests ($SECONDS s)"
timeout 130 "$PY" -m pytest -q -x -rs -p no:cacheprovider tests/test_model.py tests/test_train.py -k "cuda" 2>&1 \
  | grep -v "Warning\|warn(" | tail -n 30 | tee "$OUT/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "--- bench train ($SECONDS s): $CASES; profile: ${PROFILE:-none}"
left=$((LIMIT - SECONDS)); [ "$left" -gt 10 ] || left=10  # timeout 0 would mean none
timeout "$left" "$PY" bench.py --device cuda --only train --json "$OUT/train.json" \
  --train_cases "$CASES" ${PROFILE:+--train_profile "$PROFILE"} 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "--- summary ($SECONDS s, failed=$failed)"
grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -n 3 || true
if [ -f "$OUT/train.json" ]; then
  "$PY" - "$OUT/train.json" <<'EOF'
import json, sys
import bench
for r in json.load(open(sys.argv[1]))["sections"]["train"]:
    if "step_ms" not in r:
        print(f"{r['case']:>8} {r['side']:<18} {r.get('error', 'no time')}")
        continue
    print(f"{r['case']:>8} {r['side']:<18} {r['step_ms']:6.1f} ms {r.get('tokens/s', 0):>9,.0f} tok/s"
          + (f"  mfu {r['mfu']:.1%}  peak {r['peak_mem_GiB']:.2f} GiB" if "mfu" in r else "")
          + (f"  {r['vs_hf']:.2f}x hf" if "vs_hf" in r else ""))
    if "kernel_ms" in r:
        print(f"{'':>28}{bench.profile_line(r)}")
EOF
else  # cut short: the rows it printed
  grep -E "^train |^  profile:" "$OUT/bench.txt" || true
fi
exit $failed
