"""Optimus Prime: a small, fast, hackable Llama-style language model engine.

One module, read top to bottom: config -> reference ops and kernel dispatch -> model ->
data loading -> trainer -> sampler -> export -> CLI.

    python optimus.py train  [--preset NAME] [--FIELD VALUE ...]
    python optimus.py sample [--ckpt PATH] [--prompt TEXT] ...
    python optimus.py export --ckpt PATH --out DIR
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data_prep
from data_prep import atomic_write

EOT_ID = 50256  # GPT-2's <|endoftext|>: separates documents, ends every answer
IGNORE_INDEX = -100  # a target that takes no part in the loss (F.cross_entropy's default ignore_index)


class UserError(Exception):
    """An error the user can fix; the CLI prints its one-line message instead of a traceback."""


# ----------------------------------------------------------------------------- config


def cfg_field(default, help: str):
    """A dataclass field with its help text (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = cfg_field(50257, "token vocabulary (GPT-2 BPE)")
    dim: int = cfg_field(1024, "model width")
    depth: int = cfg_field(8, "number of transformer blocks")
    num_heads: int = cfg_field(8, "query heads")
    num_kv_heads: int = cfg_field(2, "key/value heads (grouped-query attention)")
    checkpointing: bool = cfg_field(True, "recompute each block in backward to save activation memory")
    max_seq_len: int = cfg_field(512, "longest sequence: rotary table and KV cache length")
    rope_theta: float = cfg_field(10000.0, "rotary embedding base")
    norm_eps: float = cfg_field(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = cfg_field(True, "share the token embedding with the LM head")
    hidden_dim: int = cfg_field(0, "SwiGLU hidden size; 0: 8/3*dim rounded up to multiple_of")
    multiple_of: int = cfg_field(256, "SwiGLU hidden size is rounded up to a multiple of this")
    vocab_multiple: int = cfg_field(64, "embedding rows padded to a multiple of this (tensor-core friendly)")
    impl: str = cfg_field("auto", "fused kernels: auto (extension if it builds) | ext | ref (pure PyTorch)")

    def __post_init__(self):
        if self.hidden_dim == 0:
            self.hidden_dim = -(-int(8 * self.dim / 3) // self.multiple_of) * self.multiple_of
        checks = [
            (self.dim % self.num_heads == 0, "dim must be a multiple of num_heads"),
            (self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"),
            ((self.dim // self.num_heads) % 2 == 0, "head dim (dim / num_heads) must be even for rotary"),
            (self.impl in ("auto", "ext", "ref"), "impl must be auto, ext or ref"),
            (self.vocab_size > 0 and self.max_seq_len > 0, "vocab_size and max_seq_len must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid model config: {message}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


@dataclass
class TrainingConfig:
    batch_size: int = cfg_field(8, "global batch: sequences per optimizer step (all ranks, all micro-steps)")
    max_length: int = cfg_field(512, "tokens per training sequence")
    learning_rate: float = cfg_field(1e-4, "peak learning rate")
    weight_decay: float = cfg_field(0.01, "AdamW weight decay (matrices only)")
    num_epochs: int = cfg_field(5, "passes over the training tokens (when max_steps is 0)")
    train_val_split: float = cfg_field(0.9, "fraction of records used for training")
    gradient_clip_val: float = cfg_field(1.0, "clip the global gradient norm to this (0: off)")
    dataset_name: str = cfg_field("databricks/databricks-dolly-15k", "Hugging Face dataset downloaded by data_prep")
    dataset_size: int = cfg_field(1000, "records taken from the dataset (0: all)")
    num_workers: int = cfg_field(4, "background batch-loading workers (0: load in the main process)")
    checkpoint_dir: str = cfg_field("checkpoints", "where latest.pt and best.pt are written")
    tensorboard_dir: str = cfg_field("runs", "where each run's logs go (runs/<run>/metrics.jsonl)")
    data_dir: str = cfg_field("data/dolly", "token files (train.bin, val.bin, meta.json)")
    data_input: str = cfg_field("", "local file for data_prep when data_dir is empty ('' downloads the dataset)")
    max_steps: int = cfg_field(0, "optimizer steps; 0: derived from num_epochs")
    warmup_steps: int = cfg_field(20, "linear warmup steps before cosine decay")
    min_lr_ratio: float = cfg_field(0.1, "cosine decay ends at learning_rate * min_lr_ratio")
    beta1: float = cfg_field(0.9, "AdamW beta1")
    beta2: float = cfg_field(0.95, "AdamW beta2")
    micro_batch_size: int = cfg_field(0, "sequences per forward pass; 0: auto (largest that fits on CUDA)")
    eval_interval: int = cfg_field(100, "validate every this many steps (and at the end)")
    eval_batches: int = cfg_field(20, "validation set: this many batches of batch_size windows (fixed)")
    checkpoint_interval: int = cfg_field(500, "write latest.pt every this many steps (and at the end)")
    log_interval: int = cfg_field(10, "progress line and train metrics every this many steps")
    device: str = cfg_field("auto", "auto | cpu | cuda | cuda:N")
    compile: str = cfg_field("auto", "torch.compile the model: auto (on for CUDA) | true | false")
    resume: bool = cfg_field(False, "continue from checkpoint_dir/latest.pt")
    seed: int = cfg_field(1337, "seed for initialisation and data order")
    run_name: str = cfg_field("", "run directory name under tensorboard_dir ('' : a timestamp)")

    def __post_init__(self):
        checks = [
            (self.batch_size > 0 and self.max_length > 1, "batch_size and max_length must be positive"),
            (0.0 < self.train_val_split < 1.0, "train_val_split must be between 0 and 1"),
            (self.compile in ("auto", "true", "false"), "compile must be auto, true or false"),
            (self.micro_batch_size >= 0, "micro_batch_size must be 0 (auto) or positive"),
            (min(self.eval_interval, self.checkpoint_interval, self.log_interval) > 0,
             "eval_interval, checkpoint_interval and log_interval must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid training config: {message}")


# Named presets: field overrides for either config. `base` is the product's default model.
PRESETS: dict[str, dict] = {
    "base": {},
    # Small enough to train a few steps on a laptop CPU in seconds (the tests use it).
    "tiny": dict(dim=64, depth=2, num_heads=4, num_kv_heads=2, max_seq_len=128, max_length=64,
                 batch_size=8, num_workers=0, eval_interval=25, eval_batches=4, log_interval=5,
                 checkpoint_interval=25, warmup_steps=5, learning_rate=3e-3),
}


def make_configs(preset: str = "base", **overrides) -> tuple[ModelConfig, TrainingConfig]:
    """Build both configs from a preset plus field overrides (any field of either config)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **overrides}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = set(values) - model_names - train_names
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    model_cfg = ModelConfig(**{k: v for k, v in values.items() if k in model_names})
    train_cfg = TrainingConfig(**{k: v for k, v in values.items() if k in train_names})
    return model_cfg, train_cfg


@dataclass
class Runtime:
    """Where and how tensors run: one place decides device, dtype and autocast for everyone."""
    device: torch.device
    dtype: torch.dtype  # compute dtype: bfloat16/float16 under autocast on CUDA, float32 on CPU

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


def resolve_runtime(device: str = "auto") -> Runtime:
    """CUDA: bf16 autocast (fp16 where bf16 is unsupported), TF32 on. CPU: float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' asked for but CUDA is not available: use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(dev, dtype)
    if dev.type != "cpu":
        raise UserError(f"device '{device}' is not supported: use auto, cpu, cuda or cuda:N")
    return Runtime(dev, torch.float32)


# ----------------------------------------------------------------------------- reference ops and kernel dispatch
# Each fused op in csrc/ has its specification here, in plain PyTorch. `impl` picks one:
# "ref" (always this code), "ext" (the extension, or an error), "auto" (ext when it builds).


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 (float64 for float64) and rounded once to the input dtype."""
    g = gate.to(torch.promote_types(gate.dtype, torch.float32))
    return (g * torch.sigmoid(g) * up.to(g.dtype)).to(gate.dtype)


def swiglu_packed_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """swiglu_ref of the halves of one packed projection: gate_up (..., 2H) = [gate | up] -> (..., H)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


def rotate_half_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention: pairs (x[i], x[i + hd/2]) turn by angle i.

    x: (..., hd); cos, sin: float32, broadcastable to (..., hd/2). Float32 math, one rounding.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_kv_append_ref(q, k, v, cos, sin, pos, k_cache, v_cache, status) -> torch.Tensor:
    """Rotate q and k at positions `pos`, write k and v into the static cache at those positions.

    q: (B, T, H, hd); k, v: (B, T, KV, hd); cos, sin: (S_table, hd/2) float32; pos: (B, T) int64;
    k_cache, v_cache: (B, KV, S, hd), written in place; status: (1,) int32.
    Returns q rotated, as (B, H, T, hd), ready for attention.
    A position outside [0, min(S, S_table)) is never written: on CPU it raises IndexError before
    anything is written; on CUDA (where raising would need a host sync every layer) status[0] is
    set to 1. This reference then writes no token of the call; the CUDA kernel still writes its
    in-range tokens. Either way a call that sets status is invalid: callers check status.
    """
    B, T = pos.shape
    limit = min(k_cache.shape[2], cos.shape[0])
    bad = (pos < 0) | (pos >= limit)
    if pos.device.type == "cpu" and bool(bad.any()):
        raise IndexError(f"KV cache position out of range: positions must lie in [0, {limit}), "
                         f"got {int(pos.min())}..{int(pos.max())}")
    all_ok = ~bad.any()
    p = pos.clamp(0, limit - 1)                               # (B, T)
    c, s = cos[p][:, :, None, :], sin[p][:, :, None, :]       # (B, T, 1, hd/2)
    q_rot = rotate_half_ref(q, c, s).transpose(1, 2)          # (B, H, T, hd)
    k_rot = rotate_half_ref(k, c, s)                          # (B, T, KV, hd)
    rows = torch.arange(B, device=pos.device)[:, None]        # (B, 1)
    # Advanced indices around a slice: k_cache[rows, :, p] is (B, T, KV, hd).
    k_cache[rows, :, p] = torch.where(all_ok, k_rot, k_cache[rows, :, p])
    v_cache[rows, :, p] = torch.where(all_ok, v, v_cache[rows, :, p])
    status.copy_(torch.maximum(status, (~all_ok).to(status.dtype)))
    return q_rot.contiguous()


def cross_entropy_fwd_bwd_ref(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                              vocab_size: int) -> torch.Tensor:
    """Per-row cross-entropy of logits[:, :vocab_size], and the logits overwritten with its gradient.

    logits: (rows, cols) with cols >= vocab_size (padded vocabulary), written in place with
    (softmax - onehot(target)) * scale over the first vocab_size columns and 0 beyond; targets:
    (rows,) int64; scale: one element, float32 (float64 for float64 logits). Returns the loss per
    row, lse - x[target], in float32 (float64). A target of IGNORE_INDEX gives loss 0 and a zero
    gradient row. Any other target outside [0, vocab_size) raises IndexError on CPU, before
    anything is written; on CUDA that row's loss is NaN and its gradient row zero.
    """
    ignored = targets == IGNORE_INDEX
    in_range = (targets >= 0) & (targets < vocab_size)
    if targets.device.type == "cpu" and not bool((ignored | in_range).all()):
        bad = targets[~(ignored | in_range)]
        raise IndexError(f"cross-entropy target {int(bad[0])} is outside [0, {vocab_size}) and is not "
                         f"the ignore index {IGNORE_INDEX}")
    x = logits[:, :vocab_size].to(torch.promote_types(logits.dtype, torch.float32))  # (rows, V)
    safe = torch.where(in_range, targets, 0)[:, None]                                 # (rows, 1)
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(in_range, lse - x.gather(1, safe)[:, 0], 0.0)
    loss = torch.where(ignored | in_range, loss, float("nan"))
    grad = torch.softmax(x, dim=-1).scatter_add(1, safe, -in_range[:, None].to(x.dtype))
    logits[:, :vocab_size] = (grad * scale * in_range[:, None]).to(logits.dtype)
    logits[:, vocab_size:] = 0
    return loss


_EXTENSION: dict = {}  # filled once by load_extension(): the build's outcome


def _register_python_parts() -> None:
    """Autograd and fake (meta) implementations of the C++ ops, so they train and compile."""
    lib = torch.ops.optimus

    # The kernels return new contiguous tensors, whatever the inputs' strides.
    @torch.library.register_fake("optimus::swiglu")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("optimus::swiglu_backward")
    def _(grad, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    @torch.library.register_fake("optimus::swiglu_packed")
    def _(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    @torch.library.register_fake("optimus::swiglu_packed_backward")
    def _(grad, gate_up):
        return gate_up.new_empty(gate_up.shape)

    @torch.library.register_fake("optimus::rope_kv_append")
    def _(q, k, v, cos, sin, pos, k_cache, v_cache, status):
        B, T, H, hd = q.shape
        return q.new_empty((B, H, T, hd))

    @torch.library.register_fake("optimus::cross_entropy_fwd_bwd")
    def _(logits, targets, scale, vocab_size):
        return logits.new_empty(logits.shape[:1], dtype=torch.promote_types(logits.dtype, torch.float32))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # the backward recomputes silu from gate: no activation kept

    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return tuple(lib.swiglu_backward(grad.contiguous(), gate, up))

    torch.library.register_autograd("optimus::swiglu", backward, setup_context=setup_context)

    def setup_packed(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_packed(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        return lib.swiglu_packed_backward(grad.contiguous(), gate_up)  # one (..., 2H) gradient

    torch.library.register_autograd("optimus::swiglu_packed", backward_packed, setup_context=setup_packed)


def _cuda_arch_list() -> str:
    """sm_90 (H100/H200) always, plus the local GPU's architecture when there is one."""
    archs = {"9.0"}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs.add(f"{major}.{minor}")
    return ";".join(sorted(archs))


def cuda_toolkit() -> str | None:
    """The CUDA toolkit the .cu kernels build with, or None: CUDA_HOME (or CUDA_PATH) if set, else
    the toolkit behind the nvcc on the PATH (following links and wrapper scripts), else
    /usr/local/cuda; only for a CUDA build of torch, and only a directory that holds nvcc and the
    CUDA headers."""
    if torch.version.cuda is None:
        return None
    import re
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home)] if home else []
    nvcc = shutil.which("nvcc")
    if not home and nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            candidates += [Path(m).parent.parent for m in re.findall(r"(/\S+/bin/nvcc)\b", Path(nvcc).read_text())]
    if not home:
        candidates.append(Path("/usr/local/cuda"))
    found = (c for c in candidates if (c / "bin" / "nvcc").is_file() and (c / "include" / "cuda_runtime.h").is_file())
    return next((str(c) for c in found), None)


def load_extension(verbose: bool = False) -> None:
    """JIT-build (ninja, cached, rebuilt when a source changes) and load the csrc/ extension.

    CUDA kernels are built where torch is a CUDA build and a CUDA toolkit is found, CPU kernels
    alone otherwise. Raises RuntimeError with the compiler's message when the build fails.
    """
    if _EXTENSION.get("loaded"):
        return
    toolkit = cuda_toolkit()
    if toolkit and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # torch would take CUDA_HOME from the nvcc on the PATH, which may be a wrapper script
        # outside the toolkit (e.g. /usr/local/bin/nvcc -> headers looked for in /usr/local).
        os.environ["CUDA_HOME"] = toolkit
    import logging
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" noise
    from torch.utils import cpp_extension
    if toolkit and cpp_extension.CUDA_HOME != toolkit:
        # torch reads CUDA_HOME once, when cpp_extension is first imported (torch.compile does it
        # early): a guess made then from a wrapper script would break the link (-L<guess>/lib64).
        cpp_extension.CUDA_HOME = toolkit

    src = Path(__file__).resolve().parent / "csrc"
    sources = sorted(str(p) for p in src.glob("*.cpp"))
    with_cuda = toolkit is not None
    if with_cuda:
        sources += sorted(str(p) for p in src.glob("*.cu"))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch_list())
    if not sources:
        raise RuntimeError(f"no extension sources found in {src}")
    # at::parallel_for is inline OpenMP: without -fopenmp the CPU kernels would run on one thread.
    # The extension then shares torch's libgomp (same soname, already loaded), so one thread pool.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    cpp_extension.load(
        name="optimus_ext", sources=sources, is_python_module=False, verbose=verbose,
        # -fno-trapping-math lets GCC vectorise loops with float selects (csrc/swiglu.cpp); the
        # CUDA kernels pick their fast intrinsics by hand, so no --use_fast_math (it flushes
        # subnormals to zero everywhere).
        extra_cflags=["-O3", "-fno-trapping-math", *(["-DOPTIMUS_WITH_CUDA"] if with_cuda else []), *openmp],
        extra_ldflags=openmp,
        extra_cuda_cflags=["-O3", "-lineinfo"],
    )
    _register_python_parts()
    _EXTENSION.update(loaded=True, cuda=with_cuda)


def extension_status() -> tuple[bool, bool, str]:
    """(built, has CUDA kernels, reason it did not build). Tries the build once per process."""
    if "built" not in _EXTENSION:
        try:
            load_extension()
            _EXTENSION.update(built=True, reason="")
        except Exception as exc:  # any build failure: fall back, keep the compiler's message
            _EXTENSION.update(built=False, cuda=False, reason=f"{type(exc).__name__}: {exc}".strip())
    return _EXTENSION["built"], _EXTENSION["cuda"], _EXTENSION["reason"]


def resolve_impl(impl: str, device: torch.device) -> str:
    """Turn auto | ext | ref into the implementation that runs on `device`: "ext" or "ref"."""
    if impl == "ref":
        return "ref"
    key = ("resolved", impl, device.type)
    if key not in _EXTENSION:
        built, has_cuda, reason = extension_status()
        if built and device.type == "cuda" and not has_cuda:
            built, reason = False, "the extension was built without CUDA kernels (no CUDA toolkit found)"
        if not built and impl == "ext":
            raise RuntimeError(f"impl='ext' asked for but the optimus extension is unavailable: {reason}")
        if not built:
            warnings.warn(f"optimus: using the pure-PyTorch kernels on {device.type}: {reason[:2000]}")
        _EXTENSION[key] = "ext" if built else "ref"
    return _EXTENSION[key]


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "ref") -> torch.Tensor:
    """silu(gate) * up: the fused kernel (`impl="ext"`) or its reference."""
    if impl == "ext":
        return torch.ops.optimus.swiglu(gate, up)
    return swiglu_ref(gate, up)


def swiglu_packed(gate_up: torch.Tensor, impl: str = "ref") -> torch.Tensor:
    """silu(gate) * up of gate_up = [gate | up] (..., 2H), read in place; the kernel's backward
    writes one (..., 2H) gradient (the reference's goes through two slices)."""
    if impl == "ext":
        return torch.ops.optimus.swiglu_packed(gate_up)
    return swiglu_packed_ref(gate_up)


def rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status, impl: str = "ref") -> torch.Tensor:
    """Rotary on q and k plus the KV-cache write, in one pass (see rope_kv_append_ref)."""
    if impl == "ext":
        return torch.ops.optimus.rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status)
    return rope_kv_append_ref(q, k, v, cos, sin, pos, k_cache, v_cache, status)


def cross_entropy_fwd_bwd(logits, targets, scale, vocab_size: int, impl: str = "ref") -> torch.Tensor:
    """Loss per row, and the logits overwritten with its gradient (see cross_entropy_fwd_bwd_ref)."""
    if impl == "ext":
        return torch.ops.optimus.cross_entropy_fwd_bwd(logits, targets, scale, vocab_size)
    return cross_entropy_fwd_bwd_ref(logits, targets, scale, vocab_size)


def linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                             reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the LM head's logits h @ weight.T cut to the real vocabulary, in float32.

    h: (..., dim); weight: (padded_vocab, dim); targets: (...) int64, IGNORE_INDEX for none.
    "sum" adds the non-ignored rows' losses; "mean" divides that by their count (0 when every
    target is ignored, where F.cross_entropy would give NaN). The specification of the fused path.
    """
    logits = F.linear(h, weight)[..., :vocab_size]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, -2)  # (N, V)
    total = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


LOSS_CHUNK_TOKENS = 8192  # rows of logits per chunk: 0.8 GB of bf16 logits at the GPT-2 vocabulary


class FusedLinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy_ref without the full logits: per chunk of tokens, one matmul makes the
    chunk's logits, cross_entropy_fwd_bwd turns them into the loss and (in place) their gradient,
    and two matmuls take that to the gradients of h and of the weight. The gradients are made in
    the forward; the backward only scales them by the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, mean: bool, chunk: int, impl: str, needs_grad: bool):
        # h (N, dim), weight (Vp, dim), targets (N,). Under autocast the matmuls run in its dtype,
        # as F.linear would; the log-sum-exp is float32 either way.
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            h_c, w_c = h.to(dtype), weight.to(dtype)
            loss_dtype = torch.promote_types(dtype, torch.float32)
            count = (targets != IGNORE_INDEX).sum()
            scale = count.clamp(min=1).to(loss_dtype).reciprocal() if mean else count.new_ones((), dtype=loss_dtype)
            # grad_w sums the chunks in float32 at least (autocast's bf16 weight gradient is one
            # matmul, rounded once); grad_h rows are written once, in the matmuls' dtype.
            losses, grad_h, grad_w = [], torch.empty_like(h_c) if needs_grad else None, None
            for start in range(0, h.shape[0], chunk):
                end = min(start + chunk, h.shape[0])
                logits = h_c[start:end] @ w_c.t()                                       # (n, Vp)
                losses.append(cross_entropy_fwd_bwd(logits, targets[start:end], scale.reshape(1), vocab_size, impl))
                if needs_grad:  # logits now hold d loss / d logits
                    torch.mm(logits, w_c, out=grad_h[start:end])                       # (n, dim)
                    part = logits.t() @ h_c[start:end]                                  # (Vp, dim)
                    grad_w = part.to(loss_dtype) if grad_w is None else grad_w.add_(part)
            loss = torch.cat(losses).sum() * (scale if mean else 1)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h.to(h_dtype) * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype),
                None, None, None, None, None, None)


# Eager inside a compiled model (a graph break): the chunk loop, the in-place op and the gradients
# made in the forward stay out of the graph. A compiled formulation of the loss was not measured.
@torch.compiler.disable
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         reduction: str = "mean", impl: str = "ext", chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """linear_cross_entropy_ref, fused and chunked (impl "ext": the extension's kernel; "ref": its
    pure-PyTorch reference inside the same chunked scheme)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return FusedLinearCrossEntropy.apply(h.flatten(0, -2), weight, targets.flatten(), vocab_size,
                                         reduction == "mean", chunk, impl, needs_grad)


# ----------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the statistics in float32 whatever the activation dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/hd): two (max_seq_len, hd/2) float32 tables."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


class KVCache(nn.Module):
    """Static-shape key/value buffers for one layer, allocated once per generation."""

    def __init__(self, batch: int, cfg: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, cfg.num_kv_heads, cfg.max_seq_len, cfg.head_dim)  # (B, KV, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Set to 1 on CUDA by a write whose position is out of range (see rope_kv_append_ref).
        self.register_buffer("status", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    def update(self, q, k, v, cos, sin, pos, impl: str):
        """Rotate q, k at `pos` and store k, v there. Returns (q (B,H,T,hd), keys, values (B,KV,S,hd))."""
        q = rope_kv_append(q, k, v, cos, sin, pos, self.k, self.v, self.status, impl=impl)
        return q, self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, impl: str, cache: KVCache | None = None, pos=None, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.num_heads, self.head_dim)       # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.num_kv_heads, self.head_dim)    # (B, T, KV, hd)
        v = self.wv(x).view(B, T, self.num_kv_heads, self.head_dim)    # (B, T, KV, hd)
        if cache is None:  # whole sequences from position 0: causal attention among themselves
            q = rotate_half_ref(q, cos[:T, None], sin[:T, None]).transpose(1, 2)  # (B, H, T, hd)
            k = rotate_half_ref(k, cos[:T, None], sin[:T, None]).transpose(1, 2)  # (B, KV, T, hd)
            v = v.transpose(1, 2)                                                 # (B, KV, T, hd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # new tokens at `pos` attend to every cached slot the mask allows
            q, k, v = cache.update(q, k, v, cos, sin, pos, impl)  # (B, H, T, hd), (B, KV, S, hd) x2
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)      # (B, T, H*hd)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        if impl == "ext" and self.training and torch.is_grad_enabled():
            # Training on the extension: one gate-up matmul, whose (B, T, 2H) output the kernel
            # reads in place and whose gradient its backward writes whole (no slice backward).
            gate_up = F.linear(x, torch.cat([self.gate.weight, self.up.weight]))  # (B, T, 2H)
            return self.down(swiglu_packed(gate_up, impl))
        return self.down(swiglu(self.gate(x), self.up(x), impl))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, impl: str, cache=None, pos=None, mask=None):
        x = x + self.attn(self.norm1(x), cos, sin, impl, cache, pos, mask)
        return x + self.mlp(self.norm2(x), impl)


class Transformer(nn.Module):
    """Llama-style decoder: embedding -> pre-norm blocks -> final RMSNorm -> LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); projections into the residual stream scaled by 1/sqrt(2*depth)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("wo.weight", "down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.depth))
            else:
                nn.init.normal_(p, std=std)

    def _apply(self, fn, recurse=True):
        # Keep the rotary tables float32 when the weights move to bf16: a bf16 cos/sin is off by
        # up to 4e-3, which grows into visible logit differences over a few hundred positions.
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, device=self.rope_cos.device)
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def kernels(self, device: torch.device, training: bool) -> str:
        """The ops that run: `impl`, where "auto" means the extension for inference and the
        references for training. Training's autograd through the custom ops costs more than the
        kernels save, and torch.compile fuses the references with their neighbours (H200, default
        model, batch 8, compiled step: 20.9 ms with the references, 31.3 ms with the extension)."""
        if self.cfg.impl == "auto" and training:
            return "ref"
        return resolve_impl(self.cfg.impl, device)

    def loss_kernels(self, device: torch.device) -> str:
        """The loss's implementation: the fused linear + cross-entropy ("ext") whenever the
        extension builds, even for impl="auto" in training: it never makes the full float32 logits."""
        return resolve_impl(self.cfg.impl, device)

    def hidden(self, tokens: torch.Tensor, pos=None, caches=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim). With `caches`, tokens sit at `pos` (B, T)."""
        impl = self.kernels(tokens.device, self.training and torch.is_grad_enabled())
        x = self.tok_emb(tokens)                                              # (B, T, dim)
        mask = None
        if caches is not None:  # slot s is visible to a token at position p when s <= p
            slots = torch.arange(self.cfg.max_seq_len, device=tokens.device)
            mask = slots[None, None, None, :] <= pos[:, None, :, None]        # (B, 1, T, S)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, impl, cache, pos, mask,
                               use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin, impl, cache, pos, mask)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head; padded vocabulary rows are cut off, so they can never be sampled."""
        return self.head(h)[..., : self.cfg.vocab_size]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean", *,
                pos=None, caches=None) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab_size); with targets (B, T) int64 (IGNORE_INDEX
        for none), the float32 cross-entropy instead: the mean over non-ignored targets, or their sum.

        The loss never makes the full logits: the extension's fused linear + cross-entropy
        (linear_cross_entropy) unless impl is "ref" (then linear_cross_entropy_ref)."""
        h = self.hidden(tokens, pos, caches)
        if targets is None:
            return self.logits(h)
        if self.loss_kernels(tokens.device) == "ext":
            return linear_cross_entropy(h, self.head.weight, targets, self.cfg.vocab_size, reduction, impl="ext")
        return linear_cross_entropy_ref(h, self.head.weight, targets, self.cfg.vocab_size, reduction)


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_VERSION = 1  # bump when the layout below changes; load_checkpoint refuses others


def save_checkpoint(path: Path, model: Transformer, train_cfg: TrainingConfig, *, step: int,
                    best_val_loss: float, template: dict | None, optimizer=None, extra: dict | None = None) -> None:
    """Write a `torch.load(weights_only=True)`-loadable checkpoint atomically."""
    state = {
        "format_version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_config": dataclasses.asdict(model.cfg),
        "training_config": dataclasses.asdict(train_cfg),
        "step": step,
        "best_val_loss": best_val_loss,
        "template": template,
        **(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or in a directory its best.pt, else its latest.pt."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "latest.pt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"no checkpoint in {path}: train first, or pass --ckpt FILE")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: train first, or pass --ckpt FILE")
    return path


def read_checkpoint(path: Path, device: str | torch.device) -> dict:
    """The checkpoint dict of file `path`, weights on `device`. Errors name the file and the fix."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, foreign formats: all one message
        raise UserError(f"checkpoint {path} is corrupt or not an Optimus checkpoint "
                        f"({type(exc).__name__}): re-create it or pass another --ckpt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_VERSION:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"checkpoint {path} has format version {found}, this code reads "
                        f"{CHECKPOINT_VERSION}: re-create it with this version")
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """(model on `device` in eval mode, the checkpoint dict). Errors name the file and the fix."""
    path = find_checkpoint(path)
    ckpt = read_checkpoint(path, device)
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError, UserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} does not match this model code ({first}): "
                        f"re-create it with this version") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- data loading
# The token stream (uint16 GPT-2 ids) is cut into windows of max_length + 1 tokens at a stride of
# max_length (inputs and their next-token targets). Epoch e visits the windows in a permutation
# seeded by (seed, e); step s takes the s-th block of batch_size windows of that endless order. The
# data a step sees is a pure function of (seed, step): resume and several ranks need no loader state.


def read_tokens(path: Path):
    """A read-only memory map of a token file (little-endian uint16)."""
    import numpy as np
    return np.memmap(path, dtype="<u2", mode="r")


class TrainWindows(torch.utils.data.Dataset):
    """Item i: this rank's i-th micro-batch, a (micro_batch, max_length + 1) int64 tensor."""

    def __init__(self, path: Path, max_length: int, batch_size: int, micro_batch: int,
                 seed: int, rank: int = 0, world: int = 1):
        self.path, self.max_length, self.seed = path, max_length, seed
        self.batch_size, self.micro_batch, self.rank, self.world = batch_size, micro_batch, rank, world
        self.accum = batch_size // (micro_batch * world)  # micro-steps per optimizer step
        self.num_windows = (len(read_tokens(path)) - 1) // max_length
        self._tokens, self._perms = None, {}  # opened lazily: each loader worker maps its own

    def window_order(self, epoch: int):
        import numpy as np
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return 2**62  # endless: the sampler picks the items

    def __getitem__(self, i: int) -> torch.Tensor:
        import numpy as np
        if self._tokens is None:
            self._tokens = read_tokens(self.path)
        step, micro = divmod(i, self.accum)
        # Rows of the global batch: micro-step a of rank r takes block (a * world + r).
        first = step * self.batch_size + (micro * self.world + self.rank) * self.micro_batch
        rows = []
        for g in range(first, first + self.micro_batch):
            epoch, j = divmod(g, self.num_windows)
            start = int(self.window_order(epoch)[j]) * self.max_length
            rows.append(self._tokens[start: start + self.max_length + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C is the main process's to handle (it saves a checkpoint); a worker that died of it
    # would break the final steps.
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(windows: TrainWindows, first_step: int, last_step: int, num_workers: int, pin: bool):
    """Micro-batches for steps [first_step, last_step), prepared ahead by background workers."""
    items = range(first_step * windows.accum, last_step * windows.accum)
    return torch.utils.data.DataLoader(
        windows, batch_size=None, sampler=items, num_workers=num_workers, pin_memory=pin,
        worker_init_fn=_ignore_sigint if num_workers else None,
        prefetch_factor=4 if num_workers else None, persistent_workers=False)


def val_windows(path: Path, max_length: int, count: int) -> torch.Tensor:
    """The fixed validation set: the first `count` windows of val.bin, (count, max_length + 1)."""
    import numpy as np
    tokens = read_tokens(path)
    n = min(count, (len(tokens) - 1) // max_length)
    if n < 1:
        raise UserError(f"{path} has {len(tokens)} tokens, fewer than max_length + 1 = {max_length + 1}: "
                        f"lower --max_length or give more validation data")
    return torch.from_numpy(np.stack([tokens[i * max_length: i * max_length + max_length + 1]
                                      for i in range(n)]).astype(np.int64))


# ----------------------------------------------------------------------------- trainer

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), the denominator of MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
MEMORY_HEADROOM = 0.9  # the batch finder keeps 10% of GPU memory free for allocator fragmentation


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6 per weight that multiplies (forward 2,
    backward 4; the embedding lookup is free, the LM head is not) plus 12 * depth * dim * seq_len
    for attention scores and values. Checkpointing's recomputation is not counted (that is MFU)."""
    cfg = model.cfg
    matmul_weights = sum(p.numel() for p in model.blocks.parameters()) + model.head.weight.numel()
    return 6 * matmul_weights + 12 * cfg.depth * cfg.dim * seq_len


def lr_at(step: int, cfg: TrainingConfig, total_steps: int) -> float:
    """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - floor)


@dataclass
class DistEnv:
    """Where this process sits in a torchrun job (rank 0 of 1 when run plainly)."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
        return t


def init_distributed(device: str) -> tuple[DistEnv, str]:
    """Join torchrun's process group if its environment is set; returns (env, this rank's device)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return DistEnv(), device
    import datetime
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        device = f"cuda:{env.local_rank}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10),
            device_id=torch.device(device) if use_cuda else None)
    return env, device


def git_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLog:
    """runs/<run>/: config.json (what reproduces the run) and metrics.jsonl; TensorBoard if installed."""

    def __init__(self, run_dir: Path, record: dict, enabled: bool):
        self.enabled, self.writer, self.path = enabled, None, run_dir / "metrics.jsonl"
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir))
        except ImportError:
            print("tensorboard is not installed: logging to metrics.jsonl only "
                  "(pip install -e \".[tensorboard]\" for TensorBoard)")

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def ensure_token_files(cfg: TrainingConfig, dist: DistEnv) -> dict:
    """The data directory's meta.json, running data preparation first if its files are missing."""
    data_dir = Path(cfg.data_dir)
    try:
        if dist.is_main and not all((data_dir / n).is_file() for n in ("train.bin", "val.bin", "meta.json")):
            print(f"no token files in {data_dir}: preparing them first")
            data_prep.prepare(cfg.data_input or None, str(data_dir), cfg.dataset_size, cfg.train_val_split,
                              cfg.seed, cfg.dataset_name)
        dist.barrier()
        return data_prep.load_meta(str(data_dir))
    except data_prep.DataError as exc:
        raise UserError(str(exc)) from None


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# Fields that fix which tokens each step sees: a resumed run must keep them.
DATA_ORDER_FIELDS = ("batch_size", "max_length", "seed", "data_dir")


class Trainer:
    """Single- or multi-process (torchrun) training of a Transformer on the token files."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainingConfig):
        self.cfg = cfg
        self.dist, device = init_distributed(cfg.device)
        self.rt = resolve_runtime(device)
        if cfg.max_length > model_cfg.max_seq_len:
            raise UserError(f"max_length {cfg.max_length} exceeds the model's max_seq_len "
                            f"{model_cfg.max_seq_len}: lower --max_length or raise --max_seq_len")
        if cfg.batch_size % self.dist.world:
            raise UserError(f"batch_size {cfg.batch_size} must be a multiple of the {self.dist.world} ranks")
        self.meta = ensure_token_files(cfg, self.dist)
        if self.meta["vocab_size"] > model_cfg.vocab_size:
            raise UserError(f"the data's vocabulary ({self.meta['vocab_size']}) is larger than the model's "
                            f"vocab_size ({model_cfg.vocab_size}): raise --vocab_size")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = Transformer(model_cfg).to(self.rt.device)
        self.impl = self.model.kernels(self.rt.device, training=True)
        self.loss_impl = self.model.loss_kernels(self.rt.device)  # resolved here, not inside a compiled forward
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=self.rt.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.rt.needs_grad_scaler else None
        self.step, self.best_val, self.run_name = 0, float("inf"), cfg.run_name
        if cfg.resume:
            self.restore(Path(cfg.checkpoint_dir) / "latest.pt")
        self.micro_batch = self.find_micro_batch()
        data_dir = Path(cfg.data_dir)
        self.windows = TrainWindows(data_dir / "train.bin", cfg.max_length, cfg.batch_size,
                                    self.micro_batch, cfg.seed, self.dist.rank, self.dist.world)
        if self.windows.num_windows < 1:
            raise UserError(f"{data_dir / 'train.bin'} is shorter than max_length + 1 tokens: "
                            f"lower --max_length or give more data")
        self.val = val_windows(data_dir / "val.bin", cfg.max_length, cfg.eval_batches * cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, cfg.num_epochs * self.windows.num_windows // cfg.batch_size)
        self.forward = self.wrap_model()
        self.stop_requested = False
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.rt.device)
        if not self.run_name:
            import time
            self.run_name = time.strftime("%Y%m%d-%H%M%S")
        self.log = RunLog(Path(cfg.tensorboard_dir) / self.run_name, self.run_record(), self.dist.is_main)

    # -- setup

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, step, best loss, RNG and run name."""
        if not path.is_file():
            raise UserError(f"--resume given but {path} does not exist: train without --resume first")
        ckpt = read_checkpoint(path, self.rt.device)
        # impl only picks kernels: a run may resume with other ones.
        if {**ckpt.get("model_config", {}), "impl": self.model.cfg.impl} != dataclasses.asdict(self.model.cfg):
            raise UserError(f"{path} was trained with another model config: pass the same model flags to resume")
        changed = [f for f in DATA_ORDER_FIELDS if ckpt["training_config"].get(f) != getattr(self.cfg, f)]
        if changed:
            raise UserError(f"{path} was trained with other {', '.join(changed)}: "
                            f"resume with the same values, or start a new run without --resume")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.best_val = ckpt["step"], ckpt["best_val_loss"]
        self.run_name = self.run_name or ckpt.get("run_name", "")
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if self.rt.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.rt.device)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    def loss(self, forward, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Float32 cross-entropy of `forward` (the model, or its compiled/DDP wrapper) on inputs
        (B, T) against targets (B, T), IGNORE_INDEX for none: their mean, or their sum."""
        with self.rt.autocast():
            return forward(inputs, targets, reduction)

    def fits(self, micro_batch: int) -> bool:
        """Probe forward and backward at max_length: does this micro-batch fit with the optimizer?"""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.rt.device)
        try:
            batch = torch.randint(0, self.model.cfg.vocab_size, (micro_batch, self.cfg.max_length + 1),
                                  device=self.rt.device)
            self.loss(self.model, batch[:, :-1], batch[:, 1:]).backward()
            adam_state = 2 * 4 * sum(p.numel() for p in self.model.parameters())  # exp_avg, exp_avg_sq
            peak = torch.cuda.max_memory_allocated(self.rt.device) + adam_state
            ok = peak < MEMORY_HEADROOM * torch.cuda.get_device_properties(self.rt.device).total_memory
        except torch.cuda.OutOfMemoryError:
            ok = False
        self.model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return ok

    def find_micro_batch(self) -> int:
        """The largest micro-batch that fits (halving on out-of-memory); all ranks agree on one."""
        per_rank = self.cfg.batch_size // self.dist.world
        if self.cfg.micro_batch_size:
            if per_rank % self.cfg.micro_batch_size:
                raise UserError(f"micro_batch_size {self.cfg.micro_batch_size} must divide the "
                                f"per-rank batch {per_rank} (batch_size / ranks)")
            return self.cfg.micro_batch_size
        if self.rt.device.type != "cuda":
            return per_rank
        divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0]
        micro = per_rank
        while not self.fits(micro):
            smaller = [d for d in divisors if d <= micro // 2]
            if not smaller:
                raise UserError(f"one sequence of {self.cfg.max_length} tokens does not fit in GPU memory: "
                                f"lower --max_length or turn on --checkpointing")
            micro = smaller[0]
        micro = int(self.dist.all_reduce(torch.tensor(micro, device=self.rt.device), torch.distributed.ReduceOp.MIN))
        if self.dist.is_main:
            print(f"batch finder: micro-batch {micro} x {self.dist.world} rank(s) x "
                  f"{per_rank // micro} accumulation step(s) = batch {self.cfg.batch_size}")
        return micro

    def wrap_model(self):
        """DDP across ranks, then torch.compile: returns the callable the training step uses."""
        model = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(
                model, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None)
        self.ddp = model if self.dist.world > 1 else None
        compile_on = self.cfg.compile == "true" or (self.cfg.compile == "auto" and self.rt.device.type == "cuda")
        # Compiling the DDP-wrapped module lets DDP's optimizer split graphs at its gradient buckets,
        # so communication still overlaps the backward.
        return torch.compile(model) if compile_on else model

    def run_record(self) -> dict:
        return {
            "model_config": dataclasses.asdict(self.model.cfg), "training_config": dataclasses.asdict(self.cfg),
            "micro_batch": self.micro_batch, "world_size": self.dist.world, "total_steps": self.total_steps,
            "kernels": self.impl, "loss_kernels": self.loss_impl, "code_version": git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0], "argv": sys.argv,
            "device": torch.cuda.get_device_name(self.rt.device) if self.rt.device.type == "cuda" else "cpu",
            "dtype": str(self.rt.dtype), "data": self.meta, "parameters": self.model.num_params(),
        }

    # -- the loop

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over batch_size sequences; returns the mean loss (on device)."""
        total = torch.zeros((), device=self.rt.device)
        accum = self.windows.accum
        for micro in range(accum):
            batch = next(batches).to(self.rt.device, non_blocking=True)
            # DDP all-reduces gradients on the last micro-step only.
            sync = self.ddp is None or micro == accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = self.loss(self.forward, batch[:, :-1], batch[:, 1:]) / accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg, self.total_steps)
        clip = self.cfg.gradient_clip_val
        if clip > 0 and self.optimizer.defaults["fused"] and not self.scaler:
            # The clip folded into fused AdamW: `grad_scale` is how GradScaler hands that kernel a
            # scale, and it divides every gradient by it in the pass that updates the weights. So
            # the clip costs one read of the gradients (their norm), not clip_grad_norm_'s extra
            # read and write of all of them. grad / max(1, norm / clip) is clip_grad_norm_'s grad
            # * min(1, clip / norm), to rounding.
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            self.optimizer.grad_scale = ((norm + 1e-6) / clip).clamp(min=1.0)
        elif clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite |= ~torch.isfinite(total)
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (sharded across ranks, then reduced)."""
        self.model.eval()
        sums = torch.zeros(2, device=self.rt.device, dtype=torch.float64)  # (loss sum, token count)
        for chunk in self.val[self.dist.rank:: self.dist.world].split(self.micro_batch):
            batch = chunk.to(self.rt.device)
            # The plain model: a few eager batches cost less than compiling an eval graph (~1 min).
            targets = batch[:, 1:]
            sums[0] += self.loss(self.model, batch[:, :-1], targets, reduction="sum").double()
            sums[1] += (targets != IGNORE_INDEX).sum()
        self.model.train()
        self.dist.all_reduce(sums)
        return float(sums[0] / sums[1])

    def check_finite(self) -> None:
        """Stop, keeping the last good checkpoint, once any step's loss was not finite."""
        if bool(self.dist.all_reduce(self.nonfinite.int())):
            raise UserError(f"the loss became non-finite at or before step {self.step}: no checkpoint was "
                            f"written from then on; lower --learning_rate or check the data, then --resume")

    def save(self, name: str) -> None:
        self.check_finite()
        if self.dist.is_main:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(self.rt.device) if self.rt.device.type == "cuda" else None}
            save_checkpoint(Path(self.cfg.checkpoint_dir) / name, self.model, self.cfg, step=self.step,
                            best_val_loss=self.best_val, template=self.meta.get("template"),
                            optimizer=self.optimizer, extra={"rng": rng, "run_name": self.run_name})
        self.dist.barrier()

    def validate_and_save_best(self) -> float:
        val_loss = self.evaluate()
        self.log.log(self.step, val_loss=val_loss)
        if val_loss < self.best_val:
            self.best_val = val_loss
            self.save("best.pt")
        return val_loss

    def request_stop(self, signum=None, frame=None) -> None:
        """First Ctrl-C: finish this step, save, exit. A second one aborts at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def stop_agreed(self) -> bool:
        if self.dist.world == 1:
            return self.stop_requested
        flag = torch.tensor(int(self.stop_requested), device=self.rt.device)
        return bool(self.dist.all_reduce(flag, torch.distributed.ReduceOp.MAX))

    def fit(self) -> dict:
        """Train to total_steps (or until Ctrl-C); returns the final metrics."""
        import signal
        import time
        cfg, main = self.cfg, self.dist.is_main
        tokens_per_step = cfg.batch_size * cfg.max_length
        flops_step = flops_per_token(self.model, cfg.max_length) * tokens_per_step
        peak = peak_flops(self.rt.device)
        if main:
            print(f"training {self.model.num_params() / 1e6:.1f}M parameters on {self.rt.device} "
                  f"({self.rt.dtype}, kernels: {self.impl}) for {self.total_steps} steps from step {self.step}; "
                  f"logs in {self.log.path.parent}")
        batches = iter(train_loader(self.windows, self.step, self.total_steps, cfg.num_workers,
                                    pin=self.rt.device.type == "cuda"))
        previous_handler = signal.signal(signal.SIGINT, self.request_stop)
        summary = {"train_loss": float("nan"), "val_loss": float("nan")}
        try:
            self.model.train()
            start = time.perf_counter()
            mark_time, mark_step, first_step = start, self.step, self.step
            while self.step < self.total_steps:
                loss = self.train_step(batches)
                self.step += 1
                last = self.step == self.total_steps
                if self.step % cfg.log_interval == 0 or last:
                    train_loss = float(self.dist.all_reduce(loss.clone()) / self.dist.world)
                    self.check_finite()
                    now = time.perf_counter()
                    tok_s = tokens_per_step * (self.step - mark_step) / (now - mark_time)
                    metrics = {"train_loss": train_loss, "lr": lr_at(self.step - 1, cfg, self.total_steps),
                               "tokens_per_s": tok_s}
                    if peak:
                        metrics["mfu"] = flops_step * (self.step - mark_step) / (now - mark_time) / self.dist.world / peak
                        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
                    self.log.log(self.step, **metrics)
                    summary.update(metrics)
                    eta = (now - start) / (self.step - first_step) * (self.total_steps - self.step)
                    if main:
                        mfu = f" | mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                        print(f"step {self.step}/{self.total_steps} | loss {train_loss:.4f} | "
                              f"lr {metrics['lr']:.2e} | {tok_s:,.0f} tok/s{mfu} | eta {format_duration(eta)}",
                              flush=True)
                    mark_time, mark_step = now, self.step
                if self.step % cfg.eval_interval == 0 or last:
                    eval_start = time.perf_counter()
                    summary["val_loss"] = self.validate_and_save_best()
                    if main:
                        print(f"step {self.step}: val loss {summary['val_loss']:.4f} (best {self.best_val:.4f})")
                    mark_time += time.perf_counter() - eval_start  # tokens/s counts training steps only
                stopping = self.stop_agreed()
                if self.step % cfg.checkpoint_interval == 0 or last or stopping:
                    self.save("latest.pt")
                if stopping:
                    if main:
                        print(f"stopped at step {self.step}: {Path(cfg.checkpoint_dir) / 'latest.pt'} "
                              f"saved; continue with --resume")
                    break
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            self.log.close()
        summary.update(step=self.step, best_val_loss=self.best_val, micro_batch=self.micro_batch)
        return summary


def train(model_cfg: ModelConfig, train_cfg: TrainingConfig) -> dict:
    """Train a model (see Trainer); returns its final metrics."""
    trainer = Trainer(model_cfg, train_cfg)
    try:
        return trainer.fit()
    finally:
        if trainer.dist.world > 1:
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- sampler


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    """Raise one ValueError naming the argument that is out of range."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps all tokens), got {top_k}")


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int = 0) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k, then top-p (nucleus)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                 # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)    # (B, V)
        sorted_probs = sorted_logits.softmax(-1)
        # Keep a token while the probability before it is still short of top_p: the smallest
        # set that reaches top_p, and never empty (the first token has nothing before it).
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)                    # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from (B, V) logits. temperature 0 is argmax. No host synchronization:
    argmax(p / E) with E ~ Exp(1) picks token i with probability p_i (the exponential race)."""
    check_sampling_args(temperature, top_p, top_k)
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_p, top_k)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(-1)


class Decoder:
    """A model with static KV caches for `batch` sequences: prefill, then one token per step.

    On CUDA the one-token step is captured once in a CUDA graph (`self.graph`) and replayed, so a
    step costs one launch instead of one per kernel; its inputs and output live in static buffers.
    `compile=True` runs that step through torch.compile first, which fuses its small kernels (the
    first step then takes tens of seconds; H200 numbers in the README).
    """

    @torch.no_grad()
    def __init__(self, model: Transformer, batch: int, use_graph: bool | None = None, compile: bool = False):
        self.model, self.batch = model, batch
        device = model.tok_emb.weight.device
        self.caches = [KVCache(batch, model.cfg, model.tok_emb.weight.dtype, device) for _ in model.blocks]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)       # (B, 1)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)          # (B, 1)
        self.forward_step = self._step
        if compile:  # the CUDA graph below launches the kernels: Inductor must not add its own graphs
            mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else None
            self.forward_step = torch.compile(self._step, mode=mode)  # graph breaks: CPU ref bounds checks
        self.graph = None
        if use_graph if use_graph is not None else device.type == "cuda":
            self.graph = self._capture()

    def _step(self) -> torch.Tensor:
        return self.model.logits(self.model.hidden(self.tokens, self.pos, self.caches)[:, -1])  # (B, V)

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: kernels load, workspaces settle
            for _ in range(2):
                self.forward_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.forward_step()
        return graph  # the capture wrote slot 0 of the caches: prefill rewrites it before any read

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) right-padded, lengths (B,): fill the caches, return (B, V) next-token logits."""
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device).expand(B, T)                  # (B, T)
        h = self.model.hidden(tokens, pos, self.caches)                            # (B, T, dim)
        return self.model.logits(h[torch.arange(B, device=tokens.device), lengths - 1])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at positions pos (B,) -> (B, V) logits for the token after each."""
        self.tokens.copy_(tokens[:, None])
        self.pos.copy_(pos[:, None])
        if self.graph is None:
            return self.forward_step()
        self.graph.replay()
        return self.logits

    def warm_up(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> None:
        """One short generation, thrown away. On CUDA a kernel's first launch loads it (milliseconds
        each): without this, the first answer's tokens/s would count that loading too."""
        for _ in generate(self.model, [[EOT_ID] * 8] * self.batch, 2, temperature, top_p, top_k,
                          eot_id=None, decoder=self):
            pass

    def check(self) -> None:
        """Raise if any cache write was out of range (CUDA kernels flag it instead of raising)."""
        if any(bool(c.status) for c in self.caches):
            raise RuntimeError("a KV-cache write fell outside the cache: positions must be < max_seq_len")


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> list[list[int]]:
    """Keep each prompt's newest tokens so prompt + answer fit in max_seq_len (warns when cut)."""
    if not 0 < max_new_tokens < max_seq_len:
        raise ValueError(f"max_new_tokens must be between 1 and max_seq_len - 1 = {max_seq_len - 1}, "
                         f"got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    keep = max_seq_len - max_new_tokens + 1  # the last new token is never fed back
    if any(len(p) > keep for p in prompts):
        warnings.warn(f"prompt longer than {keep} tokens (max_seq_len {max_seq_len} - max_new_tokens "
                      f"{max_new_tokens} + 1): its oldest tokens were dropped")
    return [p[-keep:] for p in prompts]


PREFILL_BUCKET = 64  # prompt lengths the prefill is padded to a multiple of


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, eot_id: int | None = EOT_ID,
             decoder: Decoder | None = None, stop_check_every: int = 8):
    """Yield (B,) tensors of new tokens, one per step, for prompts of any lengths.

    A sequence that produced `eot_id` yields `eot_id` from then on; generation ends after
    max_new_tokens, or once every sequence is done (checked every `stop_check_every` steps, each
    check a host sync). Prompts too long for max_seq_len lose their oldest tokens, with a warning.
    """
    check_sampling_args(temperature, top_p, top_k)
    device = model.tok_emb.weight.device
    prompts = fit_prompts(prompts, max_new_tokens, model.cfg.max_seq_len)
    B = len(prompts)
    decoder = decoder or Decoder(model, B)
    if decoder.batch != B:
        raise ValueError(f"decoder was built for batch {decoder.batch}, got {B} prompts")
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    # Prompts are right-padded to a multiple of PREFILL_BUCKET: a new length costs the attention
    # and matmul libraries a new plan (tens of ms on CUDA), a few lengths cost it once each. The
    # padding's cache slots lie past each prompt, where decoding overwrites them before reading.
    width = min(-(-max(map(len, prompts)) // PREFILL_BUCKET) * PREFILL_BUCKET, model.cfg.max_seq_len)
    padded = torch.full((B, width), eot_id or 0, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    logits = decoder.prefill(padded.to(device), lengths)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, top_k, generator)
        if eot_id is not None:
            token = token.masked_fill(done, eot_id)
            done |= token == eot_id
        yield token
        if i + 1 == max_new_tokens or (eot_id is not None and (i + 1) % stop_check_every == 0 and bool(done.all())):
            break
        logits = decoder.step(token, lengths + i)
    decoder.check()


def load_tokenizer():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def inference_model(ckpt: str, device: str, impl: str) -> tuple[Transformer, dict, Runtime]:
    """A checkpoint's model ready to generate: on `device`, eval mode, bf16/fp16 weights on CUDA."""
    rt = resolve_runtime(device)
    model, ckpt_dict = load_checkpoint(ckpt, rt.device)
    model.cfg.impl = impl
    if rt.device.type == "cuda":
        model = model.to(rt.dtype)  # decoding reads every weight per token: half the bytes, ~2x speed
    resolve_impl(impl, rt.device)
    return model, ckpt_dict, rt


class TextStream:
    """Token ids in, printable text out: holds back bytes until they form whole UTF-8 characters."""

    def __init__(self, enc):
        import codecs
        self.enc, self.utf8 = enc, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.utf8.decode(self.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def read_behind(steps, lag: int = 8):
    """Yield the items of `steps` `lag` steps late. Reading a token (a device tensor) waits for the
    GPU to reach it; by then `lag` more steps are queued behind it, so the GPU never idles while
    the host prints (the text appears some milliseconds later)."""
    import collections
    pending = collections.deque()
    for step in steps:
        pending.append(step)
        if len(pending) > lag:
            yield pending.popleft()
    yield from pending


def answer(model: Transformer, decoder: Decoder, enc, text: str, settings: dict, template: dict | None,
           generator: torch.Generator | None, out=sys.stdout) -> tuple[int, float, float]:
    """Stream one answer to `out`; returns (tokens generated, seconds, seconds to the first token,
    the prompt's prefill included). Ctrl-C ends it early."""
    import time
    prompt = data_prep.format_prompt(template, text) if template and not settings["raw"] else text
    ids = enc.encode_ordinary(prompt)
    stream, count, start = TextStream(enc), 0, time.perf_counter()
    first = 0.0
    try:
        for token in read_behind(generate(model, [ids], settings["max_new_tokens"], settings["temperature"],
                                          settings["top_p"], settings["top_k"], generator, decoder=decoder)):
            token = int(token[0])
            first = first or time.perf_counter() - start
            if token == EOT_ID:
                break
            count += 1
            out.write(stream.push(token))
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write(stream.flush() + "\n")
    out.flush()
    return count, time.perf_counter() - start, first


REPL_HELP = """commands:
  /temp T      sampling temperature (0: greedy)
  /top_p P     nucleus sampling threshold in (0, 1]
  /top_k K     keep the K most likely tokens (0: all)
  /max N       new tokens per answer
  /raw on|off  feed prompts as-is instead of through the instruction template
  /show        the current settings
  /help        this list
  /quit        exit (Ctrl-D too); Ctrl-C stops an answer"""
REPL_SETTINGS = {"/temp": ("temperature", float), "/top_p": ("top_p", float), "/top_k": ("top_k", int),
                 "/max": ("max_new_tokens", int), "/raw": ("raw", bool)}


def repl_command(line: str, settings: dict, max_seq_len: int) -> str | None:
    """Apply one /command to the settings; returns what to print, or None to quit."""
    name, _, arg = line.strip().partition(" ")
    if name in ("/quit", "/exit"):
        return None
    if name == "/help":
        return REPL_HELP
    if name == "/show":
        return "  ".join(f"{k}={v}" for k, v in settings.items())
    if name not in REPL_SETTINGS:
        return f"unknown command {name}: /help lists them"
    key, typ = REPL_SETTINGS[name]
    try:
        text = arg.strip()
        value = parse_value(key, {"on": "true", "off": "false"}.get(text, text) if typ is bool else text, typ)
        trial = {**settings, key: value}
        check_sampling_args(trial["temperature"], trial["top_p"], trial["top_k"])
        if not 0 < trial["max_new_tokens"] < max_seq_len:
            raise ValueError(f"max tokens must be between 1 and {max_seq_len - 1}")
    except (UserError, ValueError) as exc:
        return f"not changed: {exc}"
    settings[key] = value
    return f"{key} = {value}"


def cmd_sample(argv: list[str]) -> int:
    args = command_flags(argv, SAMPLE_FLAGS)
    try:
        check_sampling_args(args["temperature"], args["top_p"], args["top_k"])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args["impl"] not in ("auto", "ext", "ref"):
        raise UserError(f"--impl must be auto, ext or ref, got '{args['impl']}'")
    model, ckpt, rt = inference_model(args["ckpt"], args["device"], args["impl"])
    if not 0 < args["max_new_tokens"] < model.cfg.max_seq_len:
        raise UserError(f"--max_new_tokens must be between 1 and {model.cfg.max_seq_len - 1} "
                        f"(the model's max_seq_len - 1)")
    generator = None
    if args["seed"] is not None:
        generator = torch.Generator(rt.device).manual_seed(args["seed"])
    settings = {k: args[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "raw")}
    if args["compile"]:
        print("compiling the decoding step (once per process; tens of seconds on a GPU)...", file=sys.stderr)
    enc, decoder, template = load_tokenizer(), Decoder(model, 1, compile=args["compile"]), ckpt.get("template")
    if rt.device.type == "cuda":
        decoder.warm_up(settings["temperature"], settings["top_p"], settings["top_k"])

    def respond(text: str) -> None:
        count, seconds, first = answer(model, decoder, enc, text, settings, template, generator)
        print(f"[{count} tokens, {count / max(seconds, 1e-9):.1f} tokens/s, first token after "
              f"{first * 1e3:.0f} ms]", file=sys.stderr)

    if args["prompt"] is not None:
        respond(args["prompt"])
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Optimus Prime ({model.num_params() / 1e6:.1f}M parameters, {rt.device}). /help lists "
              f"commands, /quit exits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D exits)")
            continue
        if line.startswith("/"):
            reply = repl_command(line, settings, model.cfg.max_seq_len)
            if reply is None:
                return 0
            print(reply)
        elif line.strip():
            respond(line)


# ----------------------------------------------------------------------------- export
# A checkpoint as a Hugging Face Llama directory that `LlamaForCausalLM.from_pretrained(dir)` loads
# with none of this code: our math is Llama's (see DESIGN.md), so the weights only change names.
# The rotary tables are rotate-half in both, so q and k need no permutation.

# Every file an export writes; --force replaces a directory that holds nothing else.
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_config(cfg: ModelConfig) -> dict:
    """config.json: LlamaConfig fields for our ModelConfig."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,  # the real vocabulary: padded rows are not exported
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads the top-level rope_theta (5 accepts it too).
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "dtype": "float32",
        "torch_dtype": "float32",  # the name before transformers 4.56, still read by other tools
    }


def hf_generation_config() -> dict:
    """generation_config.json: `model.generate()` samples like our `sample` command by default."""
    defaults = {name: SAMPLE_FLAGS[name][1] for name in ("temperature", "top_p", "top_k", "max_new_tokens")}
    # pad_token_id: GPT-2 has no pad token; naming EOT spares generate() its warning on every call.
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID, "do_sample": True, **defaults}


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names: float32, contiguous, each its own storage (safetensors' rule)."""
    cfg = model.cfg
    vocab = cfg.vocab_size
    tensors = {"model.embed_tokens.weight": model.tok_emb.weight[:vocab]}  # (vocab, dim): padding cut off
    for i, block in enumerate(model.blocks):
        layer = f"model.layers.{i}."
        tensors.update({
            layer + "input_layernorm.weight": block.norm1.weight,
            layer + "self_attn.q_proj.weight": block.attn.wq.weight,
            layer + "self_attn.k_proj.weight": block.attn.wk.weight,
            layer + "self_attn.v_proj.weight": block.attn.wv.weight,
            layer + "self_attn.o_proj.weight": block.attn.wo.weight,
            layer + "post_attention_layernorm.weight": block.norm2.weight,
            layer + "mlp.gate_proj.weight": block.mlp.gate.weight,
            layer + "mlp.up_proj.weight": block.mlp.up.weight,
            layer + "mlp.down_proj.weight": block.mlp.down.weight,
        })
    tensors["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:  # tied: transformers re-ties lm_head to embed_tokens on load
        tensors["lm_head.weight"] = model.head.weight[:vocab]
    return {name: t.detach().to(torch.float32, copy=True).contiguous() for name, t in tensors.items()}


# GPT-2's own tokenizer files. tiktoken builds its gpt2 encoding from exactly these two and keeps
# them in its cache (TIKTOKEN_CACHE_DIR), so they are on disk wherever the tokenizer loads.
GPT2_FILES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def gpt2_tokenizer_files(model_max_length: int) -> dict[str, object]:
    """GPT-2's tokenizer for transformers, slow (vocab.json, merges.txt: GPT-2's encoder.json and
    vocab.bpe as they are) and fast (tokenizer.json, the same BPE in the `tokenizers` format).
    Returns {file name: JSON object, or text for merges.txt}."""
    from tiktoken.load import read_file_cached
    vocab = json.loads(read_file_cached(GPT2_FILES_URL + "encoder.json"))
    merges_txt = read_file_cached(GPT2_FILES_URL + "vocab.bpe").decode()
    merges = [line for line in merges_txt.split("\n")[1:] if line]  # after the "#version" line
    eot = next(text for text, token_id in vocab.items() if token_id == EOT_ID)  # "<|endoftext|>"
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {  # the `tokenizers` library's format, for the fast tokenizer
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT_ID, "content": eot, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", **special, "add_bos_token": False, "add_prefix_space": False,
        # Decoding must give back exactly the text (tiktoken's round trip), not tidied spaces.
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": model_max_length,
    }
    return {
        "vocab.json": vocab,
        "merges.txt": merges_txt,
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
    }


def check_export_dir(out: Path, ckpt: Path, force: bool) -> None:
    """Refuse an --out that would lose data: a file, another project's files, the checkpoint itself."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory: choose another --out")
    if ckpt.resolve().is_relative_to(out.resolve()):
        raise UserError(f"{out} holds the checkpoint being exported ({ckpt}): choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not force:
        raise UserError(f"{out} exists and is not empty: pass --force or choose another --out")
    foreign = [name for name in entries if name not in HF_FILES]
    if foreign:  # --force deletes the old directory, so it must hold only a previous export
        raise UserError(f"{out} holds files that are not from an export ({', '.join(foreign[:3])}): "
                        f"--force only replaces a previous export; choose another --out")


def export_hf(ckpt: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write checkpoint `ckpt` as a Hugging Face Llama model directory `out_dir`, returned as a Path.

    Files are written into a temporary sibling directory that takes the name `out_dir` only when
    complete, so a crash never leaves a half-written model; with `force` it replaces an earlier
    export, and the old one goes only after the new one is in place.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError('export needs the safetensors package: pip install -e ".[hf]"') from None
    out = Path(os.path.abspath(out_dir))  # "." or "..": the staging sibling must sit beside it, not in it
    ckpt_path = find_checkpoint(ckpt)
    check_export_dir(out, ckpt_path, force)  # before loading: a large checkpoint takes a while
    model, _ = load_checkpoint(ckpt_path, "cpu")
    cfg = model.cfg
    tokenizer = load_tokenizer()
    if cfg.vocab_size < tokenizer.n_vocab:
        raise UserError(f"the checkpoint's vocab_size {cfg.vocab_size} is smaller than GPT-2's "
                        f"{tokenizer.n_vocab}: its tokenizer cannot be exported with it")

    # Named like atomic_write's temporary files; mkdir (not mkdtemp's 0700) keeps the user's umask.
    staging, old = (out.with_name(f".{out.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed run that had our pid
    staging.mkdir(parents=True)
    try:
        files = {"config.json": hf_config(cfg), "generation_config.json": hf_generation_config(),
                 **gpt2_tokenizer_files(cfg.max_seq_len)}
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            (staging / name).write_text(text, encoding="utf-8")
        # transformers 4.x refuses a safetensors file whose metadata lacks "format": "pt"
        save_file(hf_state_dict(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out



# ----------------------------------------------------------------------------- CLI


def parse_value(name: str, text: str, typ) -> object:
    """Convert one flag's text to its field's type, or raise a UserError naming the flag."""
    if typ is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"--{name} expects true/false/1/0, got '{text}'")
    try:
        return typ(text)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(typ, typ.__name__)
        raise UserError(f"--{name} expects {kind}, got '{text}'") from None


def parse_flags(argv: list[str], spec: dict[str, type]) -> dict:
    """`--name value`, `--name=value`, bare `--name` (booleans only: true) -> {name: value}."""
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument '{arg}': flags look like --name value (see --help)")
        name, eq, text = arg[2:].partition("=")
        if name not in spec:
            raise UserError(f"unknown flag --{name} (see --help for the list)")
        typ = spec[name]
        if not eq:
            if typ is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                text = "true"
            elif i + 1 < len(argv):
                i += 1
                text = argv[i]
            else:
                raise UserError(f"--{name} needs a value")
        values[name] = parse_value(name, text, typ)
        i += 1
    return values


def config_flag_types() -> dict[str, type]:
    """Every ModelConfig and TrainingConfig field, with its Python type."""
    types = {}
    for cls in (ModelConfig, TrainingConfig):
        hints = typing.get_type_hints(cls)
        types.update({f.name: hints[f.name] for f in dataclasses.fields(cls)})
    return types


SAMPLE_FLAGS: dict[str, tuple[type, object, str]] = {
    "ckpt": (str, "checkpoints", "checkpoint file, or a directory (its best, else its latest)"),
    "prompt": (str, None, "answer this once and exit (without it, on a terminal: interactive)"),
    "raw": (bool, False, "feed the prompt as-is, without the instruction template"),
    "temperature": (float, 0.8, "sampling temperature; 0 is greedy"),
    "top_p": (float, 0.9, "nucleus sampling: smallest token set reaching this probability"),
    "top_k": (int, 0, "keep the k most likely tokens (0: all)"),
    "max_new_tokens": (int, 256, "tokens to generate at most"),
    "seed": (int, None, "random seed (same seed, same output)"),
    "device": (str, "auto", "auto | cpu | cuda | cuda:N"),
    "impl": (str, "auto", "fused kernels: auto | ext | ref"),
    "compile": (bool, False, "torch.compile the one-token step: faster decoding after a slow start"),
}
EXPORT_FLAGS: dict[str, tuple[type, object, str]] = {
    "ckpt": (str, "checkpoints", "checkpoint file, or a directory (its best, else its latest)"),
    "out": (str, None, "output directory for the Hugging Face model"),
    "force": (bool, False, "replace an earlier export in --out"),
}


def usage() -> str:
    lines = [
        "usage: python optimus.py {train,sample,export} [--FIELD VALUE ...]",
        "",
        "  train    train a model: [--preset NAME] and any config field below",
        "  sample   generate text from a checkpoint (interactive without --prompt)",
        "  export   write a checkpoint in the Hugging Face Llama format",
        "",
        f"presets: {', '.join(PRESETS)}",
    ]
    for title, cls in (("model config", ModelConfig), ("training config", TrainingConfig)):
        lines += ["", f"{title} (train --FIELD VALUE):"]
        for f in dataclasses.fields(cls):
            lines.append(f"  --{f.name:<22} {f.default!s:<32} {f.metadata['help']}")
    for title, flags in (("sample", SAMPLE_FLAGS), ("export", EXPORT_FLAGS)):
        lines += ["", f"{title}:"]
        for name, (_, default, help_text) in flags.items():
            lines.append(f"  --{name:<22} {default!s:<32} {help_text}")
    lines += ["", "booleans take true/false/1/0; a bare --FIELD means true; --FIELD=VALUE also works"]
    return "\n".join(lines)


def command_flags(argv: list[str], flags: dict[str, tuple[type, object, str]]) -> dict:
    """Parse a subcommand's own flags and fill in their defaults."""
    values = parse_flags(argv, {name: typ for name, (typ, _, _) in flags.items()})
    return {name: values.get(name, default) for name, (_, default, _) in flags.items()}


def cmd_train(argv: list[str]) -> int:
    values = parse_flags(argv, {"preset": str, **config_flag_types()})
    model_cfg, train_cfg = make_configs(values.pop("preset", "base"), **values)
    train(model_cfg, train_cfg)
    return 0


def cmd_export(argv: list[str]) -> int:
    """Write a checkpoint as a Hugging Face Llama model directory."""
    flags = command_flags(argv, EXPORT_FLAGS)
    if not flags["out"]:
        raise UserError("export needs --out DIR: the directory to write the Hugging Face model to")
    out = export_hf(flags["ckpt"], flags["out"], force=flags["force"])
    print(f"exported {find_checkpoint(flags['ckpt'])} to {out}/ ({', '.join(HF_FILES)})")
    print(f"load it with transformers: LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": cmd_train, "sample": cmd_sample, "export": cmd_export}
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in commands:
        print(f"error: unknown command '{argv[0]}': use train, sample or export (see --help)", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(usage())
        return 0
    try:
        return commands[argv[0]](argv[1:]) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
