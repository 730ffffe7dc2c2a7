"""Optimus Prime benchmarks: measured speed, the extension (ext) against its pure-PyTorch reference
(ref) and torch.compile(ref) (compile), side by side in one run.

    python bench.py [--device cuda|cpu] [--json FILE] [--only SECTION[,SECTION...]]
    python bench.py --only decode,serve     # the server under 1, 8, 32 clients beside the decode rows

Sections are functions `device -> list[dict]`, one row per measurement; main() runs the chosen
ones, prints each as a table and writes every row to --json. Timing: warm-up calls (which also
compile), then the median of many samples, timed with CUDA events on a GPU and perf_counter on
the CPU (where the ops are synchronous). On a GPU the kernel section replays its calls from a CUDA
graph: a microsecond kernel is then timed, not Python's dispatch of it. Benchmarks measure; the
tests assert.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import optimus

# ----------------------------------------------------------------------------- timing

MIN_SAMPLE_S = 1e-3  # a sample repeats the call until it lasts this long: CUDA events resolve ~1 us


@dataclass
class Budget:
    """How hard to measure: warm-up calls and samples (the median of which is reported)."""
    warmup: int
    samples: int


BUDGETS = {"cuda": Budget(warmup=5, samples=30), "cpu": Budget(warmup=1, samples=3)}


def seconds_per_call(fn: Callable[[int], object], device: torch.device, budget: Budget | None = None) -> float:
    """Median seconds per call of fn(i); i counts the calls, so fn can rotate through input sets."""
    budget = budget or BUDGETS[device.type]
    calls = 0

    def run(n: int) -> None:
        nonlocal calls
        for _ in range(n):
            fn(calls)
            calls += 1

    run(budget.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    repeat = max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-9))))
    if device.type == "cpu":
        repeat = 1  # the smoke run stays short; CPU timings are not the point
    samples = []
    for _ in range(budget.samples):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            run(1)  # untimed: keeps the GPU busy while the host queues the timed calls behind it
            begin.record()
            run(repeat)
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / repeat)
        else:
            start = time.perf_counter()
            run(repeat)
            samples.append((time.perf_counter() - start) / repeat)
    return statistics.median(samples)


GRAPH_CALLS = 64  # calls captured into one CUDA graph by graph_seconds_per_call


def graph_seconds_per_call(fn: Callable[[int], object], device: torch.device, budget: Budget | None = None) -> float:
    """Median seconds per call of fn(i), replayed from one CUDA graph of GRAPH_CALLS calls.

    No host work runs between the replayed calls, so a kernel shorter than Python's dispatch of it
    (a few microseconds) is timed on the GPU, not on the host. Run it with a side stream current
    (`torch.cuda.stream`): capture needs one, and work fn depends on (an autograd forward) must
    have run on that same stream."""
    budget = budget or BUDGETS["cuda"]
    stream = torch.cuda.current_stream(device)
    for i in range(budget.warmup):  # compilation and first allocations stay out of the graph
        fn(i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(GRAPH_CALLS):
            fn(i)
    seconds = seconds_per_call(lambda i: graph.replay(), device, budget) / GRAPH_CALLS
    del graph
    return seconds


def copy_bandwidth(device: torch.device) -> tuple[int, float]:
    """(tensor bytes, bytes per second) of a large same-device tensor.copy_, read plus write."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)  # 1 GiB: far beyond any L2
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return n, 2 * n / seconds_per_call(lambda i: dst.copy_(src), device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


# ----------------------------------------------------------------------------- kernels


@dataclass
class KernelCase:
    """One op at one shape. `make` builds a fresh input set; each entry of `impls` turns an input
    set into a zero-argument call (done before timing, e.g. the forward a backward needs)."""
    op: str
    shape: str
    dtype: torch.dtype
    bytes: int  # minimum traffic: every input byte read once, every output byte written once
    make: Callable[[], tuple]
    impls: dict[str, Callable[[tuple], Callable[[], object]]]
    cold: bool  # large shapes: rotate through input sets that together exceed the L2 cache


def swiglu_cases(device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    compiled = torch.compile(optimus.swiglu_ref, dynamic=False)
    train_tokens = 64 * 512 if device.type == "cuda" else 2 * 512
    hidden = 2816  # the base model's MLP width
    cases = []
    for tokens, cold in ((train_tokens, True), (1, False), (16, False)):
        shape = (tokens, hidden)
        size = tokens * hidden * dtype.itemsize

        def make(shape=shape):
            return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(3))  # gate, up, grad

        def backward(forward):
            def prepare(x):  # the forward once; each timed call is the backward alone
                gate, up, grad = x[0].detach().requires_grad_(), x[1].detach().requires_grad_(), x[2]
                out = forward(gate, up)
                return lambda: torch.autograd.grad(out, (gate, up), grad, retain_graph=True)
            return prepare

        cases.append(KernelCase("swiglu fwd", f"{tokens}x{hidden}", dtype, 3 * size, make, {
            "ext": lambda x: lambda: torch.ops.optimus.swiglu(x[0], x[1]),
            "ref": lambda x: lambda: optimus.swiglu_ref(x[0], x[1]),
            "compile": lambda x: lambda: compiled(x[0], x[1]),
        }, cold))
        cases.append(KernelCase("swiglu bwd", f"{tokens}x{hidden}", dtype, 5 * size, make, {
            "ext": backward(lambda g, u: optimus.swiglu(g, u, impl="ext")),
            "ref": backward(optimus.swiglu_ref),
            "compile": backward(compiled),
        }, cold))
    return cases


def swiglu_packed_cases(device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """The training MLP's activation on the extension: one (tokens, 2H) gate-up output read in
    place, one (tokens, 2H) gradient written; against the reference on the halves, compiled."""
    compiled = torch.compile(optimus.swiglu_packed_ref, dynamic=False)
    tokens, hidden = (64 * 512 if device.type == "cuda" else 2 * 512), 2816
    size = tokens * hidden * dtype.itemsize

    def make():
        return (torch.randn(tokens, 2 * hidden, device=device, dtype=dtype),
                torch.randn(tokens, hidden, device=device, dtype=dtype))  # gate_up, grad

    def backward(forward):
        def prepare(x):
            gate_up = x[0].detach().requires_grad_()
            out = forward(gate_up)
            return lambda: torch.autograd.grad(out, gate_up, x[1], retain_graph=True)
        return prepare

    return [
        KernelCase("swiglu_packed fwd", f"{tokens}x2x{hidden}", dtype, 3 * size, make, {
            "ext": lambda x: lambda: torch.ops.optimus.swiglu_packed(x[0]),
            "ref": lambda x: lambda: optimus.swiglu_packed_ref(x[0]),
            "compile": lambda x: lambda: compiled(x[0]),
        }, True),
        KernelCase("swiglu_packed bwd", f"{tokens}x2x{hidden}", dtype, 5 * size, make, {
            "ext": backward(lambda gu: optimus.swiglu_packed(gu, impl="ext")),
            "ref": backward(optimus.swiglu_packed_ref),
            "compile": backward(compiled),
        }, True),
    ]


def cross_entropy_cases(device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """The fused loss's kernel on one chunk of GPT-2 logits: read the chunk, write its gradient
    over it. Each call overwrites its input with a gradient, which the next call reads as logits:
    still random-looking numbers, never zeros."""
    compiled = torch.compile(optimus.cross_entropy_fwd_bwd_ref, dynamic=False)
    rows = optimus.LOSS_CHUNK_TOKENS if device.type == "cuda" else 64
    cols, vocab = 50304, 50257

    def make():
        targets = torch.randint(0, vocab, (rows,), device=device)
        targets[::7] = optimus.IGNORE_INDEX
        return torch.randn(rows, cols, device=device, dtype=dtype), targets, torch.ones(1, device=device)

    return [KernelCase("cross_entropy_fwd_bwd", f"{rows}x{cols}", dtype, 2 * rows * cols * dtype.itemsize, make, {
        "ext": lambda x: lambda: torch.ops.optimus.cross_entropy_fwd_bwd(x[0], x[1], x[2], vocab),
        "ref": lambda x: lambda: optimus.cross_entropy_fwd_bwd_ref(x[0], x[1], x[2], vocab),
        "compile": lambda x: lambda: compiled(x[0], x[1], x[2], vocab),
    }, True)]


def rope_cases(device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    compiled = torch.compile(optimus.rope_kv_append_ref, dynamic=False)
    H, KV, hd = 8, 2, 128  # the base model's attention
    # Prefill of 8, 16 and 64 prompts of 512 tokens: 25 to 200 MB, where launch and tail weigh less.
    prefills = [(B, 512, 512, True) for B in (8, 16, 64)] if device.type == "cuda" else [(2, 512, 512, True)]
    cases = []
    for B, T, S, cold in (*prefills, (1, 1, 2048, False), (16, 1, 2048, False)):
        def make(B=B, T=T, S=S):
            angles = torch.rand(S, hd // 2, device=device) * 2 * math.pi
            if T > 1:  # prefill: positions 0..T-1 in every row
                pos = torch.arange(T, device=device).expand(B, T).contiguous()
            else:  # decode: each row somewhere in its sequence
                pos = torch.randint(0, S, (B, 1), device=device)
            return (torch.randn(B, T, H, hd, device=device, dtype=dtype),
                    torch.randn(B, T, KV, hd, device=device, dtype=dtype),
                    torch.randn(B, T, KV, hd, device=device, dtype=dtype),
                    angles.cos(), angles.sin(), pos,
                    torch.zeros(B, KV, S, hd, device=device, dtype=dtype),
                    torch.zeros(B, KV, S, hd, device=device, dtype=dtype),
                    torch.zeros(1, dtype=torch.int32, device=device))

        rows = min(B * T, S)  # distinct positions: each reads one cos and one sin row
        traffic = (2 * B * T * (H + 2 * KV) * hd * dtype.itemsize  # q, k, v read; q, caches written
                   + 2 * rows * (hd // 2) * 4 + B * T * 8)          # cos and sin rows, pos
        cases.append(KernelCase("rope_kv_append", f"B{B} T{T} S{S}", dtype, traffic, make, {
            "ext": lambda x: lambda: torch.ops.optimus.rope_kv_append(*x),
            "ref": lambda x: lambda: optimus.rope_kv_append_ref(*x),
            "compile": lambda x: lambda: compiled(*x),
        }, cold))
    return cases


def rope_attention_cases(device: torch.device, dtype: torch.dtype) -> list[KernelCase]:
    """A decoding step's attention of the default model at position 271 (the end of the decode
    bench's answers), the fused op against the two ops it replaces (`pair`: rope_kv_append, then
    decode_attention) and the reference."""
    def two_ops(qkv, cos, sin, pos, k_cache, v_cache, status, counts, H, scale):
        B, KV, hd = qkv.shape[0], k_cache.shape[1], k_cache.shape[3]
        q, k, v = qkv.view(B, 1, H + 2 * KV, hd).split([H, KV, KV], dim=2)
        q = torch.ops.optimus.rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status)
        return torch.ops.optimus.decode_attention(q, k_cache, v_cache, pos, status, scale)

    compiled = torch.compile(optimus.rope_append_attention_ref, dynamic=False)
    H, KV, hd, S, p = 8, 2, 128, 512, 271
    cases = []
    for B in (1, 16):
        def make(B=B):
            angles = torch.rand(S, hd // 2, device=device) * 2 * math.pi
            return (torch.randn(B, (H + 2 * KV) * hd, device=device, dtype=dtype), angles.cos(), angles.sin(),
                    torch.full((B, 1), p, device=device), torch.randn(B, KV, S, hd, device=device, dtype=dtype),
                    torch.randn(B, KV, S, hd, device=device, dtype=dtype),
                    torch.zeros(1, dtype=torch.int32, device=device),
                    torch.zeros(B * KV, dtype=torch.int32, device=device), H, 1 / math.sqrt(hd))

        traffic = B * dtype.itemsize * ((H + 2 * KV) * hd + 2 * KV * (p + 1) * hd + H * hd)  # qkv, cache, out
        cases.append(KernelCase("rope_append_attention", f"B{B} S{S} pos {p}", dtype, traffic, make, {
            "ext": lambda x: lambda: torch.ops.optimus.rope_append_attention(*x),
            "pair": lambda x: lambda: two_ops(*x),
            "ref": lambda x: lambda: optimus.rope_append_attention_ref(*x),
            "compile": lambda x: lambda: compiled(*x),
        }, False))
    return cases


def bench_kernels(device: torch.device) -> list[dict]:
    """GB/s of each fused op (minimum traffic / median time), ext vs ref vs compile, and the ext
    kernel's fraction of two copies measured in the same run: `ext_of_copy` against the device's
    copy bandwidth (a 1 GiB copy_, the first row), `ext_of_same_copy` against a copy_ that moves
    the op's own byte count (`same_copy_GB/s`), the ceiling at sizes where launch and tail cost
    show. `sets`: input sets the timed calls rotate through, so that the large shapes read from
    DRAM, not from the L2 cache. On a GPU every call is replayed from a CUDA graph."""
    optimus.resolve_impl("ext", device)  # raises, with the reason, when the kernels are missing
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_bytes, copy = copy_bandwidth(device)
    rows = [{"op": "copy_ (yardstick)", "shape": f"{copy_bytes >> 20} MiB", "dtype": "uint8",
             "MB": 2 * copy_bytes / 1e6, "sets": 1, "ext_us": 2 * copy_bytes / copy * 1e6,
             "ext_GB/s": copy / 1e9, "ext_of_copy": 1.0}]
    l2 = l2_bytes(device)
    cuda = device.type == "cuda"
    timer = graph_seconds_per_call if cuda else seconds_per_call
    with torch.cuda.stream(torch.cuda.Stream(device)) if cuda else contextlib.nullcontext():
        for case in (swiglu_cases(device, dtype) + swiglu_packed_cases(device, dtype) + rope_cases(device, dtype)
                     + rope_attention_cases(device, dtype) + cross_entropy_cases(device, dtype)):
            n_sets = 1
            if case.cold and case.bytes < 3 * l2:
                n_sets = min(16, math.ceil(3 * l2 / case.bytes))
            row = {"op": case.op, "shape": case.shape, "dtype": str(case.dtype).removeprefix("torch."),
                   "MB": case.bytes / 1e6, "sets": n_sets}
            copies = [(torch.randint(0, 256, (case.bytes // 2,), dtype=torch.uint8, device=device),
                       torch.empty(case.bytes // 2, dtype=torch.uint8, device=device)) for _ in range(n_sets)]
            row["same_copy_GB/s"] = case.bytes / timer(lambda i: copies[i % n_sets][1].copy_(copies[i % n_sets][0]),
                                                       device) / 1e9
            del copies
            sets = [case.make() for _ in range(n_sets)]
            for name, prepare in case.impls.items():
                try:
                    calls = [prepare(s) for s in sets]
                    t = timer(lambda i: calls[i % n_sets](), device)
                except Exception as exc:  # one failing implementation (e.g. a compile error) keeps the rest
                    print(f"warning: {case.op} {case.shape} {name}: {type(exc).__name__}: {exc}".splitlines()[0],
                          file=sys.stderr)
                    row[f"{name}_us"] = row[f"{name}_GB/s"] = None
                    continue
                finally:
                    calls = None
                row[f"{name}_us"] = t * 1e6
                row[f"{name}_GB/s"] = case.bytes / t / 1e9
            if row["ext_us"]:
                row["ext_of_copy"] = row["ext_GB/s"] * 1e9 / copy
                row["ext_of_same_copy"] = row["ext_GB/s"] / row["same_copy_GB/s"]
                row["ext_vs_ref"] = row["ref_us"] / row["ext_us"] if row["ref_us"] else None
                row["ext_vs_compile"] = row["compile_us"] / row["ext_us"] if row["compile_us"] else None
            rows.append(row)
            del sets
    return rows


# ----------------------------------------------------------------------------- train step

# Whole optimizer steps last 0.1 s to seconds: fewer samples, and a warm-up that covers compilation.
STEP_BUDGETS = {"cuda": Budget(warmup=3, samples=8), "cpu": Budget(warmup=1, samples=2)}


def random_token_dir(root: Path, tokens: int) -> Path:
    """A data directory of uniformly random GPT-2 ids: step speed does not depend on the text."""
    import numpy as np
    data = root / "tokens"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    counts = {"tokens_train": tokens, "tokens_val": tokens // 10}  # the trainer checks the files against these
    for split, n in (("train", counts["tokens_train"]), ("val", counts["tokens_val"])):
        rng.integers(0, optimus.EOT_ID, n, dtype=np.uint16).astype("<u2").tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 50257, "template": None, "format": "random",
                                                "counts": counts}))
    return data


# (name, batch, checkpointing, side): side "optimus-<impl>" is the trainer with that impl,
# "optimus-graph" the trainer with the whole step in a CUDA graph (cuda_graph true; auto's choice
# at batch 8, so b8-ckpt compares auto with "optimus-eager", cuda_graph false),
# "optimus-reduce-overhead" with torch.compile's graphs (cuda_graph reduce-overhead),
# "optimus-selective" auto with checkpoint_policy selective (only pointwise ops recomputed), "hf"
# transformers' LlamaForCausalLM of the same config; case "opt" times the optimizer step and clip
# alone (side "optimizer-<variant>", see optimizer_row). Run in this order (the most telling pairs
# first, so that a run cut short still compares them); `--train_cases` picks a subset by name
# (every side) or by name:side.
TRAIN_CASES = [
    ("b8-ckpt", 8, True, "optimus-auto"), ("b8-ckpt", 8, True, "hf"), ("b8-ckpt", 8, True, "optimus-eager"),
    ("b8-ckpt", 8, True, "optimus-selective"),
    ("opt", 8, True, "optimizer-ext"), ("opt", 8, True, "optimizer-fused"), ("opt", 8, True, "optimizer-foreach"),
    ("b64", 64, False, "optimus-auto"), ("b64", 64, False, "hf"),
    ("b8-ckpt", 8, True, "optimus-reduce-overhead"),
    ("b64", 64, False, "optimus-ref"), ("b8", 8, False, "optimus-auto"), ("b8", 8, False, "hf"),
    ("b8", 8, False, "optimus-graph"), ("b64", 64, False, "optimus-graph"), ("opt", 8, True, "optimizer-compiled"),
    ("b8-ckpt", 8, True, "optimus-ext"), ("finder", 512, True, "optimus-auto"), ("finder", 512, True, "hf"),
]
# The trainer's config for each optimus side (any other field stays the product's default).
SIDE_FIELDS = {"optimus-auto": dict(impl="auto"), "optimus-ext": dict(impl="ext"), "optimus-ref": dict(impl="ref"),
               "optimus-graph": dict(impl="auto", cuda_graph="true"), "optimus-eager": dict(impl="auto", cuda_graph="false"),
               "optimus-reduce-overhead": dict(impl="auto", cuda_graph="reduce-overhead"),
               "optimus-selective": dict(impl="auto", checkpoint_policy="selective")}
ADAMW_BYTES_PER_PARAM = 32  # float32: read weight, gradient, two moments, write weight and moments (28), the norm's read (4)


def pick_train_cases(spec: str) -> list:
    """`--train_cases`: comma-separated case names (every side) or name:side, in TRAIN_CASES' order."""
    chosen = spec.split(",")
    unknown = [c for c in chosen if not any(c in (name, f"{name}:{side}") for name, _, _, side in TRAIN_CASES)]
    if unknown:
        raise ValueError(f"unknown train case(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(f'{c[0]}:{c[3]}' for c in TRAIN_CASES)}")
    return [c for c in TRAIN_CASES if c[0] in chosen or f"{c[0]}:{c[3]}" in chosen]


def optimizer_row(trainer, side: str, device: torch.device) -> dict:
    """The trainer's clip + AdamW step alone (Trainer.clip_and_step on random gradients, CUDA
    events, median) against its memory-traffic floor: ADAMW_BYTES_PER_PARAM per parameter at the
    copy bandwidth this GPU measures. Variants: "ext" (the trainer's on CUDA: the extension's
    adamw_step), "fused" (the norm, then torch's fused AdamW dividing by the clip factor),
    "foreach" (clip_grad_norm_, then the foreach AdamW), "compiled" (that foreach step through
    torch.compile, which fuses it)."""
    variant = side.removeprefix("optimizer-")
    if variant == "ext" and trainer.step_impl != "ext":
        raise ValueError(f"{side} needs the extension's adamw_step, which this trainer does not take "
                         f"(impl {trainer.model.cfg.impl} on {trainer.rt.device.type})")
    trainer.step_impl = "ext" if variant == "ext" else "ref"
    params = list(trainer.model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if variant not in ("ext", "fused"):
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach", "capturable")}
                  for g in trainer.optimizer.param_groups]
        trainer.optimizer = torch.optim.AdamW(groups, foreach=True)
    step = trainer.clip_and_step
    if variant == "compiled":
        step = torch.compile(step)
    seconds = seconds_per_call(lambda i: step(), device, STEP_BUDGETS[device.type])
    row = {"case": "opt", "side": side, "step_ms": seconds * 1e3}
    if device.type == "cuda":
        _, bandwidth = copy_bandwidth(device)
        floor = ADAMW_BYTES_PER_PARAM * sum(p.numel() for p in params) / bandwidth
        row.update(floor_ms=floor * 1e3, vs_floor=seconds / floor)
    return row


# The parts of a training step in its kernel profile (train_step_profile). Library kernels go by
# fragments of their names (first match wins). Inductor names its Triton kernels after the ops they
# fuse (triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0): those go by these op words (a kernel
# that fuses several parts counts for the first of FUSED_PARTS it shows), else as "pointwise".
# Other kernels are copies and memsets, ATen's pointwise and reduction kernels, or "other".
TRAIN_PARTS = [("attention", ("flash", "fmha", "sdpa", "attention")),
               ("loss", ("cross_entropy", "softmax", "nll_loss")),
               ("optimizer", ("adam", "lpnorm", "normtwo")),  # fused AdamW; the clip's norms (_foreach_norm, norm)
               ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
               ("swiglu", ("swiglu",))]  # the extension's kernels (impl ext)
FUSED_PARTS = [("swiglu", ("sigmoid", "silu")), ("norms", ("rsqrt", "mean")), ("rotary", ("cat", "neg"))]
COPY_KERNELS = ("copy", "memcpy", "memset", "fill", "zero")  # casts, host-device copies, zeroed gradients
ATEN_POINTWISE = ("elementwise_kernel", "reduce_kernel")
PROFILE_PARTS = list(dict.fromkeys([p for p, _ in TRAIN_PARTS + FUSED_PARTS] + ["pointwise", "copies", "other"]))
PROFILE_STEPS = 5


def train_part(kernel: str) -> str:
    """The part of a training step (one of PROFILE_PARTS) that the kernel of this name belongs to."""
    name = kernel.lower()
    part = next((p for p, keys in TRAIN_PARTS if any(k in name for k in keys)), None)
    if part:
        return part
    if name.startswith("triton_"):
        words = set(name.split("_"))
        return next((p for p, keys in FUSED_PARTS if words.intersection(keys)), "pointwise")
    if any(k in name for k in COPY_KERNELS):
        return "copies"
    return "pointwise" if any(k in name for k in ATEN_POINTWISE) else "other"


def profile_parts(kernels: list[tuple[str, float, int]], steps: int) -> dict:
    """Per step: kernel milliseconds by part (`<part>_ms`), their sum (`kernel_ms`) and the kernel
    launches (`kernels`), from (name, device microseconds, launches) of each kernel over `steps` steps."""
    parts = dict.fromkeys(PROFILE_PARTS, 0.0)
    for name, us, _ in kernels:
        parts[train_part(name)] += us / 1e3 / steps
    return {f"{p}_ms": ms for p, ms in parts.items()} | {
        "kernel_ms": sum(parts.values()), "kernels": sum(n for _, _, n in kernels) / steps}


def profiled_kernels(run: Callable[[int], object], device: torch.device, steps: int) -> list[tuple[str, float, int]]:
    """(name, device microseconds, launches) of each kernel over `steps` calls run(0), run(1), ...,
    from torch.profiler's CUDA activity: kernel durations, launch gaps not in them. A CUDA graph's
    replays show each kernel too (CUPTI reports the kernels a graph launches)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            run(i)
        torch.cuda.synchronize(device)
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
        if us > 0 and not event.key.startswith(("ProfilerStep", "cudaGraph")):
            kernels.append((event.key, us, event.count))
    return kernels


def train_step_profile(step: Callable[[int], object], device: torch.device, steps: int = PROFILE_STEPS) -> dict:
    """profile_parts of `steps` calls of a warm training step (profiled_kernels)."""
    return profile_parts(profiled_kernels(step, device, steps), steps)


class HFStep:
    """transformers' LlamaForCausalLM (the same config, torch.compile, bf16 autocast) trained with
    the trainer's loss (float32 cross-entropy of the logits) and step (clip 1.0, fused AdamW, decay
    on matrices only). At the batch finder's case it takes the micro-batch the finder chose for
    Optimus, so both accumulate alike."""

    def __init__(self, model_cfg, train_cfg, device: torch.device, micro_batch: int):
        import transformers
        fields = {k: v for k, v in optimus.hf_config(model_cfg).items()
                  if k not in ("architectures", "model_type", "torch_dtype")}
        config = transformers.LlamaConfig(attn_implementation="sdpa", **fields)
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(config).to(device).train()
        if model_cfg.checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=train_cfg.learning_rate, betas=(train_cfg.beta1, train_cfg.beta2), fused=True)
        self.forward = torch.compile(self.model) if device.type == "cuda" else self.model
        self.rt = optimus.resolve_runtime(str(device))
        self.cfg, self.micro = train_cfg, micro_batch
        self.vocab = model_cfg.vocab_size
        self.batches = [torch.randint(0, self.vocab, (micro_batch, train_cfg.max_length + 1), device=device)
                        for _ in range(4)]

    def step(self, i: int) -> None:
        accum = self.cfg.batch_size // self.micro
        for a in range(accum):
            batch = self.batches[(i * accum + a) % len(self.batches)]
            with self.rt.autocast():
                logits = self.forward(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.gradient_clip_val)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def profile_line(row: dict) -> str:
    """A train row's profile in one line: kernel time and launches per step, then each part's ms."""
    parts = ", ".join(f"{p} {row[f'{p}_ms']:.2f}" for p in PROFILE_PARTS if row[f"{p}_ms"] > 0)
    return (f"{row['kernel_ms']:.2f} ms of kernels a step ({row['busy']:.0%} of its {row['step_ms']:.2f} ms) "
            f"in {row['kernels']:.0f} launches: {parts}")


def bench_train(device: torch.device, cases: list | None = None, profile: list | None = None) -> list[dict]:
    """The trainer's own optimizer step on the default model (T 512, bf16 autocast, compiled):
    tokens/s, MFU and peak memory, beside transformers' LlamaForCausalLM + torch.compile with the
    same loss and step (rows `hf`, when transformers is installed) and the ratio to it. `auto` is
    the product's choice (the fused loss, Inductor's SwiGLU), `ext` every extension kernel, `ref`
    no kernel (the loss over the full float32 logits). The cases in `profile` (CUDA) add the
    step's kernel time by part (train_step_profile) and `busy`, kernel time over step time."""
    import tempfile
    cuda = device.type == "cuda"
    if not cuda:  # the default model takes minutes per step on a CPU: measure `tiny`
        cases = [("tiny", 8, False, side) for side in ("optimus-ext", "optimus-ref", "hf", "optimizer-fused")]
        if profile:
            print("the train profile needs CUDA: none on this device", file=sys.stderr)
    cases = cases or TRAIN_CASES
    if not have_transformers():
        print("transformers is not installed: no hf rows", file=sys.stderr)
        cases = [c for c in cases if c[3] != "hf"]
    rows, finder_micro = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = random_token_dir(Path(tmp), 4_000_000 if cuda else 200_000)
        for name, batch, checkpointing, side in cases:
            fields = SIDE_FIELDS.get(side, dict(impl="auto"))
            model_cfg, train_cfg = optimus.make_configs(
                "base" if cuda else "tiny", **fields, compile="true" if cuda else "false", device=str(device),
                data_dir=str(data), num_workers=2, checkpoint_dir=str(Path(tmp) / "ckpt"),
                tensorboard_dir=str(Path(tmp) / "runs"), max_steps=1000, eval_batches=1, batch_size=batch,
                checkpointing=checkpointing, **({} if cuda else dict(max_length=64)))
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if side.startswith("optimizer-"):
                trainer = optimus.Trainer(model_cfg, train_cfg)
                rows.append(optimizer_row(trainer, side, device))
                print(f"train opt {side}: {rows[-1]['step_ms']:.2f} ms" + (
                    f" (floor {rows[-1]['floor_ms']:.2f} ms, {rows[-1]['vs_floor']:.2f}x)" if cuda else ""), flush=True)
                trainer = None
                continue
            if side == "hf":
                runner = HFStep(model_cfg, train_cfg, device, finder_micro.get(name, batch))
                step, micro, flops_model = runner.step, runner.micro, optimus.Transformer(model_cfg)
            else:
                trainer = optimus.Trainer(model_cfg, train_cfg)
                batches = iter(optimus.train_loader(trainer.windows, 0, 1000, 2, pin=cuda))
                step, micro, flops_model = (lambda i: trainer.train_step(batches)), trainer.micro_batch, trainer.model
                finder_micro[name] = micro
            try:
                seconds = seconds_per_call(step, device, STEP_BUDGETS[device.type])
            except torch.cuda.OutOfMemoryError:  # e.g. transformers at the finder's micro-batch: keep the rest
                print(f"warning: train {name} {side}: out of memory", file=sys.stderr)
                rows.append({"case": name, "side": side, "batch": batch, "micro_batch": micro,
                             "checkpointing": checkpointing, "error": "out of memory"})
                step = runner = trainer = batches = flops_model = None
                continue
            tokens = batch * train_cfg.max_length
            row = {"case": name, "side": side, "batch": batch, "micro_batch": micro, "checkpointing": checkpointing,
                   "step_ms": seconds * 1e3, "tokens/s": tokens / seconds}
            peak = optimus.peak_flops(device)
            if peak:
                row["mfu"] = optimus.flops_per_token(flops_model, train_cfg.max_length) * tokens / seconds / peak
                row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            if cuda and (name, batch, checkpointing, side) in (profile or []):
                row |= train_step_profile(step, device)
                row["busy"] = row["kernel_ms"] / row["step_ms"]
            rows.append(row)
            hf = next((r for r in rows if r["case"] == name and r["side"] == "hf"), None)
            for r in rows:  # the ratio, once both sides of a case are in
                if hf and "tokens/s" in hf and "tokens/s" in r and r["case"] == name and r is not hf:
                    r["vs_hf"] = r["tokens/s"] / hf["tokens/s"]
            print(f"train {name} {side} batch {batch} (micro {micro}): {row['step_ms']:.1f} ms, "
                  f"{row['tokens/s']:,.0f} tokens/s" + (f", {row['vs_hf']:.2f}x hf" if "vs_hf" in row else "")
                  + (f", mfu {row['mfu']:.1%}, peak {row['peak_mem_GiB']:.2f} GiB" if peak else ""), flush=True)
            if "kernel_ms" in row:
                print(f"  profile: {profile_line(row)}", flush=True)
            step = runner = trainer = batches = flops_model = None
    return rows


# ----------------------------------------------------------------------------- decode


HF_BUDGET = Budget(warmup=1, samples=3)  # transformers' generate: seconds per call, few samples
# Kernel name fragments -> the part of a decode step they belong to (first match wins).
STEP_PARTS = [("attention", ("decode_attention", "flash", "fmha", "attention", "sdpa")),
              ("sampling", ("sample_kernel", "sort", "radix", "softmax", "exponential", "topk", "cumsum",
                            "argmax", "scatter", "gather")),
              ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "decode_linear")),
              ("ours", ("swiglu", "rope_kv_append", "add_rms_norm"))]


def step_profile(decoder, model, batch: int, device: torch.device, steps: int = 20) -> dict:
    """Kernel time per decode step by part (attention, sampling, GEMMs, our other kernels, the
    rest), from torch.profiler over `steps` eager steps (kernel durations; launch gaps excluded)."""
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    pos = torch.full((batch,), 40, dtype=torch.long, device=device)

    def run(i: int) -> None:
        optimus.sample_next(decoder.step(tokens, pos), 0.8, 0.9)

    for i in range(3):
        run(i)
    kernels = profiled_kernels(run, device, steps)
    parts = {name: 0.0 for name, _ in STEP_PARTS} | {"other": 0.0}
    for name, us, _ in kernels:
        part = next((p for p, keys in STEP_PARTS if any(k in name.lower() for k in keys)), "other")
        parts[part] += us / steps
    return {f"{p}_us": v for p, v in parts.items()} | {
        "kernel_us": sum(parts.values()), "kernels": sum(n for _, _, n in kernels) / steps}


def hf_decode_seconds(model, prompts: torch.Tensor, new_tokens: int, device: torch.device) -> float | None:
    """transformers' LlamaForCausalLM.generate with a static cache, our weights, same sampling
    settings; None without transformers. Its automatic torch.compile of the static-cache step is
    off (generation_config.disable_compile): every start would pay it, as ours pays none."""
    try:
        import transformers
    except ImportError:
        return None
    config = transformers.LlamaConfig(**{k: v for k, v in optimus.hf_config(model.cfg).items()
                                         if k not in ("architectures", "dtype", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(config).to(device=device, dtype=model.tok_emb.weight.dtype).eval()
    hf.load_state_dict({k: v.to(model.tok_emb.weight.dtype) for k, v in optimus.hf_state_dict(model).items()},
                       strict=False)
    hf.generation_config.disable_compile = True

    def run(i: int) -> None:
        torch.manual_seed(i)  # transformers samples from the global generator
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_p=0.9, top_k=0,
                          cache_implementation="static", pad_token_id=optimus.EOT_ID)
        out.cpu()

    seconds = seconds_per_call(run, device, HF_BUDGET)
    del hf
    return seconds


def answer_seconds(model, decoder, prompts: list[list[int]], new_tokens: int, device: torch.device) -> float:
    """Seconds per generate() answer, as bench_decode times one: the prompts' prefill and
    new_tokens tokens a row (temperature 0.8, top-p 0.9, no end-of-text stop, a generator seeded 0),
    until the last token is on the host; seconds_per_call's median."""
    generator = torch.Generator(device).manual_seed(0)

    def run(i: int) -> None:
        for token in optimus.generate(model, prompts, new_tokens, temperature=0.8, top_p=0.9,
                                      generator=generator, eot_id=None, decoder=decoder):
            pass
        token.cpu()  # the last token on the host: the whole answer is done
    return seconds_per_call(run, device, STEP_BUDGETS[device.type])


def bench_decode(device: torch.device, hf: bool = True, profile: bool = True,
                 batches: tuple[int, ...] | None = None) -> list[dict]:
    """Generation: 256 new tokens (top-p 0.9, temperature 0.8) after a 16-token prompt, random
    weights (bf16 on CUDA), at batch 1 and 16 (or `batches`); tokens/s (all rows together), ms per
    step, the fraction of the bandwidth floor (weights read once per step at the copy bandwidth
    measured here), per-part kernel time of one step; transformers' static-cache generate (rows
    `hf`). Column `decode_linear`: whether the step is Block.decode_row (decode_linear launches)
    rather than cuBLAS GEMMs with separate norms, SwiGLU and adds."""
    cuda = device.type == "cuda"
    preset, new_tokens, default_batches = ("base", 256, (1, 16)) if cuda else ("tiny", 64, (1,))
    # (impl, CUDA graph, Decoder's fused_linear): the default (None: decode_row up to
    # DECODE_LINEAR_MAX_ROWS rows), then the same step on the other path (False: cuBLAS and
    # separate norms; True: decode_row forced), then (batch 1) the reference kernels.
    def cases(batch: int) -> list[tuple[str, bool, bool | None]]:
        other = batch > optimus.DECODE_LINEAR_MAX_ROWS
        if not cuda:
            return [("ext", False, None), ("ref", False, None)]
        return [("ext", True, None), ("ext", True, other)] + ([("ref", True, None)] if batch == 1 else [])

    _, bandwidth = copy_bandwidth(device)
    rows = []
    for batch in batches or default_batches:
        for impl, graph, fused_linear in cases(batch):
            model_cfg, _ = optimus.make_configs(preset, impl=impl)
            torch.manual_seed(0)
            model = optimus.Transformer(model_cfg).to(device).eval()
            if cuda:
                model = model.to(optimus.resolve_runtime(str(device)).dtype)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            optimus.resolve_impl(impl, device)
            decoder = optimus.Decoder(model, batch, use_graph=graph, fused_linear=fused_linear)
            prompts = torch.randint(0, optimus.EOT_ID, (batch, 16))
            seconds = answer_seconds(model, decoder, prompts.tolist(), new_tokens, device)
            fused = batch <= optimus.DECODE_LINEAR_MAX_ROWS if fused_linear is None else fused_linear
            row = {"path": "optimus", "impl": impl, "cuda_graph": graph, "decode_linear": impl == "ext" and fused,
                   "batch": batch, "new_tokens": new_tokens,
                   "tokens/s": batch * new_tokens / seconds, "ms/token": seconds / new_tokens * 1e3,
                   "floor_fraction": (seconds / new_tokens) ** -1 * weight_bytes / bandwidth}
            if profile and cuda and impl == "ext":
                row |= step_profile(optimus.Decoder(model, batch, use_graph=False, fused_linear=fused_linear),
                                    model, batch, device)
            rows.append(row)
            if hf and cuda and impl == "ext" and fused_linear is None:
                try:
                    hf_seconds = hf_decode_seconds(model, prompts.to(device), new_tokens, device)
                except Exception as exc:  # transformers' API moves: report it, keep our rows
                    print(f"hf rows skipped: {type(exc).__name__}: {exc}"[:500], file=sys.stderr)
                    hf_seconds = None
                if hf_seconds is not None:
                    rows.append({"path": "hf", "impl": "transformers", "cuda_graph": False, "batch": batch,
                                 "new_tokens": new_tokens, "tokens/s": batch * new_tokens / hf_seconds,
                                 "ms/token": hf_seconds / new_tokens * 1e3,
                                 "floor_fraction": new_tokens / hf_seconds * weight_bytes / bandwidth})
            del decoder, model
            if cuda:
                torch.cuda.empty_cache()
    for row in rows:
        row["copy_GB/s"] = bandwidth / 1e9
    return rows


# ----------------------------------------------------------------------------- serving

SERVE_CLIENTS = {"cuda": (1, 8, 32), "cpu": (1, 4, 8)}  # concurrent streaming clients per row


def stream_completion(port: int, body: dict) -> tuple[float, int]:
    """(seconds to the first chunk of text, completion tokens) of one streamed /v1/completions."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start, first, tokens = time.perf_counter(), None, 0
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"server answered {response.status}: {response.read()[:200]!r}")
        for line in response:  # server-sent events: `data: {chunk}` lines, then `data: [DONE]`
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        conn.close()
    return first if first is not None else float("nan"), tokens


def client_load(port: int, body: dict, clients: int, rounds: int) -> tuple[float, list[tuple[float, int]], list[str]]:
    """`clients` threads, each streaming `rounds` completions one after another: (wall seconds of
    all of them, (time to first text, tokens) per request, one message per failed request). Runs
    in the benchmark's client process."""
    import threading
    results: list[tuple[float, int]] = []
    errors: list[str] = []

    def client() -> None:
        for _ in range(rounds):
            try:
                results.append(stream_completion(port, body))
            except Exception as exc:  # counted and reported; the other clients go on
                errors.append(f"{type(exc).__name__}: {exc}")
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results, errors


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def bench_serve(device: torch.device) -> list[dict]:
    """`optimus.py serve` under load: 1, 8 and 32 concurrent clients, each streaming completions
    of 256 new tokens (top-p 0.9, temperature 0.8) after a 16-token prompt, one after another.
    Requests/s and completion tokens/s over the wall time of all requests, and the p50 / p99 time
    from sending a request to its first text (the queue wait and prefill included); `steps/s`: the
    engine's decode steps per second. The server runs in this process (its HTTP threads and the
    engine's loop), on 127.0.0.1, the default model with random weights, bf16, ext kernels, 32
    slots; the clients (a thread each) run in a second process, as real clients would, so their
    JSON parsing does not share the server's GIL. On a CPU (a smoke run) the tiny model, 16 new
    tokens and up to 8 clients. `errors`: requests that failed (they count in no other column)."""
    import threading
    import serve
    cuda = device.type == "cuda"
    preset, new_tokens = ("base", 256) if cuda else ("tiny", 16)
    levels = SERVE_CLIENTS[device.type]
    model_cfg, _ = optimus.make_configs(preset, impl="auto")
    torch.manual_seed(0)
    model = optimus.Transformer(model_cfg).to(device).eval()
    if cuda:
        model = model.to(optimus.resolve_runtime(str(device)).dtype)
    impl = optimus.resolve_impl("auto", device)
    server = serve.Server(("127.0.0.1", 0), log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.attach(serve.Engine(model, optimus.load_tokenizer(), max(levels)), "bench", None)
    port = server.server_address[1]
    prompt = torch.randint(0, optimus.EOT_ID, (16,)).tolist()

    def load(clients: int, rounds: int, max_tokens: int) -> tuple[float, list[tuple[float, int]], list[str]]:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.9, "stream": True,
                "stream_options": {"include_usage": True}}
        return pool.apply(client_load, (port, body, clients, rounds))

    rows = []
    # The clients are another process, as real clients are: in this one their parsing of every
    # event would share the GIL with the server's threads and the engine's loop.
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        load(max(levels), 1, 8)  # warm-up: every slot, the prefill shape, the HTTP threads
        for clients in levels:
            rounds = max(2, 8 // clients) if cuda else 1
            steps = server.engine.steps
            seconds, results, errors = load(clients, rounds, new_tokens)
            steps = server.engine.steps - steps
            for error in sorted(set(errors)):
                print(f"warning: serve, {clients} clients: {errors.count(error)} x {error}", file=sys.stderr)
            firsts = [r[0] for r in results]
            tokens = sum(r[1] for r in results)
            rows.append({"model": preset, "impl": impl, "max_batch": max(levels), "clients": clients,
                         "requests": len(results), "errors": len(errors), "new_tokens": new_tokens,
                         "requests/s": len(results) / seconds, "tokens/s": tokens / seconds,
                         "steps/s": steps / seconds,
                         "ttft_p50_ms": percentile(firsts, 0.5) * 1e3, "ttft_p99_ms": percentile(firsts, 0.99) * 1e3,
                         "tokens/s_vs_1_client": tokens / seconds / (rows[0]["tokens/s"] if rows else tokens / seconds)})
    finally:
        pool.terminate()
        server.shutdown()
        server.server_close()
        server.engine.stop()
    return rows


# ----------------------------------------------------------------------------- CLI

SECTIONS: dict[str, Callable[[torch.device], list[dict]]] = {
    "kernels": bench_kernels,
    "train": bench_train,
    "decode": bench_decode,
    "serve": bench_serve,
}


def format_table(rows: list[dict]) -> str:
    """Rows as aligned text columns: the union of their keys, the fullest row's order first."""
    columns = list(dict.fromkeys(key for row in sorted(rows, key=len, reverse=True) for key in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return "" if value is None else str(value)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(text.rjust(w) for text, w in zip(line, widths)) for line in table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when available)")
    parser.add_argument("--json", help="also write every row, with the environment, to this file")
    parser.add_argument("--only", help=f"comma-separated sections to run (default all: {', '.join(SECTIONS)})")
    parser.add_argument("--train_cases", help="comma-separated train cases to run, NAME (every side) or "
                        f"NAME:SIDE (default all: {', '.join(f'{c[0]}:{c[3]}' for c in TRAIN_CASES)})")
    parser.add_argument("--train_profile", nargs="?", const="", metavar="CASES",
                        help="CUDA: per-part kernel time of one step (torch.profiler) for these train cases, "
                             "NAME or NAME:SIDE as in --train_cases; bare: every train case run")
    parser.add_argument("--decode_batches", help="comma-separated batch sizes of the decode section "
                        "(default 1,16 on CUDA, 1 on a CPU)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    try:
        device = optimus.resolve_runtime(args.device).device
        train_cases = pick_train_cases(args.train_cases) if args.train_cases else None
        profile = (pick_train_cases(args.train_profile) if args.train_profile
                   else (train_cases or TRAIN_CASES) if args.train_profile == "" else [])
        left_out = [f"{c[0]}:{c[3]}" for c in profile if c not in (train_cases or TRAIN_CASES)]
        if left_out:
            raise ValueError(f"--train_profile {', '.join(left_out)}: not among the --train_cases run; add it there")
        decode_batches = None
        if args.decode_batches:
            fields = args.decode_batches.split(",")
            if not all(f.strip().isdigit() and int(f) > 0 for f in fields):
                raise ValueError(f"--decode_batches {args.decode_batches}: give positive integers, e.g. 1,16")
            decode_batches = tuple(int(f) for f in fields)
    except (optimus.UserError, ValueError) as exc:
        parser.error(str(exc))
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    results = {}
    for name in names:
        if name == "train":
            rows = bench_train(device, train_cases, profile)
        elif name == "decode" and decode_batches:
            rows = bench_decode(device, batches=decode_batches)
        else:
            rows = SECTIONS[name](device)
        results[name] = rows
        print(f"\n== {name}\n{format_table(rows)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "sections": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
