#!/usr/bin/env bash
# Issue 15 (the server's throughput), on the H200 within ~150 s: build the extension, the CUDA serve
# tests (the pipelined engine's answers, concurrent = alone), bench serve (1 / 8 / 32 clients),
# then the decode rows of the same run without transformers and the step profile, if time is left
# (bench decode with hf takes longer than this budget). Results in $OUT/serve.json, decode.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 OUT="${OUT:-out}"
if [ -d .carry/tiktoken_cache ]; then export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache"; fi
mkdir -p "$OUT"
failed=0
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage build
python3 -c "import optimus; optimus.load_extension(verbose=False); print('extension', optimus.extension_status())" \
  2>&1 | tail -20 || exit 1
stage "CUDA serve tests"
timeout 40 python3 -m pytest -q -x -rs -p no:cacheprovider tests/test_serve.py -k cuda 2>&1 | tail -8 || failed=1
stage "bench serve"
timeout 60 python3 bench.py --device cuda --only serve --json "$OUT/serve.json" 2>&1 | tail -8 || failed=1
if [ "$SECONDS" -lt 110 ]; then
  stage "bench decode (no hf, no profile)"
  timeout $((140 - SECONDS)) python3 - <<'PY' || failed=1
import json, os, torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=False, profile=False)
print(bench.format_table(rows))
json.dump(rows, open(os.path.join(os.environ["OUT"], "decode.json"), "w"), indent=1)
PY
else
  echo "bench decode skipped: no time left ($SECONDS s)"
fi
stage "summary"
python3 - <<'PY'
import json, os
path = os.path.join(os.environ["OUT"], "serve.json")
if os.path.exists(path):
    for r in json.load(open(path))["sections"]["serve"]:
        print(f"serve {r['clients']:>2} clients: {r['tokens/s']:8.0f} tokens/s ({r['tokens/s_vs_1_client']:.2f}x one), "
              f"{r['steps/s']:.0f} steps/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms p99 {r['ttft_p99_ms']:.0f} ms, "
              f"errors {r['errors']}")
    print("target: 32 clients >= 8x one client")
path = os.path.join(os.environ["OUT"], "decode.json")
if os.path.exists(path):
    for r in json.load(open(path)):
        print(f"decode batch {r['batch']:>2} {r['impl']} graph={r['cuda_graph']} decode_linear={r['decode_linear']}: "
              f"{r['tokens/s']:8.0f} tokens/s, {r['ms/token']:.3f} ms/step")
PY
stage "done, failed=$failed"
exit $failed
