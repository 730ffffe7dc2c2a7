#!/usr/bin/env bash
# Issue 12, decode_linear's tensor-core kernel (2..32 rows of bf16 / fp16) on one H200: build the
# extension, decode_linear's CUDA tests (against decode_linear_ref at rows 2..40, the batch-16
# greedy through the forced decode_row path), the micro-benchmark at rows 1..32 against what the
# batch-16 step runs today (cuBLAS + add_rms_norm + swiglu_packed), the decode bench's batch-16 rows
# (default: cuBLAS; decode_linear=True: Block.decode_row forced), then compute-sanitizer's
# memcheck over a few launches if time is left. Within 240 s. Needs TIKTOKEN_CACHE_DIR; logs in $OUT.
#   tools/gpu_decode_mma.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-out}"
mkdir -p "$OUT"
failed=0
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage build
timeout 150 python3 -c "import optimus; optimus.load_extension(verbose=False); print('extension', optimus.extension_status())" \
    2>&1 | tail -5 || failed=1
stage "CUDA tests: decode_linear"
timeout 75 python3 -m pytest -q -x -rs -p no:cacheprovider tests/test_decode_linear.py -k cuda 2>&1 \
    | tee "$OUT/decode_linear_tests.txt" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || failed=1
stage "decode_linear micro (rows 1..32, weights past L2, graph replay)"
timeout 70 python3 tools/bench_decode_linear.py 2>&1 | tee "$OUT/decode_linear_micro.txt" | tail -45
[ "${PIPESTATUS[0]}" = 0 ] || failed=1
if [ "${SKIP_BENCH:-0}" != 1 ]; then  # tools/gpu_round.sh f runs the decode bench in its attention part
stage "bench decode, batch 16 (default vs decode_row forced)"
timeout 75 python3 bench.py --device cuda --only decode --decode_batches 16 --json "$OUT/decode16.json" 2>&1 \
    | tee "$OUT/decode16.txt" | tail -6
[ "${PIPESTATUS[0]}" = 0 ] || failed=1
fi
left=$((${MMA_LIMIT_S:-232} - SECONDS))
if [ "$left" -gt 25 ] && command -v compute-sanitizer >/dev/null; then
stage "compute-sanitizer memcheck (${left} s at most)"
cat > "$OUT/memcheck.py" <<'PY'
import torch, optimus
optimus.load_extension()
torch.manual_seed(0)
for B, K, N, swiglu in [(2, 1024, 1540, False), (17, 2816, 1032, False), (32, 1024, 520, True), (40, 64, 100, True)]:
    x = torch.randn(B, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    nw = torch.ones(K, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(B, N // 2 if swiglu else N, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.optimus.decode_linear(x, w, nw, res, 1e-5, swiglu)
    err = float((out.float() - optimus.decode_linear_ref(x, w, nw, res, 1e-5, swiglu).float()).norm() / out.float().norm())
    print(f"memcheck case B={B} K={K} N={N} swiglu={swiglu}: relative error {err:.2e}")
torch.cuda.synchronize()
PY
PYTHONPATH="$PWD" timeout "$left" compute-sanitizer --tool memcheck --print-limit 5 python3 "$OUT/memcheck.py" 2>&1 \
    | tee "$OUT/memcheck.txt" | tail -8
fi
stage "summary"
grep -E "passed|failed|error" "$OUT/decode_linear_tests.txt" | tail -3
grep -E "^(qkv|o |gate|down|head)|^  B " "$OUT/decode_linear_micro.txt" || true
python3 - <<'PY' || true
import json, os
path = os.path.join(os.environ["OUT"], "decode16.json")
rows = json.load(open(path))["sections"]["decode"] if os.path.exists(path) else []
for r in rows:
    print(f"decode {r['path']:>7} batch {r['batch']:>2} decode_linear={r.get('decode_linear', '')!s:<5} "
          f"{r['tokens/s']:>9,.0f} tokens/s {r['ms/token']:.3f} ms/step"
          + (f", gemm {r['gemm_us']:.0f} us, kernels {r['kernel_us']:.0f} us, {r['kernels']:.0f} launches" if "gemm_us" in r else ""))
PY
stage "done, failed=$failed"
exit $failed
