#!/usr/bin/env bash
# rope_append_attention on one H200: its CUDA tests and the decode path's, a memcheck of the
# kernel, the decode bench (no transformers) with its per-part profile, and each kernel of one
# eager step (exact durations: programmatic dependent launch only happens inside the graph).
# Needs TIKTOKEN_CACHE_DIR; results and logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-out}"
mkdir -p "$OUT"
failed=0
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage build
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -5
stage "CUDA tests: rope_append_attention, decode attention, the decode path"
timeout 200 python3 -m pytest -q -x -rs -p no:cacheprovider tests/test_rope_append_attention.py \
    tests/test_decode_attention.py tests/test_model.py tests/test_sample.py -k cuda 2>&1 \
    | tee "$OUT/attention_tests.txt" | grep -v "Warning\|warn" | tail -12 || failed=1
stage "memcheck and racecheck of the fused kernel"
cat > /tmp/raa_check.py <<'PY'
import math, torch, optimus
optimus.load_extension()
for B, H, KV, S, hd, p in [(1, 8, 2, 512, 128, 271), (16, 8, 2, 512, 128, 300), (2, 8, 8, 3000, 64, 2999), (3, 4, 2, 65, 256, 40)]:
    qkv = torch.randn(B, (H + 2 * KV) * hd, device="cuda", dtype=torch.bfloat16)
    cos, sin = torch.rand(S, hd // 2, device="cuda"), torch.rand(S, hd // 2, device="cuda")
    kc, vc = (torch.randn(B, KV, S, hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.full((B, 1), p, device="cuda", dtype=torch.long)
    st, cnt = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(B * KV, dtype=torch.int32, device="cuda")
    for _ in range(2):
        torch.ops.optimus.rope_append_attention(qkv, cos, sin, pos, kc, vc, st, cnt, H, 1 / math.sqrt(hd))
torch.cuda.synchronize()
print("ok")
PY
for tool in memcheck racecheck; do
  PYTHONPATH=$PWD timeout 120 compute-sanitizer --tool $tool --print-limit 5 python3 /tmp/raa_check.py 2>&1 | tail -4 || failed=1
done
stage "the op alone: fused against the two ops and the reference (calls replayed from a graph)"
timeout 120 python3 - <<'PY' 2>&1 | grep -v "Warning\|warn" || failed=1
import torch, bench, optimus
dev = torch.device("cuda")
optimus.load_extension()
with torch.cuda.stream(torch.cuda.Stream(dev)):
    for case in bench.rope_attention_cases(dev, torch.bfloat16):
        x = case.make()
        times = {}
        for name, prepare in case.impls.items():
            try:
                call = prepare(x)
                times[name] = bench.graph_seconds_per_call(lambda i: call(), dev) * 1e6
            except Exception as exc:
                times[name] = float("nan")
                print(name, type(exc).__name__, str(exc).splitlines()[0][:120])
        print(case.op, case.shape, "  ".join(f"{k} {v:.2f} us" for k, v in times.items()),
              f"  pair/ext {times['pair'] / times['ext']:.2f}x")
PY
stage "bench decode (graph, PDL on; no transformers)"
timeout 150 python3 - <<'PY' 2>&1 | grep -v "Warning\|warn" | tee "$OUT/decode_bench.txt" || failed=1
import torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=False, profile=True)
print(bench.format_table(rows))
PY
stage "kernels of one eager step (batch 1 and 16, position 271), by time"
timeout 90 python3 tools/step_kernels.py --eager --pos 271 --top 16 2>&1 | grep -v "Warning\|warn" || failed=1
stage "done, failed=$failed"
exit $failed
