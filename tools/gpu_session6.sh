#!/usr/bin/env bash
# 2026-12-03, the day's sixth session. Issue 13: the extension's optimizer step (csrc/adamw.cu)
# against torch's fused AdamW with the clip folded in, alone and in the training step beside
# transformers. Issue 12: the LM head's streaming kernel (csrc/decode_linear.cu) against the
# kernel before it (OPTIMUS_HEAD_STREAM=0), alone and in the batch-1 step. Needs
# .carry/tiktoken_cache. PART: a comma-separated subset of tests,opt,train,head (default all);
# TRAIN_CASES overrides the training cases, TESTS the test selection.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
PART="${PART:-tests,opt,train,head}"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage "build: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
if [[ ",$PART," == *",tests,"* ]]; then
  stage "CUDA tests"
  timeout "${TEST_LIMIT_S:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_adamw.py \
      tests/test_decode_linear.py "tests/test_train.py::test_cuda_fused_loss_training_follows_the_reference_path" \
      "tests/test_train.py::test_cuda_graph_training_follows_the_eager_path" \
      "tests/test_train.py::test_cuda_graph_resume_continues_bit_for_bit" -k cuda} 2>&1 | grep -v "Warn\|warn(" | tail -15
fi
if [[ ",$PART," == *",opt,"* ]]; then
  stage "the optimizer step alone: ours, torch's fused AdamW, ours again"
  timeout 120 python3 bench.py --device cuda --only train --train_cases opt:optimizer-ext,opt:optimizer-fused 2>&1 \
      | grep -E "^train |Error|error"
  timeout 60 python3 bench.py --device cuda --only train --train_cases opt:optimizer-ext 2>&1 | grep -E "^train |Error|error"
fi
if [[ ",$PART," == *",train,"* ]]; then
  stage "bench train: ${TRAIN_CASES:=b8-ckpt:optimus-auto,b8-ckpt:hf,b64:optimus-auto,b64:hf}"
  timeout "${TRAIN_LIMIT_S:-240}" python3 bench.py --device cuda --only train --train_cases "$TRAIN_CASES" \
      ${TRAIN_PROFILE:+--train_profile "$TRAIN_PROFILE"} 2>&1 | grep -E "^train |^  profile:|Error|error"
fi
if [[ ",$PART," == *",head,"* ]]; then
  stage "the LM head alone: streaming kernel against the one before it"
  timeout 90 python3 tools/bench_decode_linear.py --rows 1 --head_stream 2>&1 | grep -v "Warn\|warn("
  stage "bench decode, batch 1: the streaming head, then the kernel before it (OPTIMUS_HEAD_STREAM=0), twice"
  timeout 120 python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import os, torch, bench
for setting in ("1", "0", "1", "0"):
    os.environ["OPTIMUS_HEAD_STREAM"] = setting
    rows = [r for r in bench.bench_decode(torch.device("cuda"), hf=False, profile=False, batches=(1,)) if r.get("decode_linear")]
    print("OPTIMUS_HEAD_STREAM", setting, bench.format_table(rows), flush=True)
PY
fi
stage done
