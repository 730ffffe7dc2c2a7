#!/usr/bin/env bash
# One round of GPU checks, in stages that each fit one device call (the extension is built once
# into .ext and kept while the machine stays warm):
#   tools/gpu_round.sh a   # decode kernels and path, sampling kernel, serve
#   tools/gpu_round.sh b   # training step (CUDA graph, bench train), serve
#   tools/gpu_round.sh c   # issue 16's recipe, the decode step's kernels and decode_linear's micro-benchmark
#   tools/gpu_round.sh d   # decode (tests, bench with transformers), serve, the training step at the seed's defaults
#   tools/gpu_round.sh f   # the fused attention, the tensor-core decode_linear, the CLI's speed
#   tools/gpu_round.sh g   # selective checkpointing, the training step's profile
# Needs .carry/tiktoken_cache (copied from ../shared/data). Logs and results in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 OUT="${OUT:-out}"
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
mkdir -p "$OUT"
echo "$(date -u +%F) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
part() {  # part NAME LIMIT_S SCRIPT [ARGS]: one script, its log in $OUT/NAME.txt, its tail here
  local name=$1 limit=$2; shift 2
  echo "=== $(date -u +%T) ($SECONDS s) $name"
  if [ -x "$1" ] || [ -f "$1" ]; then
    timeout "$limit" bash "$@" > "$OUT/$name.txt" 2>&1; echo "exit $? ($SECONDS s)"
    grep -v "Warning\|warn(" "$OUT/$name.txt" | tail -n "${TAIL:-45}"
  else
    echo "missing: $1"
  fi
}
echo "=== build"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -12
case "${1:-a}" in
a)
  part decode 200 tools/gpu_decode.sh
  part sampling 100 tools/gpu_sample.sh
  part serve 120 tools/gpu_serve.sh
  ;;
b)
  part train 260 tools/gpu_train.sh
  part serve 150 tools/gpu_serve.sh
  ;;
c)
  part issue16 340 tools/gpu_issue16.sh 300 150
  part decode-extras 200 tools/gpu_decode.sh extras
  ;;
e)  # the last call of 2026-12-02: what changed after d's measurements
  QUICK=1 part decode 190 tools/gpu_decode.sh
  TAIL=12 part serve 75 tools/gpu_serve.sh
  echo "=== $(date -u +%T) ($SECONDS s) train: the CUDA graph tests"
  timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_train.py -k "cuda" 2>&1 | tail -4
  ;;
f)  # 2026-12-02, second session: the fused attention, the tensor-core decode_linear, the CLI
  part attention 200 tools/gpu_attention.sh
  SKIP_BENCH=1 MMA_LIMIT_S=150 part decode-mma 170 tools/gpu_decode_mma.sh
  part cli 130 tools/gpu_cli.sh
  ;;
g)  # 2026-12-02, second session: selective checkpointing and the training step's profile
  part train 330 tools/gpu_train13.sh
  ;;
d)
  part decode 200 tools/gpu_decode.sh
  part serve 120 tools/gpu_serve.sh
  TRAIN_CASES=b8-ckpt:optimus-auto,b8-ckpt:hf GPU_LIMIT_S=150 part train 160 tools/gpu_train.sh
  ;;
esac
echo "=== done ($SECONDS s)"
