#!/usr/bin/env bash
# The extension on a GPU machine: build it (JIT, sm_90 + the local GPU), run the kernel tests, and
# benchmark the kernels. Results go to $OUT (default ./out): build.txt, pytest.txt, bench.txt,
# kernels.json. Exits non-zero when the build, a test or the benchmark fails (all steps still run).
#
#   tools/gpu_check.sh                        # python3 with torch (CUDA build), nvcc, pytest, ninja
#   GPU_CHECK_SANITIZE=1 tools/gpu_check.sh   # also run the kernels under compute-sanitizer memcheck
#
# No internet is needed: missing pytest/ninja are installed from wheels in .whl/ when it exists.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
failed=0

for module in pytest ninja; do
  if ! "$PY" -c "import $module" 2>/dev/null; then
    if [ -d .whl ]; then
      "$PY" -m pip install -q --no-index --find-links .whl "$module"
    else
      echo "error: $PY lacks $module and there is no .whl/ to install it from" >&2
      exit 2
    fi
  fi
done
# torch's JIT build runs the `ninja` executable: the pip package puts it next to python's scripts.
PATH="$PATH:$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  command -v nvcc && nvcc --version | tail -n 2
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
  echo "--- build"
  "$PY" - <<'EOF'
import time
import torch
import optimus
start = time.time()
optimus.load_extension(verbose=True)
print(f"built in {time.time() - start:.0f} s; toolkit {optimus.cuda_toolkit()}; status {optimus.extension_status()}")
for op in ("swiglu", "swiglu_backward", "rope_kv_append"):
    keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"optimus::{op}", k)]
    print(f"optimus::{op}: kernels for {keys}")
EOF
} 2>&1 | tee "$OUT/build.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "--- tests" | tee "$OUT/pytest.txt"
"$PY" -m pytest -q -rs tests/test_kernels.py 2>&1 | tee -a "$OUT/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "--- bench" | tee "$OUT/bench.txt"
"$PY" bench.py --device cuda --only kernels --json "$OUT/kernels.json" 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  echo "--- compute-sanitizer memcheck" | tee "$OUT/sanitizer.txt"
  compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/sanitizer.txt"
import torch
import optimus
optimus.load_extension()
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n in (1, 7, 4099, 1 << 20):
        gate, up, grad = (torch.randn(n, device="cuda", dtype=dtype) for _ in range(3))
        torch.ops.optimus.swiglu(gate, up)
        torch.ops.optimus.swiglu_backward(grad, gate, up)
        torch.ops.optimus.swiglu(gate[1:], up[1:])  # misaligned: 1-element packs
    for B, T, H, KV, hd, S in ((1, 1, 8, 2, 128, 64), (2, 5, 4, 2, 24, 16), (3, 7, 4, 1, 10, 8)):
        q = torch.randn(B, T, H, hd, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, T, KV, hd, device="cuda", dtype=dtype) for _ in range(2))
        cos = sin = torch.ones(S, hd // 2, device="cuda")
        k_cache, v_cache = (torch.zeros(B, KV, S, hd, device="cuda", dtype=dtype) for _ in range(2))
        status = torch.zeros(1, dtype=torch.int32, device="cuda")
        pos = torch.randint(-3, S + 3, (B, T), device="cuda")  # some out of range on purpose
        torch.ops.optimus.rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status)
torch.cuda.synchronize()
print("memcheck run done")
EOF
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
fi

echo "gpu_check: $([ $failed -eq 0 ] && echo ok || echo FAILED); results in $OUT"
exit $failed
