#!/usr/bin/env bash
# 2026-12-02, fourth session (issue 12): the cluster sampler's variants in one GPU call. Build; the
# sampler's CUDA tests under each histogram method (OPTIMUS_SAMPLE_HIST 0-2) and clusters of 16;
# the kernel alone for every variant against the chain (batch 1 and 16, bf16 GPT-2 rows, flat and
# peaked); then bench decode (transformers beside it) with the variant fastest at batch 1, top-p
# 0.9, flat rows, exported for it. Needs .carry/tiktoken_cache. A record of that run: the
# histogram methods other than the winner (per-lane atomics) were removed after it, and
# OPTIMUS_SAMPLE_HIST with them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" TORCH_EXTENSIONS_DIR="$PWD/.ext"
OUT="${OUT:-out}"
mkdir -p "$OUT"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage "build: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $(python3 -c 'import torch; print(torch.__version__)')"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
for variant in "HIST=1" "HIST=2" "HIST=0 CLUSTER=16" "HIST=1 CLUSTER=16" "HIST=2 CLUSTER=16"; do
  stage "sampler CUDA tests, $variant"
  env $(echo "$variant" | sed 's/\([A-Z]*\)=/OPTIMUS_SAMPLE_\1=/g') timeout 45 python3 -m pytest -q -p no:cacheprovider \
      tests/test_sample.py -k "cuda and (split_rows or long_rows or replays or seeded) and not chain" 2>&1 | tail -2
done
stage "the kernel alone, us per call"
timeout "${SAMPLE_LIMIT_S:-150}" python3 - "$OUT/best.env" <<'PY' 2>&1 | grep -v "Warn\|warn("
import os, sys, torch
sys.path.insert(0, "tools")
import optimus
import bench_sample as b
optimus.load_extension()
variants = [("chain", {"OPTIMUS_SAMPLE_CLUSTER": "0"})] + [
    (f"c{c} h{h}", {"OPTIMUS_SAMPLE_CLUSTER": str(c), "OPTIMUS_SAMPLE_HIST": str(h)}) for c in (8, 16) for h in (0, 1, 2)]
print(f"{'batch':>5} {'logits':>6} {'setting':<26} " + " ".join(f"{n:>8}" for n, _ in variants), flush=True)
best = {}
for batch in (1, 16):
    for kind, std in (("flat", 0.1), ("peaked", 3.0)):
        logits = (torch.randn(batch, b.PADDED, device="cuda") * std).to(torch.bfloat16)[:, :b.V]
        race = torch.empty(batch, b.V, device="cuda").exponential_(1)
        for label, t, p, k in b.SETTINGS:
            cells = []
            for name, env in variants:
                os.environ.update(env)
                cells.append(b.time_graph(lambda: torch.ops.optimus.sample(logits, race, t, k, p)))
                for key in env:
                    del os.environ[key]
            print(f"{batch:>5} {kind:>6} {label:<26} " + " ".join(f"{c:8.1f}" for c in cells), flush=True)
            if batch == 1 and kind == "flat" and label.endswith("top-p 0.9") and "top-k" not in label:
                best = min(zip(cells, variants))[1][1]
with open(sys.argv[1], "w") as f:
    f.write(" ".join(f"{k}={v}" for k, v in best.items()))
print("fastest at batch 1, top-p 0.9, flat:", best, flush=True)
PY
best=$(cat "$OUT/best.env" 2>/dev/null)
stage "bench decode with ${best:-the defaults} (transformers beside it: ${HF:-1})"
env $best timeout "${BENCH_LIMIT_S:-220}" python3 - <<'PY' 2>&1 | grep -v "Warn\|warn"
import os, torch, bench
rows = bench.bench_decode(torch.device("cuda"), hf=os.environ.get("HF", "1") == "1", profile=False)
print(bench.format_table(rows))
PY
stage done
