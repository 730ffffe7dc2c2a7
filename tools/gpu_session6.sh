#!/usr/bin/env bash
# 2026-12-03, the day's sixth session, issue 13: the extension's optimizer step (csrc/adamw.cu)
# against torch's fused AdamW with the clip folded in, alone (tools/bench_adamw.py, bench.py's
# opt cases) and in the training step beside transformers; the fused loss's weight gradient
# summed by the matmul in float32 (wide_matmul) against a bf16 product, its float32 copy and an
# add. Needs .carry/tiktoken_cache. PART: a comma-separated subset of tests,adamw,opt,loss,train
# (default all); TRAIN_CASES overrides the training cases, TESTS the test selection. Logs in
# tools/results/session6_2026-12-03/: its first two runs also timed a streaming LM-head kernel
# (reverted since), the third seven variants of adamw_step's update (the fastest is the kernel now).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
PART="${PART:-tests,adamw,opt,loss,train}"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage "build: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
if [[ ",$PART," == *",tests,"* ]]; then
  stage "CUDA tests"
  timeout "${TEST_LIMIT_S:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_adamw.py \
      tests/test_decode_linear.py tests/test_decode_tail.py "tests/test_kernels.py::test_linear_cross_entropy_bf16" \
      "tests/test_train.py::test_cuda_fused_loss_training_follows_the_reference_path" \
      "tests/test_train.py::test_cuda_graph_training_follows_the_eager_path" \
      "tests/test_train.py::test_cuda_graph_resume_continues_bit_for_bit" -k cuda} 2>&1 | grep -v "Warn\|warn(" | tail -15
fi
if [[ ",$PART," == *",adamw,"* ]]; then
  stage "adamw_step alone against torch's fused AdamW, with the kernels' times"
  timeout 120 python3 tools/bench_adamw.py 2>&1 | grep -v "Warn\|warn("
fi
if [[ ",$PART," == *",opt,"* ]]; then
  stage "the optimizer step alone: ours, torch's fused AdamW, ours again"
  timeout 120 python3 bench.py --device cuda --only train --train_cases opt:optimizer-ext,opt:optimizer-fused 2>&1 \
      | grep -E "^train |Error|error"
  timeout 60 python3 bench.py --device cuda --only train --train_cases opt:optimizer-ext 2>&1 | grep -E "^train |Error|error"
fi
if [[ ",$PART," == *",loss,"* ]]; then
  stage "the fused loss forward + backward at 4,096 and 32,768 tokens: wide_matmul on, off, on, off"
  timeout 90 python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import torch, bench, optimus
dev = torch.device("cuda")
optimus.load_extension()
for tokens in (4096, 32768):
    h = torch.randn(tokens, 1024, device=dev, requires_grad=True)
    w = (0.02 * torch.randn(50304, 1024, device=dev)).requires_grad_()
    t = torch.randint(0, 50257, (tokens,), device=dev)
    def run(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = optimus.linear_cross_entropy(h, w, t, 50257, "mean", impl="ext")
        loss.backward()
    for wide in (True, False, True, False):
        optimus.wide_matmul = (lambda device: True) if wide else (lambda device: False)
        ms = bench.seconds_per_call(run, dev, bench.STEP_BUDGETS["cuda"]) * 1e3
        print(f"loss fwd+bwd {tokens} tokens wide_matmul {wide}: {ms:.3f} ms", flush=True)
PY
fi
if [[ ",$PART," == *",train,"* ]]; then
  stage "bench train: ${TRAIN_CASES:=b8-ckpt:optimus-auto,b8-ckpt:hf,b64:optimus-auto,b64:hf}"
  timeout "${TRAIN_LIMIT_S:-240}" python3 bench.py --device cuda --only train --train_cases "$TRAIN_CASES" \
      ${TRAIN_PROFILE:+--train_profile "$TRAIN_PROFILE"} 2>&1 | grep -E "^train |^  profile:|Error|error"
fi
stage done
