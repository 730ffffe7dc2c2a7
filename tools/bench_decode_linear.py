"""decode_linear against the library path it replaces, at the default model's decode shapes.

    python tools/bench_decode_linear.py [--rows 1,2,4,8,16,32]     # on a GPU

Each case, at each row count: ours (one launch: norm + projection + epilogue; 1 row the CUDA-core
kernel, 2..32 rows of bf16 the tensor-core one) against `library`, the kernels the cached step
runs for that projection today (Block.cached: our add_rms_norm before the projections that
follow a norm, cuBLAS's F.linear, our swiglu_packed after gate-up; a residual add is the next
add_rms_norm's, so it is counted there), and F.linear alone (the library GEMM without the rest).
Calls replay from a CUDA graph and rotate through enough weight copies to exceed the L2 cache, so
every call reads its weight from HBM as a real decoding step does (all 8 layers' weights are
283 MB, the L2 50 MB). `ours/library` below 1 is where decode_linear wins.
"""
import argparse
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
EPS = 1e-5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32", help="comma-separated row counts (batch sizes)")
    rows = [int(r) for r in parser.parse_args(argv).rows.split(",")]
    optimus.load_extension()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    _, copy_bw = bench.copy_bandwidth(dev)
    print(f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s")
    print(f"{'case':<24} {'B':>2} {'ours us':>8} {'GB/s':>6} {'of copy':>7} {'library us':>10} {'F.linear us':>11} "
          f"{'ours/library':>12}")
    step = {B: [0.0, 0.0] for B in rows}  # B -> [ours, library] us summed over one block's four cases
    for name, N, K, norm, residual, swiglu in CASES:
        copies = max(2, -(-3 * bench.l2_bytes(dev) // (N * K * 2)))
        ws = [torch.randn(N, K, device=dev, dtype=dtype) / K**0.5 for _ in range(copies)]
        nw = (1 + 0.1 * torch.randn(K, device=dev)).to(dtype) if norm else None
        for B in rows:
            x = torch.randn(B, K, device=dev, dtype=dtype)
            delta = torch.randn(B, K, device=dev, dtype=dtype)  # the residual add fused into the norm
            res = torch.randn(B, N // 2 if swiglu else N, device=dev, dtype=dtype) if residual else None
            got = torch.ops.optimus.decode_linear(x, ws[0], nw, res, EPS, swiglu)
            want = optimus.decode_linear_ref(x, ws[0], nw, res, EPS, swiglu)
            err = float((got.float() - want.float()).norm() / want.float().norm())
            assert err < 1e-2, (name, B, err)

            def library(i: int) -> torch.Tensor:
                h = torch.ops.optimus.add_rms_norm(x, delta, nw, EPS)[1] if norm else x
                y = torch.nn.functional.linear(h, ws[i % copies])
                return torch.ops.optimus.swiglu_packed(y) if swiglu else y

            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                t_ours = bench.graph_seconds_per_call(
                    lambda i: torch.ops.optimus.decode_linear(x, ws[i % copies], nw, res, EPS, swiglu), dev)
                t_lib = bench.graph_seconds_per_call(library, dev)
                t_lin = bench.graph_seconds_per_call(lambda i: torch.nn.functional.linear(x, ws[i % copies]), dev)
            gbs = N * K * 2 / t_ours / 1e9
            print(f"{name:<24} {B:>2} {t_ours * 1e6:>8.2f} {gbs:>6,.0f} {gbs * 1e9 / copy_bw:>7.2f} "
                  f"{t_lib * 1e6:>10.2f} {t_lin * 1e6:>11.2f} {t_ours / t_lib:>12.2f}", flush=True)
            if not name.startswith("head"):
                step[B][0] += t_ours * 1e6
                step[B][1] += t_lib * 1e6
        del ws
    print("one block's four projections (x 8 blocks in a step), us:")
    for B, (ours, lib) in step.items():
        print(f"  B {B:>2}: ours {ours:7.2f}  library {lib:7.2f}  ours/library {ours / lib:5.2f}")


if __name__ == "__main__":
    main()
