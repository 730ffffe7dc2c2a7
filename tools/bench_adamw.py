"""The trainer's optimizer step alone: optimus::adamw_step against torch's fused AdamW, on the
default model's 141.7M float32 parameters (74 tensors), with the kernels' own times.

    python tools/bench_adamw.py     # on a GPU

Rows, in alternating rounds (the median of the rounds): the op, the trainer's previous step
(the gradients' norm by torch.nn.utils.get_total_norm, then fused AdamW dividing by the clip
factor through grad_scale), fused AdamW alone and the norm alone. CUDA events, median
(bench.seconds_per_call), and each kernel's mean time from torch.profiler. The floor is 32 bytes a
parameter (the norm's read of the gradient; the update's reads of weight, gradient and moments,
writes of weight and moments) at the copy bandwidth measured in the same run.
"""
import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import optimus  # noqa: E402

ROUNDS = 2
CLIP, LR, BETAS, EPS = 1.0, 1e-4, (0.9, 0.95), 1e-8


def kernel_times(fn, calls: int = 5) -> str:
    """'name mean_us, ...' of the CUDA kernels fn launches, from a profile of `calls` calls."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(0)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.replace("(anonymous namespace)::", "").removeprefix("void ")
            name = re.split(r"[<(]", name)[0].split("::")[-1][:40]
            totals[name] = totals.get(name, 0.0) + event.device_time / calls
    return ", ".join(f"{name} {us:.0f}" for name, us in sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    optimus.load_extension()
    dev = torch.device("cuda")
    params = [p.detach().requires_grad_() for p in optimus.Transformer(optimus.ModelConfig()).to(dev).parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros((), device=dev) for _ in params]
    decays = [0.01 if p.dim() >= 2 else 0.0 for p in params]
    lr = torch.tensor(LR, device=dev)
    _, bandwidth = bench.copy_bandwidth(dev)
    floor = bench.ADAMW_BYTES_PER_PARAM * sum(p.numel() for p in params) / bandwidth
    print(f"{len(params)} tensors, {sum(p.numel() for p in params):,} parameters; copy {bandwidth / 1e9:,.0f} GB/s, "
          f"floor {floor * 1e3:.3f} ms")

    def ours(i: int) -> None:
        torch.ops.optimus.adamw_step(params, grads, *moments, steps, lr, decays, *BETAS, EPS, CLIP)

    fused = torch.optim.AdamW([{"params": [p for p, d in zip(params, decays) if d], "weight_decay": 0.01},
                               {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0}],
                              lr=LR, betas=BETAS, eps=EPS, fused=True)

    def norm(i: int) -> torch.Tensor:
        return torch.nn.utils.get_total_norm(grads)

    def torch_step(i: int) -> None:  # the trainer's step before adamw_step (Trainer.clip_and_step, impl ref)
        fused.grad_scale = ((norm(i) + 1e-6) / CLIP).clamp(min=1.0)
        fused.step()

    def adamw_alone(i: int) -> None:
        fused.grad_scale = None
        fused.step()

    results: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        for name, fn in (("adamw_step", ours), ("get_total_norm + fused AdamW (grad_scale)", torch_step),
                         ("fused AdamW alone", adamw_alone), ("get_total_norm alone", norm)):
            results.setdefault(name, []).append(bench.seconds_per_call(fn, dev))
    for name, times in results.items():
        ms = statistics.median(times) * 1e3
        print(f"{name:<44} {ms:6.3f} ms  {ms / (floor * 1e3):5.2f}x floor  rounds "
              + " ".join(f"{t * 1e3:.3f}" for t in times), flush=True)
    print(f"  kernels, adamw_step (us): {kernel_times(ours)}")
    print(f"  kernels, get_total_norm + fused AdamW (us): {kernel_times(torch_step)}")


if __name__ == "__main__":
    main()
