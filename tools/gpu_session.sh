#!/usr/bin/env bash
# Everything measured on a GPU machine, in two stages that each fit one 10-minute device call.
#   tools/gpu_session.sh check   # build + kernel tests (tools/gpu_check.sh), all CUDA tests, decode bench
#   tools/gpu_session.sh train   # train-step bench; default model on Dolly-format Shakespeare, 1 then 2 GPUs; sample
# Needs .carry/tiktoken_cache and .carry/tinyshakespeare.txt (copied from ../shared/data). Results in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR="$PWD/.carry/tiktoken_cache" OUT="${OUT:-out}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
mkdir -p "$OUT"
PY=python3
gpus=$($PY -c 'import torch; print(torch.cuda.device_count())')
echo "$(date -u +%F) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1) x$gpus, torch $($PY -c 'import torch; print(torch.__version__)')"

# Dolly-format records made from tinyshakespeare: data/shakespeare-dolly.jsonl.
shakespeare_dolly() {
  mkdir -p data
  $PY tools/text_to_dolly.py .carry/tinyshakespeare.txt data/shakespeare-dolly.jsonl
}

case "${1:-check}" in
check)
  tools/gpu_check.sh
  $PY -m pytest -q -rs tests/test_sample.py tests/test_train.py tests/test_model.py -k "cuda or logits" 2>&1 | tee "$OUT/cuda_tests.txt"
  $PY bench.py --device cuda --only decode --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt"
  # The CLI's reported speed: two answers of the default model after 5 uncompiled steps.
  # Its own data_dir: the train stage's data/shakespeare holds all records, this one 200.
  shakespeare_dolly
  $PY optimus.py train --data_input data/shakespeare-dolly.jsonl --data_dir data/shakespeare-200 --dataset_size 200 \
    --max_steps 5 --compile false --checkpoint_dir checkpoints/cli --run_name cli >/dev/null 2>&1
  for compile in false true; do
    printf 'Write the next speech of the play.\nAnd the one after it.\n' | $PY optimus.py sample --ckpt checkpoints/cli \
      --max_new_tokens 256 --seed 1 --compile $compile 2>&1 | grep "tokens/s" | sed "s/^/compile $compile: /" \
      | tee -a "$OUT/sample_speed.txt"
  done
  ;;
train)
  $PY bench.py --device cuda --only train --json "$OUT/train.json" 2>&1 | tee "$OUT/train_bench.txt"
  shakespeare_dolly
  common=(--data_input data/shakespeare-dolly.jsonl --data_dir data/shakespeare --dataset_size 0
          --max_steps 80 --log_interval 20 --eval_interval 40 --learning_rate 3e-4)
  $PY optimus.py train "${common[@]}" --batch_size 16 --run_name gpu1 --checkpoint_dir checkpoints/gpu1 2>&1 \
    | tee "$OUT/train_1gpu.txt"
  if [ "$gpus" -ge 2 ]; then
    torchrun --standalone --nproc_per_node 2 optimus.py train "${common[@]}" --batch_size 32 --run_name gpu2 \
      --checkpoint_dir checkpoints/gpu2 2>&1 | tee "$OUT/train_2gpu.txt"
    # The 1B preset under ddp and fsdp: tokens/s and peak memory per GPU side by side (issue 17).
    for parallel in ddp fsdp; do
      torchrun --standalone --nproc_per_node "$gpus" optimus.py train "${common[@]}" --preset large --max_steps 20 \
        --batch_size $((8 * gpus)) --micro_batch_size 8 --parallel $parallel --run_name large-$parallel \
        --checkpoint_dir checkpoints/large-$parallel 2>&1 | tee "$OUT/train_large_$parallel.txt"
    done
  fi
  cp runs/gpu*/metrics.jsonl runs/gpu1/config.json "$OUT/" 2>/dev/null
  for run in gpu1 gpu2; do [ -f runs/$run/metrics.jsonl ] && cp runs/$run/metrics.jsonl "$OUT/metrics_$run.jsonl"; done
  $PY optimus.py sample --ckpt checkpoints/gpu1 --prompt "Write the next speech of the play." --max_new_tokens 256 \
    --top_p 0.9 --seed 1 2>&1 | tee "$OUT/sample.txt"
  ;;
esac
