#!/usr/bin/env bash
# Nsight Compute on the decoding step's kernels of ours (eager steps of the default model at
# position 271, batch 1 and 16): duration, throughput, occupancy and where the warps stall.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-out}"
mkdir -p "$OUT"
python3 -c "import optimus; optimus.load_extension(); print('extension', optimus.extension_status())" 2>&1 | tail -2
cat > /tmp/steps.py <<'PY'
import os, torch, optimus
dev = torch.device("cuda")
cfg, _ = optimus.make_configs("base", impl="ext")
torch.manual_seed(0)
model = optimus.Transformer(cfg).to(dev).to(torch.bfloat16).eval()
batch = int(os.environ["BATCH"])
dec = optimus.Decoder(model, batch, use_graph=False)
tokens = torch.zeros(batch, dtype=torch.long, device=dev)
pos = torch.full((batch,), 271, dtype=torch.long, device=dev)
for _ in range(4):
    optimus.sample_next(dec.step(tokens, pos), 0.8, 0.9)
torch.cuda.synchronize()
PY
for batch in 1 16; do
  for k in rope_append decode_linear_kernel; do
    [ "$batch" = 16 ] && [ "$k" = decode_linear_kernel ] && continue
    echo "=== batch $batch: $k"
    BATCH=$batch PYTHONPATH=$PWD timeout 150 ncu --kernel-name regex:$k --launch-skip ${SKIP:-8} --launch-count ${COUNT:-4} \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section MemoryWorkloadAnalysis python3 /tmp/steps.py > "$OUT/ncu_${batch}_$k.txt" 2>&1
    grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Block Limit|Grid Size|Block Size|L2 Hit|stall|Stall|spends|cycles being" "$OUT/ncu_${batch}_$k.txt" | cut -c1-230 | head -${LINES_PER:-60}
  done
done
