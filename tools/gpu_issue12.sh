#!/usr/bin/env bash
# Issue 12 on one H200 (one call): build the extension, run the CUDA tests of decode attention,
# the sampling kernel and the decode path, bench decode for this branch (with transformers'
# static-cache generate) and for main's code (the old path, same bench function), then print a
# summary. Run from the branch's checkout copied into main's (main's code is two levels up):
#   cd .carry/wt12 && bash tools/gpu_issue12.sh     # results and logs under $OUT (default ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
WT=$PWD
MAIN=$(cd ../.. && pwd)
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
failed=0
stage() { echo "--- $(date +%T) $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
# main's extension (the old path) builds alongside ours, in its own directory.
( cd "$MAIN" && TORCH_EXTENSIONS_DIR=/tmp/ext_main timeout 240 python3 -c "import optimus; optimus.load_extension()" \
    > "$OUT/build_main.txt" 2>&1 ) &
main_build=$!

stage build
export TORCH_EXTENSIONS_DIR=/tmp/ext_wt12
if ! python3 -c "import optimus; optimus.load_extension(); print('built', optimus.extension_status())" 2>&1 | tail -40; then
  echo "error: the extension did not build"; exit 1
fi

stage tests
timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_decode_attention.py tests/test_sample.py \
    tests/test_kernels.py -k "cuda and not ext-True and not swiglu and not rope" 2>&1 | tail -40 || failed=1

stage "bench decode (this branch)"
timeout 75 python3 bench.py --device cuda --only decode --json "$OUT/decode_new.json" 2>&1 | tail -20 || failed=1

stage "bench decode (main: the old path)"
wait $main_build || echo "main's build failed: $(tail -5 "$OUT/build_main.txt")"
( cd "$MAIN" && TORCH_EXTENSIONS_DIR=/tmp/ext_main timeout 45 python3 - "$WT/bench.py" "$OUT/decode_main.json" <<'PY'
import importlib.util, json, sys
import torch
sys.path.insert(0, ".")
import optimus  # main's
spec = importlib.util.spec_from_file_location("bench12", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # this branch's bench.bench_decode, timing main's optimus
rows = bench.bench_decode(torch.device("cuda"), hf=False)
print(bench.format_table(rows))
json.dump({"sections": {"decode": rows}}, open(sys.argv[2], "w"), indent=1)
PY
) 2>&1 | tail -12 || failed=1

stage summary
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for name, label in (("decode_main.json", "old (main)"), ("decode_new.json", "new")):
    path = out / name
    if path.exists():
        for row in json.loads(path.read_text())["sections"]["decode"]:
            rows.append((label if row["path"] == "optimus" else "hf", row))
print(f"{'path':<11} {'impl':<12} {'batch':>5} {'tokens/s':>9} {'ms/step':>8} {'floor':>6} "
      f"{'attn':>6} {'sampl':>6} {'gemm':>6} {'ours':>6} {'other':>6} {'kern/step':>9}")
for label, r in rows:
    parts = " ".join(f"{r.get(k, float('nan')):6.1f}" for k in ("attention_us", "sampling_us", "gemm_us", "ours_us", "other_us"))
    print(f"{label:<11} {r['impl']:<12} {r['batch']:>5} {r['tokens/s']:>9.0f} {r['ms/token']:>8.3f} "
          f"{r['floor_fraction']:>6.1%} {parts} {r.get('kernels', float('nan')):>9.0f}")
if rows:
    print(f"copy bandwidth {rows[-1][1]['copy_GB/s']:.0f} GB/s; parts: kernel us per step (torch.profiler, eager step)")
PY
exit $failed
