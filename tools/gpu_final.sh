#!/usr/bin/env bash
# Everything the README's performance section reports, in two stages that each fit one device call:
#   tools/gpu_final.sh check   # build, every CUDA test, bench decode (with hf) and serve, the CLI's own speed
#   tools/gpu_final.sh train   # bench train (with hf) and kernels
# Needs .carry/tiktoken_cache (copied from ../shared/data). Results and logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 OUT="${OUT:-out}"
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache"  # the machine may set its own, empty one
mkdir -p "$OUT"
failed=0
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
echo "$(date -u +%F) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
stage build
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -20 || exit 1
case "${1:-check}" in
check)
  stage "CUDA tests"
  timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests -k cuda 2>&1 | tee "$OUT/cuda_tests.txt" | tail -25 || failed=1
  stage "bench decode"
  timeout 150 python3 bench.py --device cuda --only decode --json "$OUT/decode.json" 2>&1 | tail -14 || failed=1
  stage "bench serve"
  timeout 120 python3 bench.py --device cuda --only serve --json "$OUT/serve.json" 2>&1 | tail -10 || failed=1
  stage "CLI sample speed"
  python3 - <<'PY'
import torch, optimus
torch.manual_seed(0)
m, t = optimus.make_configs("base")
optimus.save_checkpoint(optimus.Path("/tmp/ck/latest.pt"), optimus.Transformer(m), t, step=0, best_val_loss=1.0,
                        template=None)
PY
  prompt=$(python3 -c "print(' '.join(['word'] * 100))")
  printf '%s\n%s\n' "$prompt" "$prompt" | timeout 60 python3 optimus.py sample --ckpt /tmp/ck --raw --max_new_tokens 256 \
    --seed 1 2>&1 | grep "tokens/s" | tee "$OUT/sample_speed.txt"
  ;;
train)
  stage "bench train"
  timeout 330 python3 bench.py --device cuda --only train --json "$OUT/train.json" 2>&1 | grep -v Warning | tail -16 || failed=1
  stage "bench kernels"
  timeout 120 python3 bench.py --device cuda --only kernels --json "$OUT/kernels.json" 2>&1 | tail -24 || failed=1
  timeout 60 python3 tools/bench_decode_linear.py 2>&1 | tail -18
  ;;
esac
stage "done, failed=$failed"
exit $failed
