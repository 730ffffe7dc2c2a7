#!/usr/bin/env bash
# 2026-12-02, fourth session (issue 12): the one-launch cluster sampler (csrc/sample.cu) and one
# attention block per SM (csrc/rope_append_attention.cu): build, the CUDA tests of the decode
# path, the sampler alone (cluster against the chain), then bench decode at batch 1 and 16
# (transformers beside it when HF=1); with PART including train, bench.py's batch-64 training
# cases (issue 13). Needs .carry/tiktoken_cache. Stages time-limited by TEST_LIMIT_S,
# SAMPLE_LIMIT_S, BENCH_LIMIT_S and TRAIN_LIMIT_S; PART: a comma-separated subset of
# tests,sample,bench,train (default tests,sample,bench).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
PART="${PART:-tests,sample,bench}"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage "build: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
if [[ ",$PART," == *",tests,"* ]]; then
  stage "CUDA tests"
  timeout "${TEST_LIMIT_S:-200}" python3 -m pytest -q -p no:cacheprovider -x tests/test_sample.py \
      tests/test_rope_append_attention.py tests/test_decode_attention.py tests/test_model.py tests/test_serve.py -k cuda 2>&1 \
      | grep -v "Warn\|warn(" | tail -12
fi
if [[ ",$PART," == *",sample,"* ]]; then
  stage "the sampler alone"
  timeout "${SAMPLE_LIMIT_S:-120}" python3 tools/bench_sample.py 2>&1 | grep -v "Warn\|warn("
  stage "the cluster's size (batch 1, bf16 GPT-2 row, kernel alone, us)"
  timeout 60 python3 - <<'PY' 2>&1 | grep -v "Warn\|warn("
import os, sys, torch
sys.path.insert(0, "tools")
import optimus
import bench_sample as b
optimus.load_extension()
logits = (torch.randn(1, b.PADDED, device="cuda") * 0.1).to(torch.bfloat16)[:, :b.V]
race = torch.empty(1, b.V, device="cuda").exponential_(1)
for blocks in ("1", "2", "4", "8", "16", "0"):
    os.environ["OPTIMUS_SAMPLE_CLUSTER"] = blocks
    cells = [f"{b.time_graph(lambda: torch.ops.optimus.sample(logits, race, t, k, p)):6.1f}" for _, t, p, k in b.SETTINGS]
    print(f"blocks {blocks} ({'chain' if blocks == '0' else 'cluster'}): " + " ".join(cells), flush=True)
PY
fi
if [[ ",$PART," == *",bench,"* ]]; then
  stage "bench decode (transformers beside it: ${HF:-0})"
  timeout "${BENCH_LIMIT_S:-240}" python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import os, torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=os.environ.get("HF", "0") == "1", profile=os.environ.get("PROFILE", "0") == "1")
print(bench.format_table(rows))
PY
  [ "${PDL_OFF:-1}" = 1 ] && stage "bench decode at batch 1, programmatic dependent launch off (OPTIMUS_PDL=0)" &&
  OPTIMUS_PDL=0 timeout 90 python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import torch, bench
print(bench.format_table([r for r in bench.bench_decode(torch.device("cuda"), hf=False, profile=False, batches=(1,))
                          if r.get("decode_linear")]))
PY
fi
if [[ ",$PART," == *",train,"* ]]; then  # issue 13: the batch-64 sides not measured before
  stage "bench train: ${TRAIN_CASES:=b64:optimus-auto,b64:hf,b64:optimus-graph}"
  timeout "${TRAIN_LIMIT_S:-280}" python3 bench.py --device cuda --only train --train_cases "$TRAIN_CASES" \
      ${TRAIN_PROFILE:+--train_profile "$TRAIN_PROFILE"} 2>&1 | grep -E "^train |^  profile:|Error|error"
fi
stage done
