"""The sampling kernel against the sort-based reference on a GPU: time per call and a check of its draws.

Times `sample_next` (the Exp(1) noise included) with impl="ref" (logits_to_probs: sort, softmax,
cumsum) and impl="ext" (csrc/sample.cu), and the kernel alone (`torch.ops.optimus.sample` on fixed
noise: on sm_90 the cluster kernel, and beside it the chain of launches that older GPUs take,
forced by OPTIMUS_SAMPLE_CLUSTER=0): each timed call is one replay of a CUDA graph of CALLS calls,
CUDA events around it, after a warm-up, the median of REPEATS replays, divided by CALLS. Logits:
bf16 rows of the GPT-2 vocabulary as the LM head leaves them (a view of rows padded to 50,304),
flat (random weights: std 0.1) or peaked (std 3). Then the draws: 20,000 of them from a
5,000-token row (split over several blocks) against logits_to_probs' exact probabilities, total
variation printed with the reference's own as the noise level.

    python3 tools/bench_sample.py
"""
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optimus  # noqa: E402

V, PADDED = 50257, 50304
CALLS, WARMUP, REPEATS = 32, 3, 25
SETTINGS = [("T0.8 top-p 0.9", 0.8, 0.9, 0), ("T0.8 top-k 50", 0.8, 1.0, 50), ("T0.8 only", 0.8, 1.0, 0),
            ("T0.8 top-k 200 top-p 0.9", 0.8, 0.9, 200)]


def time_graph(fn) -> float:
    """Microseconds per call of fn: a CUDA graph of CALLS calls, replayed; median of REPEATS."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    for _ in range(WARMUP):
        graph.replay()
    times = []
    for _ in range(REPEATS):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def timings() -> list[str]:
    lines = [f"{'batch':>5} {'logits':>6} {'setting':<26} {'ref us':>8} {'ext us':>8} {'kernel us':>9} {'chain us':>8} "
             f"{'ref/ext':>7}"]
    for batch in (1, 16):
        for name, std in (("flat", 0.1), ("peaked", 3.0)):
            logits = (torch.randn(batch, PADDED, device="cuda") * std).to(torch.bfloat16)[:, :V]
            race = torch.empty(batch, V, device="cuda").exponential_(1)
            for label, t, p, k in SETTINGS:
                ref = time_graph(lambda: optimus.sample_next(logits, t, p, k, impl="ref"))
                ext = time_graph(lambda: optimus.sample_next(logits, t, p, k, impl="ext"))
                kernel = time_graph(lambda: torch.ops.optimus.sample(logits, race, t, k, p))
                os.environ["OPTIMUS_SAMPLE_CLUSTER"] = "0"  # read at each launch: the capture takes the chain
                chain = time_graph(lambda: torch.ops.optimus.sample(logits, race, t, k, p))
                del os.environ["OPTIMUS_SAMPLE_CLUSTER"]
                lines.append(f"{batch:>5} {name:>6} {label:<26} {ref:>8.1f} {ext:>8.1f} {kernel:>9.1f} {chain:>8.1f} "
                             f"{ref / ext:>7.2f}")
    noise = time_graph(lambda: torch.empty(1, V, device="cuda").exponential_(1))
    lines.append(f"the Exp(1) noise alone (batch 1): {noise:.1f} us")
    return lines


def draws_check() -> list[str]:
    """Total variation of 20,000 draws against the exact probabilities, ext and ref."""
    g = torch.Generator().manual_seed(0)
    row = torch.randn(5000, generator=g) * 0.5
    row[torch.randperm(5000, generator=g)[:30]] += 8 + torch.randn(30, generator=g)
    logits = row.cuda().to(torch.bfloat16)
    lines = [f"{'setting':<26} {'TV ext':>8} {'TV ref':>8} {'outside':>7}  (20,000 draws, V 5,000, 16 rows a call)"]
    for label, t, p, k in SETTINGS + [("T1.0 top-p 0.97", 1.0, 0.97, 0)]:
        expected = optimus.logits_to_probs(logits[None].double(), t, p, k)[0].cpu().numpy()
        tv = {}
        for impl in ("ext", "ref"):
            generator = torch.Generator("cuda").manual_seed(1)
            draws = torch.cat([optimus.sample_next(logits.expand(16, -1), t, p, k, generator, impl=impl)
                               for _ in range(1250)]).cpu().numpy()
            freq = np.bincount(draws, minlength=5000) / draws.size
            tv[impl] = (0.5 * np.abs(freq - expected).sum(), int((freq * (expected == 0)).sum() * draws.size))
        lines.append(f"{label:<26} {tv['ext'][0]:>8.4f} {tv['ref'][0]:>8.4f} {tv['ext'][1]:>7}")
    return lines


def main() -> None:
    optimus.load_extension()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    check = draws_check()
    print("\n".join(check), flush=True)
    print("\n".join(timings()), flush=True)


if __name__ == "__main__":
    main()
