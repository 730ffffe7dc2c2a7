"""The kernels of one decoding step of the default model (random weights, bf16, CUDA), by time.

    python tools/step_kernels.py [--eager] [--pos 271] [--batches 1,16] [--top 16]

--eager steps without the CUDA graph: each kernel's time is exactly its own (programmatic
dependent launch only happens inside the graph, where a kernel's wait for its predecessor counts
as its own time in torch.profiler).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import optimus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eager", action="store_true", help="no CUDA graph: exact per-kernel times")
    parser.add_argument("--pos", type=int, default=140, help="every row's position")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--top", type=int, default=22, help="kernels listed per batch")
    args = parser.parse_args()
    dev = torch.device("cuda")
    cfg, _ = optimus.make_configs("base", impl="ext")
    torch.manual_seed(0)
    model = optimus.Transformer(cfg).to(dev).to(torch.bfloat16).eval()
    steps = 10
    for batch in map(int, args.batches.split(",")):
        dec = optimus.Decoder(model, batch, use_graph=False if args.eager else None)
        tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        pos = torch.full((batch,), args.pos, dtype=torch.long, device=dev)
        def run(i: int) -> None:
            optimus.sample_next(dec.step(tokens, pos), 0.8, 0.9)

        for i in range(3):
            run(i)
        kernels = sorted(bench.profiled_kernels(run, dev, steps), key=lambda k: -k[1])
        total = sum(us for _, us, _ in kernels) / steps
        print(f"batch {batch}: {total:.0f} us of kernels per step, {sum(n for _, _, n in kernels) / steps:.0f} kernels")
        for name, us, n in kernels[: args.top]:
            print(f"  {us / steps:7.1f} us {n / steps:5.1f}x  {name[:100]}")
        del dec


if __name__ == "__main__":
    main()
