"""decode_tail alone at the default model's shapes (bf16, one row): a chain of 8 layers' calls
(weights of 8 layers, 180 MB, past the L2), eager and replayed from a CUDA graph (programmatic
dependent launch between the calls), against the decode_linear launches it replaces
(OPTIMUS_DECODE_TAIL=0). us per layer, median of 30.

    python tools/bench_decode_tail.py
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optimus  # noqa: E402

LAYERS = 8


def median_us(fn, reps: int = 30) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / LAYERS)
    return statistics.median(times)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    optimus.load_extension()
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    D, A, Hd, Nq = 1024, 1024, 2816, 1536

    def w(n, k):
        return (torch.randn(n, k, device=dev) / k**0.5).to(dt)
    layers = [(w(D, A), torch.ones(D, device=dev, dtype=dt), w(2 * Hd, D), w(D, Hd), torch.ones(D, device=dev, dtype=dt),
               w(Nq, D)) for _ in range(LAYERS)]
    y = torch.randn(1, A, device=dev).to(dt)
    x0 = torch.randn(1, D, device=dev).to(dt)

    def chain():
        x = x0
        for wo, n2, wgu, wd, nn, nq in layers:
            x, _ = torch.ops.optimus.decode_tail(y, x, wo, n2, wgu, wd, nn, nq, 1e-5, 1e-5)
        return x

    for name, setting in (("decode_linear launches", "0"), ("decode_tail", "1")):
        os.environ["OPTIMUS_DECODE_TAIL"] = setting
        chain()
        torch.cuda.synchronize()
        eager = median_us(chain)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        graph.replay()
        graph_us = median_us(graph.replay)
        print(f"{name:24s} eager {eager:6.1f} us/layer   graph {graph_us:6.1f} us/layer", flush=True)
    os.environ.pop("OPTIMUS_DECODE_TAIL")


if __name__ == "__main__":
    main()
