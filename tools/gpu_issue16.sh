#!/usr/bin/env bash
# Issue 16's measurement on the default model (one H200): pretrain on the text of tinyshakespeare's
# part A, fine-tune on A's Dolly-format records with --loss_on response and with all, and train from
# random weights on the records for the same total steps; then eval every checkpoint on 100
# held-out records of part B. Needs TIKTOKEN_CACHE_DIR; results and logs in $OUT.
#   bash tools/gpu_issue16.sh [PRE_STEPS FT_STEPS]     # EXTRA="--preset tiny ..." for a CPU smoke run
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-out}"
PRE=${1:-400} FT=${2:-200}
W=$(mktemp -d)
mkdir -p "$OUT"
stage() { echo "--- $(date -u +%T) ($SECONDS s) $*"; }
stage build
python3 -c "import optimus; optimus.load_extension()" 2>&1 | tail -3
head -n 35992 texts/tinyshakespeare.txt > "$W/play-a.txt"; tail -n +35993 texts/tinyshakespeare.txt > "$W/play-b.txt"
python3 tools/text_to_dolly.py "$W/play-a.txt" "$W/play-a.jsonl"
python3 tools/text_to_dolly.py "$W/play-b.txt" "$W/play-b.jsonl"
head -n 100 "$W/play-b.jsonl" > "$W/held.jsonl"
printf '%s\n' "Write the next speech of the play." > "$W/prompts.txt"
head -n 1 "$W/play-b.jsonl" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print(json.dumps({'instruction': r['instruction'], 'context': r['context']}))" >> "$W/prompts.txt"
T="train --learning_rate 3e-4 --warmup_steps 20 --eval_interval 100 --eval_batches 20 --checkpoint_interval 100000 --tensorboard_dir $OUT/runs ${EXTRA:-}"
run() { stage "$1"; shift; timeout 300 python3 optimus.py "$@" 2>&1 | grep -v Warning | tail -4; }
run pretrain $T --data_input "$W/play-a.txt" --data_dir "$W/tok-a-text" --max_steps "$PRE" --checkpoint_dir "$W/ck/pre"
run ft-response $T --data_input "$W/play-a.jsonl" --data_dir "$W/tok-a-dolly" --max_steps "$FT" --checkpoint_dir "$W/ck/ft-response" \
    --init_from "$W/ck/pre/latest.pt" --loss_on response
run ft-all $T --data_dir "$W/tok-a-dolly" --max_steps "$FT" --checkpoint_dir "$W/ck/ft-all" \
    --init_from "$W/ck/pre/latest.pt" --loss_on all
run scratch $T --data_dir "$W/tok-a-dolly" --max_steps $((PRE + FT)) --checkpoint_dir "$W/ck/scratch" --loss_on response
for c in pre ft-response ft-all scratch; do
  stage "eval $c"
  timeout 120 python3 optimus.py eval --ckpt "$W/ck/$c/latest.pt" --input "$W/held.jsonl" --prompts "$W/prompts.txt" \
    --max_new_tokens 40 --json "$OUT/eval-$c.json" 2>&1 | grep -v Warning | grep . | tail -6
done
stage "summary"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for c in ("pre", "ft-response", "ft-all", "scratch"):
    p = Path(sys.argv[1]) / f"eval-{c}.json"
    if p.exists():
        r = json.loads(p.read_text())
        print(c, json.dumps({k: v for k, v in r.items() if k != "answers"}))
        for a in r.get("answers", []):
            print("   answer:", repr(a.get("answer", a))[:200])
PY
stage done
