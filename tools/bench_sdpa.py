"""The training step's attention alone, forward + backward, on each SDPA backend: the default
model's heads (8 query heads, 2 kv heads, head dim 128), T 512, causal, bf16, at batch 8 and 64.
cuDNN and the efficient kernel are also timed with the kv heads expanded to 8 (repeat_interleave
inside the timed call), in case a backend refuses enable_gqa. ms per call, median (bench.py's
seconds_per_call).

    python tools/bench_sdpa.py
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    H, KV, T, hd = 8, 2, 512, 128
    for B in (8, 64):
        q = torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, KV, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, KV, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for expand in (False, True):
                def run(i):
                    with sdpa_kernel([backend]):
                        if expand:
                            y = F.scaled_dot_product_attention(q, k.repeat_interleave(H // KV, 1),
                                                               v.repeat_interleave(H // KV, 1), is_causal=True)
                        else:
                            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    y.backward(g)
                try:
                    ms = bench.seconds_per_call(run, dev) * 1e3
                    print(f"sdpa B{B} {backend.name:20s} {'kv expanded' if expand else 'enable_gqa ':12s} "
                          f"{ms:.3f} ms", flush=True)
                except Exception as exc:  # a backend that refuses these inputs
                    print(f"sdpa B{B} {backend.name:20s} {'kv expanded' if expand else 'enable_gqa ':12s} "
                          f"refused: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


if __name__ == "__main__":
    main()
