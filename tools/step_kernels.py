"""The kernels of one decoding step of the default model (random weights, bf16, CUDA), by time.

    python tools/step_kernels.py [--eager] [--pos 271] [--batches 1,16] [--top 16]

--eager steps without the CUDA graph: each kernel's time is exactly its own (programmatic
dependent launch only happens inside the graph, where a kernel's wait for its predecessor counts
as its own time in torch.profiler).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import optimus


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
        for _ in range(3):
            optimus.sample_next(dec.step(tokens, pos), 0.8, 0.9)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                optimus.sample_next(dec.step(tokens, pos), 0.8, 0.9)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events) / steps
        print(f"batch {batch}: {total:.0f} us of kernels per step, {sum(e.count for e in events) / steps:.0f} kernels")
        for e in events[: args.top]:
            print(f"  {e.self_device_time_total / steps:7.1f} us {e.count / steps:5.1f}x  {e.key[:100]}")
        del dec


if __name__ == "__main__":
    main()
