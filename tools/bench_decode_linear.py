"""decode_linear against the library path it replaces, at the default model's decode shapes.

    python tools/bench_decode_linear.py          # on a GPU

Each case: ours (one launch: norm + projection + epilogue) vs the eager reference (RMSNorm,
F.linear, swiglu, add as separate kernels) vs F.linear alone (the library GEMM, no norm and no
epilogue: what the projection alone costs). Calls replay from a CUDA graph and rotate through
enough weight copies to exceed the L2 cache, so every call reads its weight from HBM as a real
decoding step does (all 8 layers' weights are 283 MB, the L2 50 MB).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import optimus  # noqa: E402

DIM, HIDDEN, VOCAB = 1024, 2816, 50304
CASES = [  # name, N, K, norm, residual, swiglu
    ("qkv (norm)", 1536, DIM, True, False, False),
    ("o (+residual)", DIM, DIM, False, True, False),
    ("gate-up (norm, swiglu)", 2 * HIDDEN, DIM, True, False, True),
    ("down (+residual)", DIM, HIDDEN, False, True, False),
    ("head (norm)", VOCAB, DIM, True, False, False),
]


def main() -> None:
    optimus.load_extension()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    _, copy_bw = bench.copy_bandwidth(dev)
    print(f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s")
    print(f"{'case':<24} {'B':>2} {'ours us':>8} {'GB/s':>6} {'of copy':>7} {'eager us':>9} {'F.linear us':>11} {'ours/linear':>11}")
    for name, N, K, norm, residual, swiglu in CASES:
        copies = max(2, -(-3 * bench.l2_bytes(dev) // (N * K * 2)))
        ws = [torch.randn(N, K, device=dev, dtype=dtype) / K**0.5 for _ in range(copies)]
        nw = (1 + 0.1 * torch.randn(K, device=dev)).to(dtype) if norm else None
        for B in (1, 4, 16):
            x = torch.randn(B, K, device=dev, dtype=dtype)
            res = torch.randn(B, N // 2 if swiglu else N, device=dev, dtype=dtype) if residual else None
            got = torch.ops.optimus.decode_linear(x, ws[0], nw, res, 1e-5, swiglu)
            want = optimus.decode_linear_ref(x, ws[0], nw, res, 1e-5, swiglu)
            err = float((got.float() - want.float()).norm() / want.float().norm())
            assert err < 1e-2, (name, B, err)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                t_ours = bench.graph_seconds_per_call(
                    lambda i: torch.ops.optimus.decode_linear(x, ws[i % copies], nw, res, 1e-5, swiglu), dev)
                t_ref = bench.graph_seconds_per_call(
                    lambda i: optimus.decode_linear_ref(x, ws[i % copies], nw, res, 1e-5, swiglu), dev)
                t_lin = bench.graph_seconds_per_call(lambda i: torch.nn.functional.linear(x, ws[i % copies]), dev)
            gbs = N * K * 2 / t_ours / 1e9
            print(f"{name:<24} {B:>2} {t_ours * 1e6:>8.2f} {gbs:>6,.0f} {gbs * 1e9 / copy_bw:>7.2f} "
                  f"{t_ref * 1e6:>9.2f} {t_lin * 1e6:>11.2f} {t_ours / t_lin:>11.2f}")


if __name__ == "__main__":
    main()
