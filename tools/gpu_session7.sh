#!/usr/bin/env bash
# 2026-12-03, the day's seventh session (logs in tools/results/session7_2026-12-03/). Issue 12: run a
# timed two variants of decode_tail, since reverted (its phases exchanging tagged rows instead of
# grid barriers, and hints of the next layer's weights into L2; the parts "tail" and "decode" that
# ran them went with them, tools/bench_decode_ab.py alternated the settings); runs c-e the sampler
# advancing the step and the prefill's graphs (steptests, glue, cli, bench). Issue 13: the training
# attention on each SDPA backend, alone and in the batch-64 step; the batch-64 step's kernels.
# Needs .carry/tiktoken_cache.
# PART: a comma-separated subset of tests,sdpa,train,glue,trainkernels,steptests,cli,bench (run a:
# tests,tail,decode,sdpa,train; b: glue,trainkernels; c: steptests,glue,bench; d: the same and cli;
# e: glue; f: a variant of the loss kernel holding its rows in registers, against the two-pass
# one, since reverted with the part "ce" that ran it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
PART="${PART:-steptests,glue,cli,bench}"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage "build: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
python3 -c "import torch; p = torch.cuda.get_device_properties(0); print('L2', p.L2_cache_size, 'SMs', p.multi_processor_count)"
if [[ ",$PART," == *",tests,"* ]]; then
  stage "CUDA tests"
  timeout "${TEST_LIMIT_S:-150}" python3 -m pytest -q -p no:cacheprovider -x ${TESTS:-tests/test_decode_tail.py \
      tests/test_decode_linear.py tests/test_model.py tests/test_sample.py} -k cuda 2>&1 | grep -v "Warn\|warn(" | tail -6
fi
if [[ ",$PART," == *",sdpa,"* ]]; then
  stage "the training attention alone on each SDPA backend"
  timeout 90 python3 tools/bench_sdpa.py 2>&1 | grep -v "Warn\|warn("
fi
if [[ ",$PART," == *",train,"* ]]; then
  for flags in ${SDPA_FLAGS:-default noflash}; do
    stage "bench train ${TRAIN_CASES:=b64:optimus-auto}, SDPA $flags"
    SDPA=$flags timeout "${TRAIN_LIMIT_S:-150}" python3 -c "
import os, sys, torch, bench
if os.environ['SDPA'] == 'noflash':
    torch.backends.cuda.enable_flash_sdp(False)
sys.exit(bench.main(['--device', 'cuda', '--only', 'train', '--train_cases', '$TRAIN_CASES']))" 2>&1 \
        | grep -E "^train |^  profile:|Error|error"
  done
fi
if [[ ",$PART," == *",steptests,"* ]]; then
  stage "CUDA tests of the decoding step"
  timeout "${TEST_LIMIT_S:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_sample.py \
      tests/test_decode_linear.py tests/test_decode_tail.py tests/test_model.py tests/test_serve.py} -k cuda 2>&1 \
      | grep -v "Warn\|warn(" | tail -8
fi
if [[ ",$PART," == *",glue,"* ]]; then
  stage "the batch-1 step around its kernels"
  timeout 120 python3 tools/decode_glue.py 2>&1 | grep -v "Warn\|warn("
fi
if [[ ",$PART," == *",trainkernels,"* ]]; then
  stage "the batch-64 training step's kernels"
  timeout 200 python3 tools/train_kernels.py --batch 64 --top 40 2>&1 | grep -v "Warn\|warn("
fi
if [[ ",$PART," == *",cli,"* ]]; then
  stage "CLI: three answers to a 100-token prompt in one session (default model, random weights)"
  python3 -c "
import torch, optimus
torch.manual_seed(0)
m, t = optimus.make_configs('base')
optimus.save_checkpoint(optimus.Path('/tmp/ck_cli/latest.pt'), optimus.Transformer(m), t, step=0, best_val_loss=1.0, template=None)"
  prompt=$(python3 -c "print(' '.join(['word'] * 100))")
  printf '%s\n%s\n%s\n' "$prompt" "$prompt" "$prompt" | timeout 90 python3 optimus.py sample --ckpt /tmp/ck_cli --raw \
      --max_new_tokens 256 --seed 1 2>&1 >/dev/null | grep -i "tokens/s\|error"
fi
if [[ ",$PART," == *",bench,"* ]]; then
  stage "bench decode (transformers beside it: ${HF:-1})"
  timeout "${BENCH_LIMIT_S:-280}" python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import os, torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=os.environ.get("HF", "1") == "1", profile=os.environ.get("PROFILE", "0") == "1")
print(bench.format_table(rows))
PY
fi
stage done
