#!/usr/bin/env bash
# Issue 12's decode path on one H200: the CUDA tests of the decode kernels and the decode path,
# bench decode (programmatic dependent launch on, with transformers) and the batch-1 step with
# it off (OPTIMUS_PDL=0), decode_linear's micro-benchmark both ways, and the CLI's own speed.
# Needs TIKTOKEN_CACHE_DIR; results and logs in $OUT.
#   tools/gpu_decode.sh [all|extras]     # extras: only the kernel listing, the micro-benchmark and the CLI
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-out}"
mkdir -p "$OUT"
failed=0
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage build
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -5
if [ "${1:-all}" = all ]; then
stage "CUDA tests: decode kernels and path"
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_decode_attention.py tests/test_decode_linear.py \
    tests/test_model.py tests/test_sample.py -k cuda 2>&1 | tee "$OUT/decode_tests.txt" | tail -15 || failed=1
stage "bench decode (PDL on)"
timeout 150 python3 bench.py --device cuda --only decode --json "$OUT/decode.json" 2>&1 | tail -12 || failed=1
if [ "${PDL_AB:-0}" = 1 ]; then
stage "batch-1 step with PDL off"
OPTIMUS_PDL=0 timeout 60 python3 - <<'PY' || failed=1
import torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=False, profile=False)
print(bench.format_table([r for r in rows if r.get("batch") == 1]))
PY
fi
fi
if [ "${QUICK:-0}" != 1 ]; then
stage "kernels of one step (batch 1 and 16), by time"
timeout 90 python3 tools/step_kernels.py 2>&1 | grep -v "Warning\|warn" || failed=1
stage "decode_linear micro (PDL on, then off)"
timeout 60 python3 tools/bench_decode_linear.py 2>&1 | tail -8
OPTIMUS_PDL=0 timeout 60 python3 tools/bench_decode_linear.py 2>&1 | tail -8
fi
stage "CLI sample speed"
python3 - <<'PY'
import torch, optimus
torch.manual_seed(0)
m, t = optimus.make_configs("base")
optimus.save_checkpoint(optimus.Path("/tmp/ck/latest.pt"), optimus.Transformer(m), t, step=0, best_val_loss=1.0,
                        template=None)
PY
prompt=$(python3 -c "print(' '.join(['word'] * 100))")
printf '%s\n%s\n%s\n' "$prompt" "$prompt" "$prompt" | timeout 90 python3 optimus.py sample --ckpt /tmp/ck --raw \
    --max_new_tokens 256 --seed 1 2>&1 | grep -i "tokens/s\|error" | tee "$OUT/sample_speed.txt"
stage "done, failed=$failed"
exit $failed
