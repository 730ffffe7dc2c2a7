"""Optimus Prime: a small, fast, hackable Llama-style language model engine.

One module, read top to bottom: config -> reference ops and kernel dispatch -> model ->
data loading -> trainer -> sampler -> export -> CLI.

    python optimus.py train  [--preset NAME] [--FIELD VALUE ...]
    python optimus.py sample [--ckpt PATH] [--prompt TEXT] ...
    python optimus.py export --ckpt PATH --out DIR
    python optimus.py eval   --ckpt PATH [--data_dir DIR | --input FILE] [--prompts FILE] [--json FILE]
    python optimus.py serve  [--ckpt PATH] [--host 127.0.0.1] [--port 8000] ...
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import functools
import gc
import json
import math
import os
import shutil
import string
import sys
import typing
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import data_prep
from data_prep import atomic_write, remove_leftovers, temporary_path

EOT_ID = 50256  # GPT-2's <|endoftext|>: separates documents, ends every answer
IGNORE_INDEX = -100  # a target that does not count in the loss (F.cross_entropy's default ignore_index)


class UserError(Exception):
    """An error the user can fix; the CLI prints its one-line message instead of a traceback."""


# ----------------------------------------------------------------------------- config


def cfg_field(default, help: str):
    """A dataclass field with its help text (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


# Bounds for the checks below: no sequence, vocabulary or batch is longer than an int64 index can
# count, no run takes more steps than a machine could make in years, no host runs more loaders.
MAX_INDEX = 2**62
MAX_STEPS = 10**12
MAX_WORKERS = 256
# `--cuda_graph auto` captures the step when a step has at most this many tokens (see
# Trainer.resolve_cuda_graph).
GRAPH_AUTO_MAX_TOKENS = 16384


def positive(value) -> bool:
    return 0 < value <= MAX_INDEX


def usable_path(text: str) -> bool:
    """Non-empty, no NUL byte, each part and the whole within the OS's limits (ENAMETOOLONG)."""
    if not text or "\0" in text or len(os.fsencode(text)) >= 4096:
        return False
    return all(len(os.fsencode(part)) <= 255 for part in Path(text).parts)


def check_fields(cfg, title: str, rules: dict[str, tuple[typing.Callable, str]]) -> None:
    """Raise one UserError naming the first field of dataclass `cfg` with the wrong type, a
    non-finite number or a value its rule refuses. Values reach here from the CLI, the presets,
    Python callers and a checkpoint's stored config, so each is checked whatever its source."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, typ = getattr(cfg, f.name), hints[f.name]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        type_ok = is_number if typ is float else isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        if not type_ok:
            kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[typ]
            raise UserError(f"invalid {title}: {f.name} must be {kind}, got {value!r}")
        if typ is float and not math.isfinite(value):
            raise UserError(f"invalid {title}: {f.name} must be a finite number, got {value!r}")
        if f.name in rules and not rules[f.name][0](value):
            raise UserError(f"invalid {title}: {f.name} must be {rules[f.name][1]}, got {value!r}")


@dataclass
class ModelConfig:
    vocab_size: int = cfg_field(50257, "token vocabulary (GPT-2 BPE)")
    dim: int = cfg_field(1024, "model width")
    depth: int = cfg_field(8, "number of transformer blocks")
    num_heads: int = cfg_field(8, "query heads")
    num_kv_heads: int = cfg_field(2, "key/value heads (grouped-query attention)")
    checkpointing: bool = cfg_field(True, "recompute each block in backward to save activation memory")
    checkpoint_policy: str = cfg_field("selective", "what checkpointing recomputes: selective (only the norms, "
                                                    "rotary, SwiGLU and adds; the matmuls' and attention's outputs "
                                                    "are kept) | full (each whole block: least memory)")
    max_seq_len: int = cfg_field(512, "longest sequence: rotary table and KV cache length")
    rope_theta: float = cfg_field(10000.0, "rotary embedding base")
    norm_eps: float = cfg_field(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = cfg_field(True, "share the token embedding with the LM head")
    hidden_dim: int = cfg_field(0, "SwiGLU hidden size; 0: 8/3*dim rounded up to multiple_of")
    multiple_of: int = cfg_field(256, "SwiGLU hidden size is rounded up to a multiple of this")
    vocab_multiple: int = cfg_field(64, "embedding rows padded to a multiple of this (tensor-core friendly)")
    impl: str = cfg_field("auto", "fused kernels: auto (extension if it builds) | ext | ref (pure PyTorch)")

    def __post_init__(self):
        check_fields(self, "model config", {
            "vocab_size": (lambda v: 0 < v <= MAX_INDEX, "positive"), "dim": (positive, "positive"),
            "depth": (positive, "positive"), "num_heads": (positive, "positive"),
            "num_kv_heads": (positive, "positive"), "max_seq_len": (lambda v: 2 <= v <= MAX_INDEX, "at least 2"),
            "rope_theta": (lambda v: v > 0, "positive"), "norm_eps": (lambda v: v > 0, "positive"),
            "hidden_dim": (lambda v: 0 <= v <= MAX_INDEX, "0 (derived) or positive"),
            "multiple_of": (positive, "positive"), "vocab_multiple": (positive, "positive"),
            "impl": (lambda v: v in ("auto", "ext", "ref"), "auto, ext or ref"),
            "checkpoint_policy": (lambda v: v in ("full", "selective"), "full or selective"),
        })
        if self.hidden_dim == 0:
            self.hidden_dim = -(-int(8 * self.dim / 3) // self.multiple_of) * self.multiple_of
        checks = [
            (self.dim % self.num_heads == 0, "dim must be a multiple of num_heads"),
            (self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"),
            ((self.dim // self.num_heads) % 2 == 0, "head dim (dim / num_heads) must be even for rotary"),
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
    cuda_graph: str = cfg_field("auto", "replay each training step from a CUDA graph (CUDA, one process, bf16): "
                                        "true (the whole step in one graph) | reduce-overhead (torch.compile's "
                                        "graphs for forward and backward) | false | auto (true when compiled, "
                                        f"for steps of at most {GRAPH_AUTO_MAX_TOKENS:,} tokens)")
    resume: bool = cfg_field(False, "continue from checkpoint_dir/latest.pt")
    seed: int = cfg_field(1337, "seed for initialisation and data order")
    run_name: str = cfg_field("", "run directory name under tensorboard_dir ('' : a timestamp)")
    loss_on: str = cfg_field("auto", "targets in the loss: response (Dolly responses and their closing "
                                     "<|endoftext|>) | all | auto (response for Dolly data, all for text)")
    init_from: str = cfg_field("", "start a new run (fresh optimizer, step 0) from this checkpoint's weights "
                                   "and model config; with --resume only its model config is used")
    parallel: str = cfg_field("ddp", "under torchrun: ddp (a full replica per rank) | fsdp (FSDP2: "
                                     "parameters, gradients and optimizer state sharded across ranks)")

    def __post_init__(self):
        counts = (lambda v: 0 <= v <= MAX_STEPS, "0 or positive")
        check_fields(self, "training config", {
            "batch_size": (positive, "positive"), "max_length": (lambda v: 1 < v <= MAX_INDEX, "at least 2"),
            "learning_rate": (lambda v: v > 0, "positive"), "weight_decay": (lambda v: v >= 0, "0 or positive"),
            "num_epochs": (lambda v: 0 < v <= MAX_STEPS, "positive"),
            "train_val_split": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
            "gradient_clip_val": (lambda v: v >= 0, "0 (off) or positive"),
            "dataset_size": (lambda v: v == 0 or 2 <= v <= MAX_INDEX, "0 (all) or at least 2"),
            "num_workers": (lambda v: 0 <= v <= MAX_WORKERS, f"between 0 and {MAX_WORKERS}"),
            "checkpoint_dir": (usable_path, "a usable directory path"),
            "tensorboard_dir": (usable_path, "a usable directory path"),
            "data_dir": (usable_path, "a usable directory path"),
            "data_input": (lambda v: v == "" or usable_path(v), "'' or a usable file path"),
            "max_steps": counts, "warmup_steps": counts,
            "min_lr_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
            "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "micro_batch_size": (lambda v: 0 <= v <= MAX_INDEX, "0 (auto) or positive"),
            "eval_interval": (positive, "positive"), "eval_batches": (positive, "positive"),
            "checkpoint_interval": (positive, "positive"), "log_interval": (positive, "positive"),
            "compile": (lambda v: v in ("auto", "true", "false"), "auto, true or false"),
            "cuda_graph": (lambda v: v in ("auto", "true", "false", "reduce-overhead"),
                           "auto, true, false or reduce-overhead"),
            "seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
            # One directory under tensorboard_dir: a '/' or '..' would write outside it.
            "run_name": (lambda v: v == "" or (usable_path(v) and "/" not in v and v not in (".", "..")),
                         "a plain directory name (no '/')"),
            "loss_on": (lambda v: v in ("auto", "response", "all"), "auto, response or all"),
            "init_from": (lambda v: v == "" or usable_path(v), "'' or a usable checkpoint path"),
            "parallel": (lambda v: v in ("ddp", "fsdp"), "ddp or fsdp"),
        })


# Named presets: field overrides for either config. `base` is the product's default model.
PRESETS: dict[str, dict] = {
    "base": {},
    # Small enough to train a few steps on a laptop CPU in seconds (the tests use it).
    "tiny": dict(dim=64, depth=2, num_heads=4, num_kv_heads=2, max_seq_len=128, max_length=64,
                 batch_size=8, num_workers=0, eval_interval=25, eval_batches=4, log_interval=5,
                 checkpoint_interval=25, warmup_steps=5, learning_rate=3e-3),
    # About 1B parameters: more than one GPU holds comfortably with AdamW (16 bytes per
    # parameter before activations); the model `--parallel fsdp` is for (README, Several GPUs).
    "large": dict(dim=2048, depth=20, num_heads=16, num_kv_heads=4),
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
    if values.get("init_from"):  # the checkpoint's model; the preset's model fields give way to it
        values.update(init_model_values(values["init_from"], {k: v for k, v in overrides.items() if k in model_names}))
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
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} "
                            f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(dev, dtype)
    if dev.type != "cpu":
        raise UserError(f"device '{device}' is not supported: use auto, cpu, cuda or cuda:N")
    if dev.index not in (None, 0):  # torch accepts "cpu:3", but tensors cannot be put there
        raise UserError(f"device '{device}' does not exist: the CPU is one device, use --device cpu")
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


def decode_attention_ref(q, k_cache, v_cache, pos, status, scale: float) -> torch.Tensor:
    """Attention of few-token queries against the static cache: query (b, h, t) sees slots <= pos[b, t].

    q: (B, H, T, hd); k_cache, v_cache: (B, KV, S, hd); pos: (B, T) int64; status: (1,) int32.
    Query head h reads kv head h // (H // KV). softmax(scale * q . k) @ v over the visible slots,
    float32 math, one rounding to q's dtype; returns (B, H, T, hd). A position outside [0, S) is
    an error: on CPU IndexError; on CUDA status[0] is set to 1 (no host sync) and the row attends
    to the slots up to its position clamped into [0, S), so the call's output is invalid.
    """
    B, H, T, hd = q.shape
    KV, S = k_cache.shape[1], k_cache.shape[2]
    bad = (pos < 0) | (pos >= S)
    if pos.device.type == "cpu" and bool(bad.any()):
        raise IndexError(f"decode attention position out of range: positions must lie in [0, {S}), "
                         f"got {int(pos.min())}..{int(pos.max())}")
    status.copy_(torch.maximum(status, bad.any().to(status.dtype)))
    p = pos.clamp(0, S - 1)
    k = k_cache.float().repeat_interleave(H // KV, dim=1)                 # (B, H, S, hd)
    v = v_cache.float().repeat_interleave(H // KV, dim=1)                 # (B, H, S, hd)
    scores = (q.float() @ k.transpose(-1, -2)) * scale                    # (B, H, T, S)
    visible = torch.arange(S, device=q.device) <= p[:, None, :, None]     # (B, 1, T, S)
    attn = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (attn @ v).to(q.dtype)


def rope_append_attention_ref(qkv, cos, sin, pos, k_cache, v_cache, status, counts, num_heads: int,
                              scale: float) -> torch.Tensor:
    """A decoding step's attention straight from the packed QKV projection: rope_kv_append_ref of
    its q, k, v (one new token per row, pos (B, 1)), then decode_attention_ref of the rotated q.

    qkv: (B, (H + 2 KV) hd) = [q heads | k heads | v heads]; counts: (B KV,) int32, the CUDA
    kernel's merge counters (unused here). Returns (B, H hd).
    """
    B, KV, hd = qkv.shape[0], k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.unflatten(1, (num_heads + 2 * KV, hd))[:, None].split([num_heads, KV, KV], dim=2)  # (B, 1, heads, hd)
    q = rope_kv_append_ref(q, k, v, cos, sin, pos, k_cache, v_cache, status)                   # (B, H, 1, hd)
    return decode_attention_ref(q, k_cache, v_cache, pos, status, scale).reshape(B, num_heads * hd)


def add_rms_norm_ref(x, delta, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, RMSNorm(s) * weight) with s = x + delta (x when delta is None): a block's residual add
    and the norm after it, rounded as the residual add and RMSNorm.forward round them."""
    s = x if delta is None else x + delta
    sf = s.float()
    return s, weight * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)

def decode_linear_ref(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, eps: float = 1e-5, swiglu: bool = False) -> torch.Tensor:
    """A decoding step's projection, (B, K) -> (B, N) or (B, N/2), with what surrounds it folded in:
    RMSNorm of x first (when `norm_weight` is given, as RMSNorm.forward computes it), SwiGLU of the
    output's two halves after (`swiglu`: weight is [gate; up] stacked), then `residual` added."""
    if norm_weight is not None:
        xf = x.float()
        x = norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, weight)                                      # (B, N)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)                            # (B, N/2) each
        y = swiglu_ref(gate, up)
    return y if residual is None else residual + y


def decode_tail_ref(y: torch.Tensor, x: torch.Tensor, wo: torch.Tensor, norm2: torch.Tensor, wgu: torch.Tensor,
                    wdown: torch.Tensor, next_norm: torch.Tensor | None = None, next_wqkv: torch.Tensor | None = None,
                    eps: float = 1e-5, next_eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """What follows a decoding step's attention output y (B, A) in a block whose input was x (B, D),
    as decode_linear steps: wo + residual, norm2 + gate-up + SwiGLU, down + residual; then the next
    block's norm + QKV projection (next_wqkv (Nq, D); without it qkv is (B, 0)). Returns (out, qkv)."""
    x = decode_linear_ref(y, wo, None, x, eps)                   # (B, D)
    h = decode_linear_ref(x, wgu, norm2, None, eps, swiglu=True)  # (B, Hd)
    x = decode_linear_ref(h, wdown, None, x, eps)                # (B, D)
    if next_wqkv is None:
        return x, x.new_empty((x.shape[0], 0))
    return x, decode_linear_ref(x, next_wqkv, next_norm, None, next_eps)


def adamw_step_ref(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, lr: torch.Tensor,
                   weight_decays: list, beta1: float, beta2: float, eps: float, max_norm: float) -> torch.Tensor:
    """The trainer's optimizer step, in place: clip_grad_norm_(max_norm) of all the gradients
    together (none when max_norm <= 0), then torch.optim.AdamW's update of each parameter i with
    weight decay weight_decays[i]; steps[i] is its step counter (float32 scalar), lr a float32
    scalar. Float32 math; the gradients are not written. Returns their norm before the clip."""
    squares = [g.double().pow(2).sum() for g in grads]
    norm = (torch.stack(squares).sum().sqrt() if squares else lr.new_zeros((), dtype=torch.float64)).float()
    clip = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else torch.ones((), device=lr.device)
    for p, g, m, v, step, wd in zip(params, grads, exp_avgs, exp_avg_sqs, steps, weight_decays):
        step += 1
        g = g * clip
        p.mul_(1 - lr * wd)
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        step_size = lr / (1 - beta1 ** step.double()).float()
        p.sub_(step_size * m / (v.sqrt() / (1 - beta2 ** step.double()).sqrt().float() + eps))
    return norm


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

    @torch.library.register_fake("optimus::add_rms_norm")
    def _(x, delta, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("optimus::sample")
    def _(logits, race, temperature, top_k, top_p, tokens=None, pos=None, done=None, eot_id=-1, table=None, x=None):
        return logits.new_empty(logits.shape[:1], dtype=torch.long)

    @torch.library.register_fake("optimus::decode_attention")
    def _(q, k_cache, v_cache, pos, status, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("optimus::rope_append_attention")
    def _(qkv, cos, sin, pos, k_cache, v_cache, status, counts, num_heads, scale):
        return qkv.new_empty((qkv.shape[0], num_heads * k_cache.shape[3]))

    @torch.library.register_fake("optimus::decode_linear")
    def _(x, weight, norm_weight, residual, eps, swiglu):
        return x.new_empty((x.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0]))

    @torch.library.register_fake("optimus::decode_tail")
    def _(y, x, wo, norm2, wgu, wdown, next_norm, next_wqkv, eps, next_eps):
        return x.new_empty(x.shape), x.new_empty((x.shape[0], 0 if next_wqkv is None else next_wqkv.shape[0]))

    @torch.library.register_fake("optimus::adamw_step")
    def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decays, beta1, beta2, eps, max_norm):
        return lr.new_empty(())

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
    """The visible GPUs' architectures, e.g. "9.0" on an H200 (used when TORCH_CUDA_ARCH_LIST is unset)."""
    return ";".join(sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                            for i in range(torch.cuda.device_count())}))


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


def builds_cuda_kernels() -> bool:
    """Whether load_extension builds the .cu kernels: a CUDA toolkit is found and either a GPU is
    visible (kernels for its architecture) or TORCH_CUDA_ARCH_LIST names the architectures (how CI
    compile-checks them without a GPU). On a GPU-less machine they took minutes and never ran."""
    return cuda_toolkit() is not None and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST")))


# A load still running after this is compiling: a cached load took 0.4-0.6 s, a CPU-only build
# 190-220 s (2 busy cores, load average 11).
BUILD_NOTICE_AFTER_S = 2.0


# Where the extension's sources are: beside this file (a checkout, `pip install -e .`), else where
# a plain `pip install .` puts them (setup.py's data_files, under sys.prefix).
CSRC_DIRS = (Path(__file__).resolve().parent / "csrc", Path(sys.prefix) / "share" / "optimus-prime" / "csrc")


def csrc_dir() -> Path:
    """The first of CSRC_DIRS that holds the extension's C++ sources."""
    for path in CSRC_DIRS:
        if any(path.glob("*.cpp")):
            return path
    raise RuntimeError(f"no extension sources found in {' or '.join(map(str, CSRC_DIRS))}: reinstall "
                       f"Optimus Prime (pip install -e . from a checkout), or run with --impl ref")


def load_extension(verbose: bool = False) -> None:
    """JIT-build (ninja, cached, rebuilt when a source changes) and load the csrc/ extension.

    CPU kernels always; CUDA kernels too where builds_cuda_kernels() says so. A load that is
    compiling says so on stderr, once when it starts and once when it is done. Raises
    RuntimeError with the compiler's message when the build fails.
    """
    if _EXTENSION.get("loaded"):
        return
    import threading
    import time
    with_cuda = builds_cuda_kernels()
    toolkit = cuda_toolkit() if with_cuda else None
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

    src = csrc_dir()
    sources = sorted(str(p) for p in src.glob("*.cpp"))
    if with_cuda:
        sources += sorted(str(p) for p in src.glob("*.cu"))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
    # at::parallel_for is inline OpenMP: without -fopenmp the CPU kernels would run on one thread.
    # The extension then shares torch's libgomp (same soname, already loaded), so one thread pool.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    kinds = "CPU and CUDA" if with_cuda else "CPU"
    # Whether ninja will compile is known only to ninja (sources, flags, the cache): a load that
    # outlasts BUILD_NOTICE_AFTER_S is compiling, so that is when the user hears of it.
    noticed = threading.Event()

    def notice() -> None:
        print(f"building the optimus extension ({kinds} kernels; once, a minute or more)...", file=sys.stderr,
              flush=True)
        noticed.set()
    timer = threading.Timer(BUILD_NOTICE_AFTER_S, notice)
    timer.daemon = True
    start = time.perf_counter()
    timer.start()
    try:
        cpp_extension.load(
            name="optimus_ext", sources=sources, is_python_module=False, verbose=verbose,
            # -fno-trapping-math lets GCC vectorise loops with float selects (csrc/swiglu.cpp); the
            # CUDA kernels pick their fast intrinsics by hand, so no --use_fast_math (it flushes
            # subnormals to zero everywhere).
            extra_cflags=["-O3", "-fno-trapping-math", *(["-DOPTIMUS_WITH_CUDA"] if with_cuda else []), *openmp],
            extra_ldflags=openmp,
            # OPTIMUS_PHASE_CLOCKS=1: kernels that print their phases' clocks (csrc/phase_clocks.h).
            extra_cuda_cflags=["-O3", "-lineinfo",
                               *(["-DOPTIMUS_PHASE_CLOCKS"] if os.environ.get("OPTIMUS_PHASE_CLOCKS") == "1" else [])],
        )
    finally:
        timer.cancel()
        timer.join()  # a notice being printed finishes before the outcome is told
    if noticed.is_set():
        print(f"built the optimus extension in {time.perf_counter() - start:.0f} s (cached for next time)",
              file=sys.stderr, flush=True)
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


def wide_matmul(device: torch.device) -> bool:
    """Whether torch.mm / torch.addmm take out_dtype float32 with 16-bit inputs here (CUDA, torch 2.8+)."""
    return device.type == "cuda" and "dtype" in torch.ops.aten.addmm.overloads()


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
            # matmul, rounded once); grad_h rows are written once, in the matmuls' dtype. Where the
            # matmul can write float32 from bf16 / fp16 inputs (wide_matmul), each chunk's weight
            # gradient is added into grad_w by the matmul itself, unrounded, instead of a 16-bit
            # product, its float32 copy and an add: the loss's forward + backward at 4,096 tokens
            # 2.51 -> 2.35 ms, at 32,768 17.93 -> 17.68 (H200, 2026-12-03, tools/gpu_session6.sh).
            wide = dtype != loss_dtype and wide_matmul(h.device)
            losses, grad_h, grad_w = [], torch.empty_like(h_c) if needs_grad else None, None
            for start in range(0, h.shape[0], chunk):
                end = min(start + chunk, h.shape[0])
                logits = h_c[start:end] @ w_c.t()                                       # (n, Vp)
                losses.append(cross_entropy_fwd_bwd(logits, targets[start:end], scale.reshape(1), vocab_size, impl))
                if needs_grad:  # logits now hold d loss / d logits
                    torch.mm(logits, w_c, out=grad_h[start:end])                       # (n, dim)
                    if wide:  # the matmul's float32 sums go straight into grad_w (Vp, dim)
                        grad_w = (torch.mm(logits.t(), h_c[start:end], out_dtype=loss_dtype) if grad_w is None
                                  else torch.addmm(grad_w, logits.t(), h_c[start:end], out_dtype=loss_dtype))
                    else:
                        part = logits.t() @ h_c[start:end]                              # (Vp, dim)
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


def decode_attention(q, k_cache, v_cache, pos, status, impl: str = "ref") -> torch.Tensor:
    """Few-token queries against the static cache, each reading only its visible slots (see
    decode_attention_ref); scale 1/sqrt(hd) as in F.scaled_dot_product_attention."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "ext":
        return torch.ops.optimus.decode_attention(q, k_cache, v_cache, pos, status, scale)
    return decode_attention_ref(q, k_cache, v_cache, pos, status, scale)


def rope_append_attention(qkv, cos, sin, pos, k_cache, v_cache, status, counts, num_heads: int,
                          impl: str = "ref") -> torch.Tensor:
    """Rotary, cache write and attention for one new token per row from the packed QKV output
    (see rope_append_attention_ref): one CUDA launch instead of rope_kv_append + decode_attention."""
    scale = 1.0 / math.sqrt(k_cache.shape[-1])
    if impl == "ext":
        return torch.ops.optimus.rope_append_attention(qkv, cos, sin, pos, k_cache, v_cache, status, counts,
                                                       num_heads, scale)
    return rope_append_attention_ref(qkv, cos, sin, pos, k_cache, v_cache, status, counts, num_heads, scale)


def adamw_step(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, lr: torch.Tensor,
               weight_decays: list, beta1: float, beta2: float, eps: float, max_norm: float,
               impl: str = "ref") -> torch.Tensor:
    """Clip + AdamW in place (see adamw_step_ref): on CUDA two passes over the parameters and no host
    synchronisation (csrc/adamw.cu). Returns the gradients' norm before the clip."""
    if impl == "ext":
        return torch.ops.optimus.adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decays, beta1,
                                            beta2, eps, max_norm)
    return adamw_step_ref(params, grads, exp_avgs, exp_avg_sqs, steps, lr, weight_decays, beta1, beta2, eps, max_norm)


def add_rms_norm(x, delta, weight, eps: float, impl: str = "ref") -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm in one kernel (see add_rms_norm_ref); mixed dtypes (a float32 gain
    on bf16 activations) take the reference."""
    if impl == "ext" and weight.dtype == x.dtype:
        return tuple(torch.ops.optimus.add_rms_norm(x, delta, weight, eps))
    return add_rms_norm_ref(x, delta, weight, eps)


# Queries per kv head (tokens x H / KV) up to which the cached path uses decode_attention; longer
# blocks (prefill) use SDPA over the cache with a mask. The CUDA kernel keeps that many queries in
# shared memory (csrc/decode_attention.cpp: kCudaMaxQueriesPerKvHead).
DECODE_ATTENTION_MAX_QUERIES = 64
# Rows (batch x new tokens) up to which a decoding step's projections go through decode_linear by
# default (Transformer.step_logits, fused_linear=None). H200, 2026-12-02 (tools/bench_decode_linear.py,
# one block's four projections against cuBLAS plus the separate norm, SwiGLU and add kernels): the
# tensor-core kernel (2..32 rows) takes 0.48-0.76 of their time up to 16 rows and 1.09 at 32; the
# batch-16 step went from 34,643 to 40,821 tokens/s through decode_row. One row takes the CUDA-core kernel.
DECODE_LINEAR_MAX_ROWS = 16

def decode_linear(x, weight, norm_weight=None, residual=None, eps: float = 1e-5, swiglu: bool = False,
                  impl: str = "ref") -> torch.Tensor:
    """[RMSNorm ->] linear [-> SwiGLU] [+ residual] for a decoding step's rows (see decode_linear_ref)."""
    if impl == "ext":
        return torch.ops.optimus.decode_linear(x, weight, norm_weight, residual, eps, swiglu)
    return decode_linear_ref(x, weight, norm_weight, residual, eps, swiglu)


def decode_tail(y, x, wo, norm2, wgu, wdown, next_norm=None, next_wqkv=None, eps: float = 1e-5,
                next_eps: float = 1e-5, impl: str = "ref") -> tuple[torch.Tensor, torch.Tensor]:
    """A block's projections after its attention, and the next block's QKV (see decode_tail_ref):
    on CUDA with one row one persistent launch instead of four decode_linear launches."""
    if impl == "ext":
        return tuple(torch.ops.optimus.decode_tail(y, x, wo, norm2, wgu, wdown, next_norm, next_wqkv, eps, next_eps))
    return decode_tail_ref(y, x, wo, norm2, wgu, wdown, next_norm, next_wqkv, eps, next_eps)


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
        # Set to 1 on CUDA by a write or an attention read at a position out of range (see
        # rope_kv_append_ref, decode_attention_ref).
        self.register_buffer("status", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)
        # rope_append_attention's merge counters, one per (row, kv head): zero between calls.
        self.register_buffer("counts", torch.zeros(batch * cfg.num_kv_heads, dtype=torch.int32, device=device),
                             persistent=False)

    def update(self, q, k, v, cos, sin, pos, impl: str):
        """Rotate q, k at `pos` and store k, v there. Returns (q (B,H,T,hd), keys, values (B,KV,S,hd))."""
        q = rope_kv_append(q, k, v, cos, sin, pos, self.k, self.v, self.status, impl=impl)
        return q, self.k, self.v

    def attend(self, qkv, cos, sin, pos, num_heads: int, impl: str) -> torch.Tensor:
        """One new token per row: qkv (B, (H + 2 KV) hd) at pos (B, 1) -> attention output (B, H hd),
        k and v stored at pos (rope_append_attention)."""
        return rope_append_attention(qkv, cos, sin, pos, self.k, self.v, self.status, self.counts, num_heads, impl)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        self.register_buffer("wqkv", None, persistent=False)  # wq, wk, wv packed for inference

    def forward(self, x, cos, sin, impl: str, cache: KVCache | None = None, pos=None, mask=None):
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if cache is not None and self.wqkv is not None:  # one GEMM instead of three
            qkv = F.linear(x, self.wqkv)                                 # (B, T, (H + 2 KV) hd)
            if T == 1 and mask is None and impl == "ext":  # a decoding step: one kernel to the output
                return self.wo(cache.attend(qkv[:, 0], cos, sin, pos, H, impl)[:, None])  # (B, 1, dim)
            q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, H, hd)                                          # (B, T, H, hd)
        k = k.view(B, T, KV, hd)                                         # (B, T, KV, hd)
        v = v.view(B, T, KV, hd)                                         # (B, T, KV, hd)
        if cache is None:  # whole sequences from position 0: causal attention among themselves
            q = rotate_half_ref(q, cos[:T, None], sin[:T, None]).transpose(1, 2)  # (B, H, T, hd)
            k = rotate_half_ref(k, cos[:T, None], sin[:T, None]).transpose(1, 2)  # (B, KV, T, hd)
            v = v.transpose(1, 2)                                                 # (B, KV, T, hd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # new tokens at `pos` attend to the cached slots at or before their positions
            q, k, v = cache.update(q, k, v, cos, sin, pos, impl)  # (B, H, T, hd), (B, KV, S, hd) x2
            if mask is None:  # few tokens (decoding): only the visible slots are read
                y = decode_attention(q, k, v, pos, cache.status, impl)
            else:  # long blocks (prefill): flash attention over the whole cache, masked
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)      # (B, T, H*hd)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.register_buffer("wgu", None, persistent=False)  # gate, up packed for inference

    def forward(self, x: torch.Tensor, impl: str, packed: bool = False) -> torch.Tensor:
        if packed and self.wgu is not None:  # inference: one GEMM for gate and up, (..., 2 * hidden)
            return self.down(swiglu_packed(F.linear(x, self.wgu), impl))
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

    def decode_row(self, x: torch.Tensor, qkv: torch.Tensor, cos, sin, cache: KVCache, pos,
                   next_block: "Block | None") -> tuple[torch.Tensor, torch.Tensor]:
        """forward's math for one new token per row, x (B, dim) at pos (B, 1), on the extension,
        from this block's QKV projection qkv (B, (H + 2 KV) hd), which the block before computed:
        the rotary, the cache write and the attention in one kernel, then decode_tail (wo +
        residual, norm2 + gate-up + SwiGLU, down + residual, and next_block's norm1 + QKV; at
        batch 1 on CUDA one persistent launch, else four decode_linear launches). Returns
        (x, next_block's qkv), that qkv (B, 0) for the last block."""
        a, m = self.attn, self.mlp
        y = cache.attend(qkv, cos, sin, pos, a.num_heads, "ext")  # (B, H hd)
        if next_block is None:
            next_norm, next_wqkv, next_eps = None, None, self.norm1.eps
        else:
            next_norm, next_wqkv, next_eps = next_block.norm1.weight, next_block.attn.wqkv, next_block.norm1.eps
        return decode_tail(y, x, a.wo.weight, self.norm2.weight, m.wgu, m.down.weight, next_norm, next_wqkv,
                           self.norm2.eps, next_eps, "ext")

    def cached(self, x, delta, cos, sin, impl: str, cache: KVCache, pos, mask):
        """forward's math through the cache, each residual add fused with the norm after it:
        takes the stream x and the previous block's pending output delta (None for the first),
        returns this block's (x, delta); the caller adds the last delta (in the final norm)."""
        x, h = add_rms_norm(x, delta, self.norm1.weight, self.norm1.eps, impl)
        x, h = add_rms_norm(x, self.attn(h, cos, sin, impl, cache, pos, mask), self.norm2.weight, self.norm2.eps, impl)
        return x, self.mlp(h, impl, packed=True)


def model_bytes(cfg: ModelConfig) -> int:
    """float32 bytes of the weights, the rotary tables and one sequence's KV cache."""
    hd = cfg.head_dim
    block = cfg.dim * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim
    weights = cfg.padded_vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.depth * block + cfg.dim
    return 4 * (weights + cfg.max_seq_len * hd * (1 + 2 * cfg.depth * cfg.num_kv_heads))


def check_memory(cfg: ModelConfig, copies: int) -> None:
    """Refuse, before allocating, a model whose `copies` float32 copies (weights; training adds
    gradients and AdamW's two moments) exceed this machine's memory: the allocation would fail with
    a traceback, or succeed lazily on Linux and end in the out-of-memory killer."""
    if not hasattr(os, "sysconf"):  # Windows: no portable way to ask, let the allocator decide
        return
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = copies * model_bytes(cfg)
    if need > total:
        raise UserError(f"this model needs {need / 2**30:,.1f} GiB ({copies} float32 cop{'y' if copies == 1 else 'ies'} "
                        f"of its weights and tables), more than this machine's {total / 2**30:,.1f} GiB: "
                        f"lower --dim, --depth, --hidden_dim, --vocab_size or --max_seq_len")


# What checkpoint_policy "selective" keeps from a block's forward: the outputs of its matmuls (a
# bias-free F.linear reaches the dispatcher as mm; addmm and bmm are the other GEMMs) and of
# attention (each SDPA backend's forward op returns the output and its logsumexp together). Every
# other op of the block (the norms, rotary, SwiGLU, the residual adds, dtype casts) is recomputed in
# backward from the kept tensors: cheap pointwise passes, where "full" recomputes the block's GEMMs
# and attention as well (tests/test_model.py counts the ops each backward runs).
SELECTIVE_SAVED_OPS = [getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(torch.ops.aten, name)]  # an older torch may lack a backend's op
# torch.utils.checkpoint's context_fn for "selective": given a list of ops, MUST_SAVE for those and
# PREFER_RECOMPUTE for the rest (torch.compile's partitioner follows the same tags).
SELECTIVE_CHECKPOINT_CONTEXTS = functools.partial(create_selective_checkpoint_contexts, SELECTIVE_SAVED_OPS)


class Transformer(nn.Module):
    """Llama-style decoder: embedding -> pre-norm blocks -> final RMSNorm -> LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_memory(cfg, copies=1)
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
        if tokens.shape[-1] > self.cfg.max_seq_len:  # the rotary tables and the cache end there
            raise ValueError(f"{tokens.shape[-1]} tokens are more than the model's max_seq_len "
                             f"{self.cfg.max_seq_len}: feed at most that many")
        impl = self.kernels(tokens.device, self.training and torch.is_grad_enabled())
        x = self.tok_emb(tokens)                                              # (B, T, dim)
        mask = None
        queries = tokens.shape[1] * (self.cfg.num_heads // self.cfg.num_kv_heads)  # per kv head
        if caches is not None and queries > DECODE_ATTENTION_MAX_QUERIES:  # prefill: SDPA, masked
            slots = torch.arange(self.cfg.max_seq_len, device=tokens.device)
            mask = slots[None, None, None, :] <= pos[:, None, :, None]        # (B, 1, T, S)
        if caches is not None:  # inference: residual adds fused into the norms
            delta = None
            for block, cache in zip(self.blocks, caches):
                x, delta = block.cached(x, delta, self.rope_cos, self.rope_sin, impl, cache, pos, mask)
            return add_rms_norm(x, delta, self.norm.weight, self.norm.eps, impl)[1]
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                # No op in a block draws random numbers, so there is no RNG state to preserve (and
                # reading the CUDA one is not allowed while the trainer captures a CUDA graph).
                # "full" passes no context_fn: torch.compile (2.14) fails to trace checkpoint's default
                # one passed explicitly.
                selective = {"context_fn": SELECTIVE_CHECKPOINT_CONTEXTS} \
                    if self.cfg.checkpoint_policy == "selective" else {}
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, impl, cache, pos, mask,
                               use_reentrant=False, preserve_rng_state=False, **selective)
            else:
                x = block(x, self.rope_cos, self.rope_sin, impl, cache, pos, mask)
        return self.norm(x)

    @torch.no_grad()
    def prepare_for_inference(self) -> None:
        """Pack each block's wq, wk, wv into one ((H + 2 KV) hd, dim) matrix and gate, up into one
        (2 hidden, dim) matrix: the cached path then runs one GEMM for each group. They are
        non-persistent buffers (state_dict, checkpoints and export keep the separate weights) and
        copies: call again after the weights change (every Decoder does when it is built). A pack
        of the same shape, dtype and device is refreshed in place, so the CUDA graphs that an
        earlier Decoder of this model captured keep reading live memory, and the new values."""
        def pack(old: torch.Tensor | None, parts: list[torch.Tensor]) -> torch.Tensor:
            new = torch.cat(parts)
            if old is not None and (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device):
                return old.copy_(new)
            return new

        for block in self.blocks:
            a, m = block.attn, block.mlp
            a.wqkv = pack(a.wqkv, [a.wq.weight, a.wk.weight, a.wv.weight])
            m.wgu = pack(m.wgu, [m.gate.weight, m.up.weight])

    def fused_step(self, batch: int, device: torch.device, fused_linear: bool | None = None) -> bool:
        """Whether step_logits takes Block.decode_row for `batch` rows (see there)."""
        fused = batch <= DECODE_LINEAR_MAX_ROWS if fused_linear is None else fused_linear
        return fused and self.kernels(device, training=False) == "ext" and self.blocks[0].attn.wqkv is not None

    def step_logits(self, tokens: torch.Tensor, pos: torch.Tensor, caches,
                    fused_linear: bool | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, vocab_size) for one new token per row, tokens and pos (B, 1), through
        the caches (after prepare_for_inference). On the extension, with `fused_linear` True (any
        batch) or None (up to DECODE_LINEAR_MAX_ROWS rows), the first block's norm + QKV is one
        decode_linear, each block is Block.decode_row (which also computes the next block's QKV), and
        the final norm folds into the LM head's decode_linear; otherwise (or False) hidden() and
        logits(). x (B, dim): the tokens' embedding rows, already gathered (the Decoder's sampling
        step has its sampler write them), used on the decode_row path only."""
        if not (tokens.shape[1] == 1 and self.fused_step(tokens.shape[0], tokens.device, fused_linear)):
            return self.logits(self.hidden(tokens, pos, caches)[:, -1])
        x = self.tok_emb(tokens[:, 0]) if x is None else x                    # (B, dim)
        first = self.blocks[0]
        qkv = decode_linear(x, first.attn.wqkv, first.norm1.weight, None, first.norm1.eps, False, "ext")
        following = list(self.blocks[1:]) + [None]
        for block, cache, nxt in zip(self.blocks, caches, following):
            x, qkv = block.decode_row(x, qkv, self.rope_cos, self.rope_sin, cache, pos, nxt)
        logits = decode_linear(x, self.head.weight, self.norm.weight, None, self.norm.eps, False, "ext")
        return logits[:, : self.cfg.vocab_size]

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
                    best_val_loss: float, template: dict | None, optimizer=None, extra: dict | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> None:
    """Write a `torch.load(weights_only=True)`-loadable checkpoint atomically. `model_state` and
    `optimizer_state` stand in for `model.state_dict()` and `optimizer.state_dict()` (FSDP's
    gathered ones)."""
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    state = {
        "format_version": CHECKPOINT_VERSION,
        "model": model.state_dict() if model_state is None else model_state,
        "optimizer": optimizer_state,
        "model_config": dataclasses.asdict(model.cfg),
        "training_config": dataclasses.asdict(train_cfg),
        "step": step,
        "best_val_loss": best_val_loss,
        "template": template,
        **(extra or {}),
    }
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot write checkpoint {path} ({first}): free some disk space or pass "
                        f"another --checkpoint_dir; the previous {path.name} is unchanged") from None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or in a directory its best.pt, else its latest.pt."""
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        pass  # said below
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a file where a directory should be
        raise UserError(f"cannot use --ckpt {str(path)[:200]} ({getattr(exc, 'strerror', None) or exc}): "
                        f"pass the path of a checkpoint file or directory") from None
    if path.is_dir():
        for name in ("best.pt", "latest.pt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"no checkpoint in {path}: train first, or pass --ckpt FILE")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: train first, or pass --ckpt FILE")
    return path


def template_problem(template) -> str | None:
    """Why a checkpoint's prompt template cannot format a prompt, or None when it can (or is None)."""
    if template is None:
        return None
    if not isinstance(template, dict):
        return f"is a {type(template).__name__}, not a dict"
    for key, allowed in (("prompt", {"instruction"}), ("prompt_with_context", {"instruction", "context"})):
        text = template.get(key)
        if not isinstance(text, str):
            return f"has no string '{key}'"
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            return f"'{key}' is not a format string ({exc})"
        for _, name, spec, conversion in parts:
            if name is not None and (name not in allowed or spec or conversion):
                return f"'{key}' holds the placeholder {{{name}}}; it may use {' and '.join(sorted(allowed))} only"
    return None


def read_checkpoint(path: Path, device: str | torch.device) -> dict:
    """The checkpoint dict of file `path`, weights on `device`. Errors name the file and the fix."""
    corrupt = f"checkpoint {path} is corrupt or not an Optimus checkpoint"
    try:
        # torch.load does not check the zip's CRC-32s: flipped bytes inside a tensor load as wrong
        # weights. testzip reads every member and checks its CRC (0.5 s for a 577 MB checkpoint
        # with the file in the page cache, about as long as torch.load itself).
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as exc:  # not a zip, a truncated one, unreadable: all one message
        raise UserError(f"{corrupt} ({type(exc).__name__}): re-create it or pass another --ckpt") from None
    if damaged is not None:
        raise UserError(f"{corrupt} ({damaged} fails its CRC check: the bytes changed after it was "
                        f"written): re-create it or pass another --ckpt") from None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # pickle errors, foreign formats: all one message
        raise UserError(f"{corrupt} ({type(exc).__name__}): re-create it or pass another --ckpt") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{corrupt} (it holds a {type(ckpt).__name__}, not a dict): pass another --ckpt")
    version = ckpt.get("format_version")
    if type(version) is not int or version != CHECKPOINT_VERSION:
        found = f"format_version {version!r}" if "format_version" in ckpt else "no format_version"
        raise UserError(f"checkpoint {path} has {found}, this code reads format_version "
                        f"{CHECKPOINT_VERSION!r}: re-create it with this version")
    for key in ("model", "model_config"):
        if not isinstance(ckpt.get(key), dict):
            raise UserError(f"checkpoint {path} has no '{key}' dict: it is not a complete Optimus "
                            f"checkpoint; re-create it with train")
    if problem := template_problem(ckpt.get("template")):
        raise UserError(f"checkpoint {path}: its prompt template {problem}: re-create the checkpoint "
                        f"with train, or pass another --ckpt")
    return ckpt


# Model fields a run from a checkpoint (--init_from, --resume) may change: they pick kernels and
# memory use, not the math. A checkpoint from before a field existed has that field's default.
FREE_MODEL_FIELDS = ("impl", "checkpointing", "checkpoint_policy")


def model_conflicts(saved: dict, wanted: dict) -> list[str]:
    """'field value (checkpoint: value)' for each field of `wanted` that contradicts the saved model config."""
    return [f"{k} {v} (checkpoint: {saved.get(k)})" for k, v in wanted.items()
            if k not in FREE_MODEL_FIELDS and saved.get(k) != v]


def init_model_values(path: str | Path, given: dict) -> dict:
    """The model config of checkpoint `path` (file or directory) with the model fields `given` by the
    user, which must agree with it (UserError naming the fields that do not)."""
    saved = read_checkpoint(find_checkpoint(path), "cpu")["model_config"]
    conflicts = model_conflicts(saved, given)
    if conflicts:
        raise UserError(f"--init_from {path}: the model config comes from the checkpoint, and it contradicts "
                        f"{', '.join(conflicts)}: drop those flags")
    return {**saved, **given}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """(model on `device` in eval mode, the checkpoint dict). Errors name the file and the fix."""
    path = find_checkpoint(path)
    ckpt = read_checkpoint(path, device)
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, UserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} does not match this model code ({first}): "
                        f"re-create it with this version") from None
    # Training never saves non-finite weights (check_finite): such values were written by hand.
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise UserError(f"checkpoint {path} holds non-finite weights (in {', '.join(broken[:3])}): "
                        f"pass another --ckpt")
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- data loading
# The token stream (uint16 GPT-2 ids) is cut into windows of max_length + 1 tokens at a stride of
# max_length (inputs and their next-token targets). Epoch e visits the windows in a permutation
# seeded by (seed, e); step s takes the s-th block of batch_size windows of that endless order. The
# data a step sees is a pure function of (seed, step): resume and several ranks need no loader state.
# With --loss_on response, a target counts only where data_prep's response mask (train.mask,
# val.mask: one byte per token) is 1; the others become IGNORE_INDEX. The windows stay the same.


def read_tokens(path: Path):
    """A read-only memory map of a token file (little-endian uint16)."""
    import numpy as np
    return np.memmap(path, dtype="<u2", mode="r")


SCAN_CHUNK = 1 << 24  # tokens per chunk of the id scan: 32 MiB at a time, whatever the file's size


def check_token_files(data_dir: Path, meta: dict, vocab_size: int) -> None:
    """Refuse, before step 1, token files that would fail or train wrongly later: meta.json fields
    missing or of the wrong type, a file missing, empty, of odd size or of another size than
    meta.json counts (cut short, or not the files it describes), ids the model has no row for."""
    meta_path = data_dir / "meta.json"
    redo = f"re-create them with python data_prep.py --out_dir {data_dir}"
    data_vocab, counts = meta.get("vocab_size"), meta.get("counts")
    if type(data_vocab) is not int or data_vocab < 1:
        raise UserError(f"{meta_path} has no positive integer vocab_size (found {data_vocab!r}): {redo}")
    if data_vocab > vocab_size:
        raise UserError(f"the data's vocabulary ({data_vocab}, {meta_path}) is larger than the model's "
                        f"vocab_size ({vocab_size}): raise --vocab_size")
    if meta.get("dtype", "uint16-le") != "uint16-le":
        raise UserError(f"{meta_path} says the tokens are {meta.get('dtype')!r}; this code reads uint16-le: {redo}")
    for split in ("train", "val"):
        path, key = data_dir / f"{split}.bin", f"tokens_{split}"
        count = counts.get(key) if isinstance(counts, dict) else None
        if type(count) is not int or count < 0:
            raise UserError(f"{meta_path} has no integer counts.{key} (found {count!r}): {redo}")
        if not path.is_file():
            raise UserError(f"{path} is missing or not a file: {redo}")
        size = path.stat().st_size
        if size == 0 or size % 2:
            raise UserError(f"{path} is {'empty' if size == 0 else f'{size} bytes, an odd size'}: token files "
                            f"hold 2-byte ids, so it was cut short or is not a token file: {redo}")
        if size != 2 * count:
            raise UserError(f"{path} holds {size // 2:,} tokens but {meta_path} counts {count:,}: one of them was "
                            f"cut short or replaced: {redo}")
        tokens = read_tokens(path)
        for start in range(0, len(tokens), SCAN_CHUNK):
            chunk = tokens[start: start + SCAN_CHUNK]
            if int(chunk.max()) >= vocab_size:
                where = start + int((chunk >= vocab_size).argmax())
                raise UserError(f"{path} holds token id {int(chunk[where - start])} at position {where:,}, "
                                f"outside the model's vocab_size {vocab_size}: {redo}, or raise --vocab_size")


def read_mask(path: Path | None):
    """A read-only memory map of a response mask (uint8 per token), or None (every target counts)."""
    import numpy as np
    return None if path is None else np.memmap(path, dtype="u1", mode="r")


def window_pairs(tokens, mask, starts, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (len(starts), length) int64: the windows of length + 1 tokens at
    `starts`, targets shifted by one, IGNORE_INDEX where `mask` (None: all count) is 0."""
    import numpy as np
    rows = np.stack([tokens[s: s + length + 1] for s in starts]).astype(np.int64)    # (n, length + 1)
    targets = rows[:, 1:].copy()                                                     # (n, length)
    if mask is not None:
        counted = np.stack([mask[s + 1: s + length + 1] for s in starts]).astype(bool)  # (n, length)
        targets[~counted] = IGNORE_INDEX
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(targets)


def mask_paths(data_dir: Path, meta: dict, loss_on: str) -> tuple[str, dict[str, Path | None]]:
    """(the resolved loss_on, {split: its mask file or None}). `auto` is `response` for Dolly data:
    an instruction-tuned model is asked to answer, not to write instructions. Errors say the fix."""
    fmt = meta.get("format")
    if loss_on == "auto":
        loss_on = "response" if fmt == "dolly" else "all"
    if loss_on == "all":
        return loss_on, {"train": None, "val": None}
    if fmt != "dolly":
        raise UserError(f"--loss_on response needs Dolly-format data (instruction/response records), but "
                        f"{data_dir} holds {fmt} data: train with --loss_on all")
    paths = {split: data_dir / f"{split}.mask" for split in ("train", "val")}
    if meta.get("mask") != "response" or not all(p.is_file() for p in paths.values()):
        settings, source = meta.get("settings", {}), meta.get("source", {}).get("path", "DOLLY.jsonl")
        again = " ".join(f"--{k} {v}" for k, v in settings.items())
        raise UserError(f"{data_dir} was prepared by an older data_prep (meta.json version {meta.get('version')}), "
                        f"without the response mask: prepare it again with `python data_prep.py --input "
                        f"{source} --out_dir {data_dir} {again}`, or train on every token with --loss_on all")
    for split, path in paths.items():
        if path.stat().st_size != (data_dir / f"{split}.bin").stat().st_size // 2:
            raise UserError(f"{path} does not match {data_dir / f'{split}.bin'} (one byte per token): "
                            f"prepare {data_dir} again with data_prep.py")
    return loss_on, paths


class TrainWindows(torch.utils.data.Dataset):
    """Item i: this rank's i-th micro-batch, (inputs, targets), each (micro_batch, max_length) int64."""

    def __init__(self, path: Path, max_length: int, batch_size: int, micro_batch: int,
                 seed: int, rank: int = 0, world: int = 1, mask_path: Path | None = None):
        self.path, self.mask_path, self.max_length, self.seed = path, mask_path, max_length, seed
        self.batch_size, self.micro_batch, self.rank, self.world = batch_size, micro_batch, rank, world
        self.accum = batch_size // (micro_batch * world)  # micro-steps per optimizer step
        self.num_windows = (len(read_tokens(path)) - 1) // max_length
        self._tokens, self._mask, self._perms = None, None, {}  # opened lazily: each loader worker maps its own

    def window_order(self, epoch: int):
        import numpy as np
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return 2**62  # endless: the sampler picks the items

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens, self._mask = read_tokens(self.path), read_mask(self.mask_path)
        step, micro = divmod(i, self.accum)
        # Rows of the global batch: micro-step a of rank r takes block (a * world + r).
        first = step * self.batch_size + (micro * self.world + self.rank) * self.micro_batch
        starts = []
        for g in range(first, first + self.micro_batch):
            epoch, j = divmod(g, self.num_windows)
            starts.append(int(self.window_order(epoch)[j]) * self.max_length)
        return window_pairs(self._tokens, self._mask, starts, self.max_length)


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


def val_windows(path: Path, max_length: int, count: int,
                mask_path: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation set: the first `count` windows of val.bin as (inputs, targets), each
    (count, max_length) int64, targets masked like the training ones."""
    tokens = read_tokens(path)
    n = min(count, (len(tokens) - 1) // max_length)
    if n < 1:
        raise UserError(f"{path} has {len(tokens)} tokens, fewer than max_length + 1 = {max_length + 1}: "
                        f"lower --max_length or give more validation data")
    inputs, targets = window_pairs(tokens, read_mask(mask_path), [i * max_length for i in range(n)], max_length)
    if not (targets != IGNORE_INDEX).any():
        raise UserError(f"the {n} validation windows of {path} hold no response token: "
                        f"raise --eval_batches or give more validation records")
    return inputs, targets


# ----------------------------------------------------------------------------- trainer

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), the denominator of MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
MEMORY_HEADROOM = 0.9  # the batch finder keeps 10% of GPU memory free for allocator fragmentation
GRAPH_WARMUP_STEPS = 2  # eager steps before the step's CUDA graph is captured: Inductor compiles in the first


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
    """runs/<run>/: config.json (what reproduces the run) and metrics.jsonl; TensorBoard if installed.

    A new run never writes into a directory that holds a run's metrics; a resumed run (`resume_step`)
    drops what was logged after that step, so the steps it runs again are logged once."""

    def __init__(self, run_dir: Path, record: dict, enabled: bool, resume_step: int | None = None):
        self.enabled, self.writer, self.path = enabled, None, run_dir / "metrics.jsonl"
        if not enabled:
            return
        if resume_step is None and self.path.exists():
            raise UserError(f"{run_dir} already holds a run's metrics.jsonl: pass another --run_name, or "
                            f"--resume to continue that run")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "metrics.jsonl"):
                remove_leftovers(run_dir / name)
            if resume_step is not None and self.path.exists():
                self.drop_after(resume_step)
            atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
        except OSError as exc:
            raise UserError(f"cannot write the run log in {run_dir} ({exc.strerror or exc}): "
                            f"pass another --tensorboard_dir") from None
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides the events a killed run wrote after the resumed step.
            self.writer = SummaryWriter(str(run_dir), purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:
            print("tensorboard is not installed: logging to metrics.jsonl only "
                  "(pip install -e \".[tensorboard]\" for TensorBoard)")

    def drop_after(self, step: int) -> None:
        """Keep the lines up to `step` (and none cut short by a kill)."""
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(kept)))

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
    """The data directory's meta.json, running data preparation first if its files are missing.

    With --data_input the directory must hold that file's tokens (meta.json records the source's
    sha256). When it holds another source's, this refuses and names both ways out, rather than
    train on data the user did not ask for or overwrite tokens another run may resume from."""
    data_dir = Path(cfg.data_dir)
    try:
        if dist.is_main:
            present = all((data_dir / n).is_file() for n in ("train.bin", "val.bin", "meta.json"))
            if present and cfg.data_input and Path(cfg.data_input).is_file():
                check_data_source(data_dir, Path(cfg.data_input))
            if not present or cfg.data_input:  # prepare() does nothing when the tokens are up to date
                if not present:
                    missing = [n for n in ("train.bin", "val.bin", "meta.json") if not (data_dir / n).is_file()]
                    what = "no token files" if len(missing) == 3 else f"{', '.join(missing)} missing"
                    print(f"{what} in {data_dir}: preparing them first from {cfg.data_input or cfg.dataset_name}")
                meta = data_prep.prepare(cfg.data_input or None, str(data_dir), cfg.dataset_size,
                                         cfg.train_val_split, cfg.seed, cfg.dataset_name, input_flag="--data_input")
                counts = meta["counts"]
                taken = counts["records_train"] + counts["records_val"]
                if meta["format"] != "text" and taken < counts["records_usable"]:
                    print(f"note: training on {taken:,} of the {counts['records_usable']:,} records of "
                          f"{meta['source']['path']} (--dataset_size {cfg.dataset_size}; 0 takes them all)")
        dist.barrier()
        return data_prep.load_meta(str(data_dir))
    except data_prep.DataError as exc:
        raise UserError(str(exc)) from None


def check_data_source(data_dir: Path, data_input: Path) -> None:
    """Raise a UserError when data_dir's token files were made from another file than data_input."""
    import hashlib
    source = data_prep.load_meta(data_dir).get("source") or {}
    if source.get("sha256") == hashlib.sha256(data_input.read_bytes()).hexdigest():
        return
    elsewhere = data_dir.parent / data_input.stem
    if elsewhere == data_dir:  # the same name: the file changed since its tokens were made
        elsewhere = data_dir.with_name(f"{data_dir.name}_new")
    raise UserError(f"{data_dir} holds the tokens of another source ({source.get('path', 'unknown')}), not of "
                    f"{data_input}: pass --data_dir {elsewhere} to prepare {data_input} there, or delete "
                    f"{data_dir} to replace them")


# From about this size a model needs a GPU: the 141.7M base model took ~90 s per step (batch 8 x 512)
# on a laptop CPU, so 15 minutes passed before its first progress line (issue 11).
CPU_TOO_SLOW_PARAMS = 100e6


def slow_device_note(num_params: int, device: torch.device) -> str | None:
    """A warning for a model that will take hours on this device, or None."""
    if device.type != "cpu" or num_params < CPU_TOO_SLOW_PARAMS:
        return None
    return (f"note: {num_params / 1e6:.1f}M parameters on a CPU take a minute or more per step, hours in all: "
            f"train this model on a GPU, or try --preset tiny first")


def loader_workers(requested: int, say: bool = True) -> int:
    """num_workers, but at most one per CPU this process may use (torch warns twice beyond that);
    `say`: print a note when it was lowered."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested > available and say:
        print(f"note: num_workers {requested} is more than the {available} CPUs here: using {available}")
    return min(requested, available)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# Fields that fix which tokens each step sees: a resumed run must keep them.
DATA_ORDER_FIELDS = ("batch_size", "max_length", "seed", "data_dir")


def model_flags(stored: dict) -> str:
    """The shortest `--preset NAME --FIELD VALUE ...` that builds the model config `stored`."""
    options = []
    for preset in PRESETS:
        base = dataclasses.asdict(make_configs(preset)[0])
        flags = {k: v for k, v in stored.items() if k not in ("impl", "hidden_dim") and base.get(k) != v}
        try:
            rebuilt = make_configs(preset, **flags)[0]
        except (UserError, TypeError):
            continue
        if rebuilt.hidden_dim != stored.get("hidden_dim"):  # derived from dim unless it was set
            flags["hidden_dim"] = stored.get("hidden_dim")
        text = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items())
        options.append((len(flags), f"--preset {preset} {text}".strip()))
    return min(options)[1] if options else "the model flags of its model_config"


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
        if self.dist.is_main:  # a killed run's temporary checkpoints (up to a checkpoint's size each)
            for name in ("latest.pt", "best.pt"):
                remove_leftovers(Path(cfg.checkpoint_dir) / name)
        self.meta = ensure_token_files(cfg, self.dist)
        data_dir = Path(cfg.data_dir)
        check_token_files(data_dir, self.meta, model_cfg.vocab_size)
        check_memory(model_cfg, copies=4)  # weights, gradients, AdamW's two moments
        self.loss_on, masks = mask_paths(data_dir, self.meta, cfg.loss_on)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = Transformer(model_cfg).to(self.rt.device)
        self.impl = self.model.kernels(self.rt.device, training=True)
        self.loss_impl = self.model.loss_kernels(self.rt.device)  # resolved here, not inside a compiled forward
        self.fsdp = self.dist.world > 1 and cfg.parallel == "fsdp"
        if self.fsdp:  # before the optimizer: sharding replaces the parameters with DTensor shards
            self.shard_model()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.graph_mode = self.resolve_cuda_graph()
        self.step_impl = self.resolve_step_impl()
        # A captured step reads its hyperparameters on the device: a tensor lr, rewritten before
        # each replay, and `capturable` AdamW, which keeps its step count there too. The
        # extension's step reads lr there as well, captured or not.
        captured = self.graph_mode == "step"
        self.lr = torch.tensor(cfg.learning_rate, device=self.rt.device) if captured or self.step_impl == "ext" else None
        # With step_impl "ext" the optimizer holds the state (the checkpoint format is its
        # state_dict either way) and adamw_step updates it.
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr if captured else cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
            fused=self.rt.device.type == "cuda", capturable=captured)
        self.scaler = torch.amp.GradScaler("cuda") if self.rt.needs_grad_scaler else None
        self.graph, self.graph_batch, self.graph_loss = None, None, None  # captured at the first step
        self.step, self.best_val, self.run_name = 0, float("inf"), cfg.run_name
        self.resumed_total, self.resumed_run = 0, None  # the checkpoint's total steps and run name
        if cfg.resume:  # continues this run; init_from, if given too, only supplied the model config
            self.restore(Path(cfg.checkpoint_dir) / "latest.pt")
        elif cfg.init_from:
            self.init_from(cfg.init_from)
        if not cfg.resume and self.dist.is_main:
            earlier = [n for n in ("latest.pt", "best.pt") if (Path(cfg.checkpoint_dir) / n).is_file()]
            if earlier:  # a new run writes its own: say so before the first save, while Ctrl-C still keeps them
                print(f"note: {cfg.checkpoint_dir} holds {' and '.join(earlier)} of an earlier run; this new run "
                      f"replaces them at its first save (--resume continues that run; --checkpoint_dir keeps both)")
        self.micro_batch = self.find_micro_batch()
        self.windows = TrainWindows(data_dir / "train.bin", cfg.max_length, cfg.batch_size, self.micro_batch,
                                    cfg.seed, self.dist.rank, self.dist.world, masks["train"])
        if self.windows.num_windows < 1:
            raise UserError(f"{data_dir / 'train.bin'} is shorter than max_length + 1 tokens: "
                            f"lower --max_length or give more data")
        if cfg.batch_size > self.windows.num_windows:  # each window at most once per batch
            raise UserError(f"batch_size {cfg.batch_size} is more than the {self.windows.num_windows} windows of "
                            f"max_length + 1 = {cfg.max_length + 1} tokens in {data_dir / 'train.bin'}: lower "
                            f"--batch_size or --max_length, or give more data")
        self.val = val_windows(data_dir / "val.bin", cfg.max_length, cfg.eval_batches * cfg.batch_size, masks["val"])
        # A resumed run keeps its schedule's length unless --max_steps sets a new one.
        self.total_steps = (cfg.max_steps or self.resumed_total
                            or max(1, cfg.num_epochs * self.windows.num_windows // cfg.batch_size))
        if cfg.resume:
            self.check_steps_left()
        self.forward = self.wrap_model()
        self.stop_requested = False
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.rt.device)
        if not self.run_name:  # a timestamp; a second run started in the same second gets a suffix
            import itertools
            import time
            stamp = time.strftime("%Y%m%d-%H%M%S")
            names = itertools.chain([stamp], (f"{stamp}-{i}" for i in itertools.count(2)))
            self.run_name = next(n for n in names if not (Path(cfg.tensorboard_dir) / n / "metrics.jsonl").exists())
        if self.dist.is_main:  # a checkpoint_dir that cannot be made fails now, not at the first save
            try:
                Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create --checkpoint_dir {cfg.checkpoint_dir} ({exc.strerror or exc}): "
                                f"pass another --checkpoint_dir") from None
        # Resuming into the checkpoint's own run directory continues its logs after the resumed step.
        resume_step = self.step if cfg.resume and self.run_name == self.resumed_run else None
        self.log = RunLog(Path(cfg.tensorboard_dir) / self.run_name, self.run_record(), self.dist.is_main,
                          resume_step=resume_step)

    # -- setup

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, step, best loss, RNG, run name and total
        steps, once it is known to be a complete checkpoint of this model and this data order."""
        if not path.is_file():
            raise UserError(f"--resume given but {path} does not exist: train without --resume first")
        ckpt = read_checkpoint(path, self.rt.device)
        rng = ckpt.get("rng")
        missing = [key for key, ok in (
            ("optimizer", isinstance(ckpt.get("optimizer"), dict)),
            ("training_config", isinstance(ckpt.get("training_config"), dict)),
            ("step", type(ckpt.get("step")) is int and ckpt["step"] >= 0),
            ("best_val_loss", type(ckpt.get("best_val_loss")) in (int, float)),
            ("rng", isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor)
             and rng["cpu"].dtype == torch.uint8)) if not ok]
        if missing:
            raise UserError(f"{path} cannot be resumed: it has no valid {', '.join(missing)} (a latest.pt written "
                            f"by train has them all): start a new run without --resume")
        stored = ckpt["model_config"]
        current = dataclasses.asdict(self.model.cfg)
        differing = [k for k in {**stored, **current}
                     if k not in FREE_MODEL_FIELDS and stored.get(k, "?") != current.get(k, "?")]
        if differing:
            was = ", ".join(f"{k} {stored.get(k, '(none)')}" for k in differing[:6])
            now = ", ".join(f"{k} {current.get(k, '(none)')}" for k in differing[:6])
            raise UserError(f"{path} was trained with another model config ({was}; this run: {now}): resume "
                            f"with {model_flags(stored)}, or start a new run without --resume")
        old_cfg = ckpt["training_config"]

        def same(name: str) -> bool:
            value, ours = old_cfg.get(name), getattr(self.cfg, name)
            if name == "data_dir":  # the same directory, however it is spelled
                return isinstance(value, str) and usable_path(value) and Path(value).resolve() == Path(ours).resolve()
            return value == ours
        changed = [name for name in DATA_ORDER_FIELDS if not same(name)]
        if changed:
            was = ", ".join(f"{name} {old_cfg.get(name)!r}" for name in changed)
            flags = " ".join(f"--{name} {old_cfg.get(name)}" for name in changed)
            raise UserError(f"{path} was trained with other {', '.join(changed)} ({was}): resume with the same "
                            f"values ({flags}), or start a new run without --resume")
        piece = "model"
        try:
            self.load_model_state(ckpt["model"])
            piece = "optimizer"
            self.load_optimizer_state(ckpt["optimizer"])
            for p, state in self.optimizer.state.items():  # load_state_dict checks no moment's shape
                if any(isinstance(m, torch.Tensor) and m.dim() and m.shape != p.shape for m in state.values()):
                    raise ValueError("a moment's shape differs from its parameter's")
            piece = "rng"
            torch.set_rng_state(rng["cpu"].cpu())
            if self.rt.device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"].cpu(), self.rt.device)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path} cannot be resumed: its {piece} state does not fit this run ({first[:200]}): "
                            f"start a new run without --resume") from None
        self.step, self.best_val = ckpt["step"], float(ckpt["best_val_loss"])
        # Checkpoints before total_steps was stored: their max_steps, when it was set.
        total = ckpt.get("total_steps", old_cfg.get("max_steps"))
        self.resumed_total = total if type(total) is int and total > 0 else 0
        name = ckpt.get("run_name")
        self.resumed_run = name if isinstance(name, str) and name and usable_path(name) and "/" not in name \
            and name not in (".", "..") else None
        self.run_name = self.run_name or self.resumed_run or ""
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    def check_steps_left(self) -> None:
        """A resumed run must have steps left: say how to extend a finished one."""
        ckpt = Path(self.cfg.checkpoint_dir) / "latest.pt"
        if self.cfg.max_steps and self.cfg.max_steps <= self.step:
            raise UserError(f"--max_steps {self.cfg.max_steps} is not beyond the step {self.step} of {ckpt}: "
                            f"pass a larger --max_steps to train on")
        if self.step >= self.total_steps:
            raise UserError(f"{ckpt} is a finished run (step {self.step} of {self.total_steps}): pass --max_steps N "
                            f"with N > {self.step} to train it further, or start a new run without --resume")

    def init_from(self, path: str) -> None:
        """Start this new run from a checkpoint's weights: step 0, fresh optimizer, its own schedule."""
        file = find_checkpoint(path)
        ckpt = read_checkpoint(file, self.rt.device)
        conflicts = model_conflicts(ckpt["model_config"], dataclasses.asdict(self.model.cfg))
        if conflicts:
            raise UserError(f"--init_from {file} holds another model: {', '.join(conflicts)}; "
                            f"build the model from the checkpoint's config (make_configs does)")
        self.model.load_state_dict(ckpt["model"])
        if self.dist.is_main:
            print(f"initialised from {file} (its step {ckpt['step']}); new run from step 0")

    def resolve_cuda_graph(self) -> str:
        """cuda_graph -> "step" (train_step replayed from one graph), "reduce-overhead" (torch.compile's
        graphs around forward and backward, the optimizer eager) or "off"."""
        wanted = self.cfg.cuda_graph
        if wanted == "auto":
            # Where the H200 measured it (2026-12-02, the default model, batch 8 x 512, compiled,
            # checkpointing): 12.4 ms a step replayed against 20.3 eager, the eager step bound by
            # the host's ~700 launches. A larger step is bound by its GEMMs (batch 64: 60 ms of
            # kernels), where a replay saves little and its memory pool costs: not measured, off.
            launch_bound = self.cfg.batch_size * self.cfg.max_length <= GRAPH_AUTO_MAX_TOKENS
            simple = self.rt.device.type == "cuda" and self.dist.world == 1 and not self.rt.needs_grad_scaler
            return "step" if launch_bound and self.compiles and simple else "off"
        if wanted == "false":
            return "off"
        # GradScaler's step reads its inf check on the host, DDP and FSDP communicate between the
        # captured kernels: the graph paths leave them out.
        problem = ("needs CUDA (this run is on the CPU)" if self.rt.device.type != "cuda"
                   else f"takes one process (this run has {self.dist.world})" if self.dist.world > 1
                   else "needs bf16 (this GPU trains in float16 with a GradScaler)" if self.rt.needs_grad_scaler
                   else "needs torch.compile (this run has --compile false)"
                   if wanted == "reduce-overhead" and not self.compiles else None)
        if problem:
            raise UserError(f"--cuda_graph {wanted} {problem}: use --cuda_graph auto")
        return "step" if wanted == "true" else "reduce-overhead"

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

    def shard_model(self) -> None:
        """FSDP2, in place: one unit per block, and the root (embedding, tied head, final norm).

        Each unit all-gathers its parameters just before its forward and backward and frees them
        after, so a rank holds 1/world of the parameters, gradients and AdamW state plus one block
        in full. On CUDA the gathered parameters are bf16 and gradients are reduced in float32
        (as autocast computes under DDP); on CPU everything stays float32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy()
        if self.rt.device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=self.rt.dtype, reduce_dtype=torch.float32)
        for block in self.model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)

    def model_state(self) -> dict:
        """The full (unsharded) model state dict; under FSDP a collective: every rank calls it."""
        if not self.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, state: dict) -> None:
        if not self.fsdp:
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self) -> dict:
        """The full optimizer state in `optimizer.state_dict()`'s layout (parameters by index),
        so one checkpoint format serves one process, DDP and FSDP. A collective under FSDP."""
        if not self.fsdp:
            state = self.optimizer.state_dict()
            for group in state["param_groups"]:  # one format with or without the graph: a float lr
                group["lr"], group["capturable"] = float(group["lr"]), False
            return state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        full = get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not full:  # with cpu_offload only rank 0 receives the gathered state
            return full
        index = {name: i for i, name in enumerate(self.param_names())}
        groups = [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]
        return {"state": {index[name]: value for name, value in full["state"].items()}, "param_groups": groups}

    def load_optimizer_state(self, state: dict) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(state)
            for group in self.optimizer.param_groups:  # the checkpoint's groups bring their own lr and capturable
                group["capturable"] = self.lr is not None
                group["lr"] = group["lr"] if self.lr is None else self.lr
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = self.param_names()
        full = {"state": {names[i]: value for i, value in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, full, options=StateDictOptions(full_state_dict=True))

    def param_names(self) -> list[str]:
        """Parameter names in the optimizer's order (its state_dict numbers them so)."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def wrap_model(self):
        """DDP across ranks (FSDP shards in place, before), then torch.compile: returns the
        callable the training step uses."""
        model = self.model
        if self.dist.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(
                model, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None)
        self.ddp = model if self.dist.world > 1 and not self.fsdp else None
        # Compiling the DDP-wrapped module lets DDP's optimizer split graphs at its gradient buckets,
        # so communication still overlaps the backward. The whole-step graph ("step") captures
        # Inductor's kernels itself: the default mode, which makes no graphs of its own.
        mode = "reduce-overhead" if self.graph_mode == "reduce-overhead" else None
        return torch.compile(model, mode=mode) if self.compiles else model

    @property
    def compiles(self) -> bool:
        """Whether the model runs through torch.compile: --compile true, or auto on CUDA."""
        return self.cfg.compile == "true" or (self.cfg.compile == "auto" and self.rt.device.type == "cuda")

    def run_record(self) -> dict:
        return {
            "model_config": dataclasses.asdict(self.model.cfg), "training_config": dataclasses.asdict(self.cfg),
            "micro_batch": self.micro_batch, "world_size": self.dist.world, "total_steps": self.total_steps,
            "kernels": self.impl, "loss_kernels": self.loss_impl, "code_version": git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0], "argv": sys.argv,
            "device": torch.cuda.get_device_name(self.rt.device) if self.rt.device.type == "cuda" else "cpu",
            "dtype": str(self.rt.dtype), "data": self.meta, "parameters": self.model.num_params(),
            "loss_on": self.loss_on,
        }

    # -- the loop

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over batch_size sequences; returns this rank's share of the step's loss
        (on device; summed over ranks it is the mean over the global batch's counted targets)."""
        pairs = [next(batches) for _ in range(self.windows.accum)]  # (inputs, targets), each (micro, T)
        lr = lr_at(self.step, self.cfg, self.total_steps)
        if self.graph_mode == "step":
            return self.graph_step(pairs, lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.step_impl == "ext":
            self.lr.fill_(lr)
        total = self.step_math([[t.to(self.rt.device, non_blocking=True) for t in pair] for pair in pairs])
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def step_math(self, micro_batches: list) -> torch.Tensor:
        """Forward and backward of each micro-batch, the clip and the optimizer step, all on the
        device (no host sync: the whole-step CUDA graph captures exactly this); returns the loss."""
        accum = len(micro_batches)
        # The mean over all counted targets of the global batch, not a mean of micro-batch means (a
        # response mask counts different numbers per window): each micro-batch's loss sum is divided
        # by the global count, times world because DDP and FSDP average the ranks' gradients. A step with no
        # counted target (count clamped to 1) adds zero gradient instead of NaN.
        count = sum((targets != IGNORE_INDEX).sum() for _, targets in micro_batches).float()
        count = self.dist.all_reduce(count).clamp(min=1) / self.dist.world
        total = torch.zeros((), device=self.rt.device)
        for micro, (inputs, targets) in enumerate(micro_batches):
            # DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-step only.
            sync = micro == accum - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(sync)
            if self.graph_mode == "reduce-overhead":  # the previous micro-step's graph outputs are done with
                torch.compiler.cudagraph_mark_step_begin()
            with contextlib.nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
                loss = self.loss(self.forward, inputs, targets, reduction="sum") / count
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        self.clip_and_step()
        self.nonfinite |= ~torch.isfinite(total)
        return total

    def resolve_step_impl(self) -> str:
        """The optimizer step's implementation: "ext", the extension's adamw_step (the clip's norm
        and AdamW in two passes over the parameters: 1.29 against 1.53 ms for torch's fused AdamW
        with the clip folded in, default model, H200, README Performance), on CUDA whenever the
        extension builds and on a CPU with impl ext; else "ref", torch's AdamW (fused on CUDA),
        which FSDP's sharded parameters and float16's GradScaler need."""
        if self.fsdp or self.rt.needs_grad_scaler:
            return "ref"
        impl = resolve_impl(self.model.cfg.impl, self.rt.device)
        return "ext" if impl == "ext" and (self.rt.device.type == "cuda" or self.model.cfg.impl == "ext") else "ref"

    def init_optimizer_state(self, params: list) -> None:
        """AdamW's state for the parameters that have none yet, made as fused AdamW's first step makes it."""
        for p in params:
            state = self.optimizer.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                             exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))

    def clip_and_step(self) -> None:
        """The global-norm clip and the AdamW step on the gradients the backward left."""
        if self.step_impl == "ext":
            self.ext_step()
            return
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
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

    def ext_step(self) -> None:
        """clip_and_step through the extension's adamw_step, on the optimizer's own state tensors
        (parameters without a gradient are skipped, as torch's AdamW skips them)."""
        params, grads, decays = [], [], []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
                    decays.append(group["weight_decay"])
        self.init_optimizer_state(params)
        states = [self.optimizer.state[p] for p in params]
        beta1, beta2 = self.optimizer.defaults["betas"]
        adamw_step(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["step"] for s in states], self.lr, decays, beta1, beta2, self.optimizer.defaults["eps"],
                   self.cfg.gradient_clip_val, impl="ext")

    def graph_step(self, pairs: list, lr: float) -> torch.Tensor:
        """train_step replayed from one CUDA graph (cuda_graph true): the batch is copied into
        static buffers and lr into its device tensor, then one launch runs every kernel of the step.
        At batch 8 the eager step is bound by the host launching ~700 kernels (README, Performance)."""
        self.lr.fill_(lr)
        if self.graph is None:
            self.graph_batch = [[t.to(self.rt.device) for t in pair] for pair in pairs]  # fixed addresses
            self.capture_step()
        for static, pair in zip(self.graph_batch, pairs):
            for buffer, t in zip(static, pair):
                buffer.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.graph_loss.clone()  # the graph's own loss tensor is rewritten by the next replay

    def capture_step(self) -> None:
        """Capture step_math on self.graph_batch into self.graph (the first graph step, once).

        What a captured kernel writes must exist before capture, at an address that never changes:
        the gradients (zeroed inside the graph, then accumulated into in place; never set to None)
        and AdamW's moments (a kernel that created them would zero them at every replay; made here
        as fused AdamW's first step makes them). Warm-up steps on the capture stream compile the
        model's forward and backward and load every kernel; the weights, moments and the
        nonfinite flag are restored from a host copy afterwards, so the run is the eager run's."""
        device = self.rt.device
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.init_optimizer_state(params)
        kept = params + [t for p in params for t in self.optimizer.state[p].values()] + [self.nonfinite]
        saved = [t.detach().to("cpu", copy=True) for t in kept]  # on the host: GPU peak memory stays the eager one
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True")  # uncaptured on purpose, here only
            for _ in range(GRAPH_WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=False)
                self.step_math(self.graph_batch)
            with torch.no_grad():
                for t, host in zip(kept, saved):
                    t.copy_(host)
        torch.cuda.current_stream(device).wait_stream(stream)
        grads = [p.grad for p in params]
        addresses = [g.data_ptr() for g in grads]
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may allocate pinned memory while this one captures.
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            torch._foreach_zero_(grads)
            self.graph_loss = self.step_math(self.graph_batch)
        if [p.grad.data_ptr() for p in params] != addresses:  # the backward must accumulate in place
            raise RuntimeError("a gradient moved during CUDA graph capture: train with --cuda_graph false")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the counted targets of the fixed validation windows (sharded across ranks,
        then reduced)."""
        self.model.eval()
        sums = torch.zeros(2, device=self.rt.device, dtype=torch.float64)  # (loss sum, counted targets)
        inputs, targets = (t[self.dist.rank:: self.dist.world] for t in self.val)
        chunks = list(zip(inputs.split(self.micro_batch), targets.split(self.micro_batch)))
        # FSDP gathers parameters collectively: every rank runs the same number of forwards, those
        # with fewer windows a throw-away one (one window each: the shard sizes differ by at most one).
        rounds = -(-len(self.val[0]) // (self.dist.world * self.micro_batch)) if self.fsdp else len(chunks)
        for i in range(rounds):
            x, y = chunks[i] if i < len(chunks) else (self.val[0][:1], self.val[1][:1])
            x, y = x.to(self.rt.device), y.to(self.rt.device)
            # The plain model: a few eager batches cost less than compiling an eval graph (~1 min).
            loss = self.loss(self.model, x, y, reduction="sum").double()
            if i < len(chunks):
                sums[0] += loss
                sums[1] += (y != IGNORE_INDEX).sum()
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
        # Gathered to full tensors (collectives under FSDP: every rank takes part), written by rank 0
        # in the one format sample, export and --resume read.
        model_state, optimizer_state = self.model_state(), self.optimizer_state()
        if self.dist.is_main:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(self.rt.device) if self.rt.device.type == "cuda" else None}
            save_checkpoint(Path(self.cfg.checkpoint_dir) / name, self.model, self.cfg, step=self.step,
                            best_val_loss=self.best_val, template=self.meta.get("template"),
                            model_state=model_state, optimizer_state=optimizer_state,
                            extra={"rng": rng, "run_name": self.run_name, "total_steps": self.total_steps})
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
            if note := slow_device_note(self.model.num_params(), self.rt.device):
                print(note)
        batches = iter(train_loader(self.windows, self.step, self.total_steps, loader_workers(cfg.num_workers, main),
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
                logged = self.step % cfg.log_interval == 0 or last
                if main and self.step == first_step + 1 and not logged:  # a word before log_interval steps
                    took = time.perf_counter() - start
                    eta = format_duration(took * (self.total_steps - self.step))
                    print(f"step {self.step}/{self.total_steps} | loss {float(loss):.4f} | first step {took:.1f} s "
                          f"(warm-up included) | eta at most {eta}", flush=True)
                if logged:
                    train_loss = float(self.dist.all_reduce(loss.clone()) / self.dist.world)
                    self.check_finite()
                    now = time.perf_counter()
                    tok_s = tokens_per_step * (self.step - mark_step) / (now - mark_time)
                    metrics = {"train_loss": train_loss, "lr": lr_at(self.step - 1, cfg, self.total_steps),
                               "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / self.dist.world}
                    if peak:
                        metrics["mfu"] = flops_step * (self.step - mark_step) / (now - mark_time) / self.dist.world / peak
                        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
                    self.log.log(self.step, **metrics)
                    summary.update(metrics)
                    eta = (now - start) / (self.step - first_step) * (self.total_steps - self.step)
                    if main:
                        mfu = f" | mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                        per_rank = f" ({tok_s / self.dist.world:,.0f} per rank)" if self.dist.world > 1 else ""
                        print(f"step {self.step}/{self.total_steps} | loss {train_loss:.4f} | "
                              f"lr {metrics['lr']:.2e} | {tok_s:,.0f} tok/s{per_rank}{mfu} | eta {format_duration(eta)}",
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


# Temperatures below the smallest normal float32 act as it: already the greedy limit, and a
# smaller divisor would round to 0 (0 / 0 = NaN for the top logit).
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int = 0) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k, then top-p (nucleus).

    The specification of the sampling kernel (csrc/sample.*). Logits are shifted by their max
    before the division, so a tiny temperature gives the limit, uniform over the tokens tied at
    the top logit (dividing first overflowed to inf - inf = NaN). Ties: top-k keeps every token
    tied with the k-th largest logit; top-p keeps every token tied with the smallest probability
    of the nucleus (a sort would break that tie arbitrarily).
    """
    x = logits.float()
    x = (x - x.amax(-1, keepdim=True)) / max(temperature, MIN_TEMPERATURE)     # (B, V), max 0
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]                       # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if top_p < 1:
        sorted_probs = probs.sort(dim=-1, descending=True).values               # (B, V)
        # The nucleus is the smallest set that reaches top_p: a token is in while the mass
        # before it is still short of top_p (never empty: the first has nothing before it).
        inside = (sorted_probs.cumsum(-1) - sorted_probs < top_p).sum(-1, keepdim=True)  # (B, 1)
        threshold = sorted_probs.gather(-1, inside - 1)                         # (B, 1)
        probs = x.masked_fill(probs < threshold, float("-inf")).softmax(-1)
    return probs


def sampling_kernel_wins(device: torch.device) -> bool:
    """Whether `impl="auto"` samples with the extension's kernel: on CPU and on CUDA. On CUDA the
    split-row kernel (csrc/sample.cu: each row over many blocks, one short launch per radix digit)
    replaced one that took 626 us a step on the H200 (one block per row, 2026-12-01);
    tools/bench_sample.py times it against the sort-based reference: 26.9 against 140.5 us at
    batch 1, 63.1 against 296.9 at batch 16 (top-p 0.9, V 50,257, bf16; H200, 2026-12-02)."""
    return True


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None, impl: str = "auto") -> torch.Tensor:
    """Next tokens (B,) from (B, V) logits. temperature 0 is argmax. No host synchronization:
    argmax(p / E) with E ~ Exp(1) picks token i with probability p_i (the exponential race).
    impl "ext" draws from logits_to_probs' distribution in one kernel without a sort (csrc/sample.cpp)."""
    check_sampling_args(temperature, top_p, top_k)
    if temperature == 0:
        return logits.argmax(-1)
    race = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1, generator=generator)
    return sample_with_race(logits, race, temperature, top_p, top_k, impl)


def sample_advance_ref(token: torch.Tensor, tokens=None, pos=None, done=None, eot_id: int | None = None,
                       table=None, x=None) -> torch.Tensor:
    """What optimus::sample can do after its draw (csrc/sample.cpp), a decoding step's advance: with
    done (B,) bool, rows already done take eot_id and a row drawing it is done from then on;
    tokens ((B,) or (B, 1) int64) get the (masked) tokens, pos one more, x (B, D) the tokens'
    rows of table (the next step's embedding rows). Each part is left out when its tensor is
    None. Returns the masked tokens (B,)."""
    if done is not None:
        token = token.masked_fill(done, eot_id)
        done |= token == eot_id
    if tokens is not None:
        tokens.copy_(token.view(tokens.shape))
    if pos is not None:
        pos += 1
    if x is not None:
        x.copy_(table[token])
    return token


def sample_with_race(logits: torch.Tensor, race: torch.Tensor, temperature: float, top_p: float, top_k: int,
                     impl: str = "auto", **advance) -> torch.Tensor:
    """sample_next's draw with its race given: race (B, V) float32 contiguous, each E ~ Exp(1)
    (drawn by the caller: Decoder.sample_step draws it outside its CUDA graph, from the caller's
    generator, as sample_next would). temperature 0 is argmax and ignores race. `advance`:
    sample_advance_ref's tensors (tokens, pos, done, eot_id, table, x), done after the draw; the
    extension's kernel does it in the same launch."""
    if temperature == 0:
        return sample_advance_ref(logits.argmax(-1), **advance)
    if impl == "ext" or (impl == "auto" and sampling_kernel_wins(logits.device) and
                         resolve_impl(impl, logits.device) == "ext"):
        a = dict(advance)
        eot_id = a.pop("eot_id", None)
        return torch.ops.optimus.sample(logits, race, temperature, top_k, top_p, **a,
                                        eot_id=-1 if eot_id is None else eot_id)
    return sample_advance_ref((logits_to_probs(logits, temperature, top_p, top_k) / race).argmax(-1), **advance)


def logits_to_probs_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                         top_k: torch.Tensor) -> torch.Tensor:
    """logits_to_probs with each row's own settings: (B, V) logits, temperature (B,) (> 0), top_p
    (B,), top_k (B,) long (0: all tokens) -> (B, V) probabilities, row b equal to
    logits_to_probs(logits[b:b+1], temperature[b], top_p[b], top_k[b]). It sorts every row (twice)
    whatever its settings, so it pays off only against one call per distinct setting."""
    x = logits.float()
    x = (x - x.amax(-1, keepdim=True)) / temperature.float().clamp_min(MIN_TEMPERATURE)[:, None]  # (B, V)
    V = x.shape[-1]
    kth = x.sort(dim=-1, descending=True).values.gather(-1, (top_k.clamp(1, V) - 1)[:, None])    # (B, 1)
    cut_k = ((top_k > 0) & (top_k < V))[:, None]                                                   # (B, 1)
    x = x.masked_fill(cut_k & (x < kth), float("-inf"))
    probs = x.softmax(-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values                                      # (B, V)
    inside = (sorted_probs.cumsum(-1) - sorted_probs < top_p[:, None]).sum(-1, keepdim=True)        # (B, 1)
    threshold = sorted_probs.gather(-1, inside - 1)                                                # (B, 1)
    nucleus = x.masked_fill(probs < threshold, float("-inf")).softmax(-1)
    return torch.where((top_p < 1)[:, None], nucleus, probs)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from (B, V) logits, each row with its own settings (logits_to_probs_rows;
    temperatures > 0: greedy rows take argmax elsewhere), in one exponential race like sample_next."""
    race = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1, generator=generator)
    return (logits_to_probs_rows(logits, temperature, top_p, top_k) / race).argmax(-1)


class CacheRows:
    """One row of a KVCache as (1, KV, S, hd) views: writes through `update` land in that row only."""

    def __init__(self, cache: KVCache, row: int):
        self.k, self.v, self.status = cache.k[row: row + 1], cache.v[row: row + 1], cache.status
        kv = cache.k.shape[1]
        self.counts = cache.counts[row * kv: (row + 1) * kv]

    update, attend = KVCache.update, KVCache.attend  # the same kernels, into the views


SAMPLING_GRAPHS = 4  # Decoder.sample_step's graphs kept, one per sampling setting (the REPL can change it)
PREFILL_GRAPHS = 16  # Decoder.prefill's graphs kept, one per padded prompt shape


class Decoder:
    """A model with static KV caches for `batch` sequences: prefill, then one token per step.

    Building one packs the model's weights for inference (Transformer.prepare_for_inference); with
    the extension the step is then a short chain of our kernels and cuBLAS GEMMs, with nothing
    to compile (add_rms_norm, packed QKV GEMM, rope_append_attention, wo, add_rms_norm, packed
    gate-up GEMM, swiglu, down per block; up to DECODE_LINEAR_MAX_ROWS rows Block.decode_row: two
    launches a block at batch 1, five at more rows). On CUDA the one-token step is captured once in
    a CUDA graph (`self.graph`) and replayed, so a step costs one launch instead of one per kernel;
    its inputs and output live in static buffers. generate() steps through sample_step instead: the
    same step with the sampling after it, in one graph per sampling setting, whose sampler also
    writes the next step's inputs (tokens, positions, embedding rows, end-of-text flags); and its
    prefill replays a graph per padded prompt shape. `compile=True` runs that step through
    torch.compile first, which fuses its small kernels (the first step then takes tens of
    seconds; H200 numbers in the README). `fused_linear` is
    Transformer.step_logits' choice of Block.decode_row: None (up to DECODE_LINEAR_MAX_ROWS rows),
    True (any batch, on the extension) or False (never).
    """

    @torch.no_grad()
    def __init__(self, model: Transformer, batch: int, use_graph: bool | None = None, compile: bool = False,
                 fused_linear: bool | None = None):
        self.model, self.batch, self.fused_linear = model, batch, fused_linear
        device = model.tok_emb.weight.device
        model.prepare_for_inference()
        self.caches = [KVCache(batch, model.cfg, model.tok_emb.weight.dtype, device) for _ in model.blocks]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)       # (B, 1)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)          # (B, 1)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)           # (B,) sample_step's
        self.race = None                                                           # (B, V) float32
        # sample_step's embedding rows of self.tokens (B, dim), written by its sampler (on the
        # decode_row path only; None otherwise); x_valid: whether they are self.tokens' rows.
        self.x = torch.zeros(batch, model.cfg.dim, dtype=model.tok_emb.weight.dtype, device=device) \
            if model.fused_step(batch, device, fused_linear) else None
        self.x_valid = False
        self.sampling_graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.forward_step = self._step
        if compile:  # the CUDA graph below launches the kernels: Inductor must not add its own graphs
            mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else None
            self.forward_step = torch.compile(self._step, mode=mode)  # graph breaks: CPU ref bounds checks
        self.graph = None
        # prefill's CUDA graphs by input shape, captured at first use into one memory pool (None:
        # eager prefills). Eager, a prefill is about a hundred launches from Python, bound by the
        # host (H200, 2026-12-03, width 64: 4.78 ms eager, 0.545 ms replayed).
        self.prefill_graphs: dict[tuple, tuple] | None = None
        if use_graph if use_graph is not None else device.type == "cuda":
            # The capture writes slot 0 of the caches: prefill rewrites it before any read.
            self.graph, self.logits = self._capture(self.forward_step)
            self.prefill_graphs, self.prefill_pool = {}, torch.cuda.graph_pool_handle()

    def _step(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.step_logits(self.tokens, self.pos, self.caches, self.fused_linear, x)  # (B, V)

    def _capture(self, fn: typing.Callable[[], torch.Tensor], restore: tuple[torch.Tensor, ...] = (),
                 pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """fn's CUDA graph (in memory pool `pool`, or its own) and its output. Two warm-up calls run
        first, for real, on a side stream (kernels load, libraries plan, workspaces settle); the
        tensors in `restore` are put back after them."""
        saved = [t.clone() for t in restore]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        for t, old in zip(restore, saved):
            t.copy_(old)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) right-padded, lengths (B,): fill the caches, return (B, V) next-token logits.
        With graphs (CUDA), one replay of the graph for tokens' shape (generate() pads prompts to
        a few widths), captured at its first use; the PREFILL_GRAPHS most recent shapes are kept."""
        if self.prefill_graphs is None or tokens.device.type != "cuda":
            return self._prefill(tokens, lengths)
        key = tuple(tokens.shape)
        if key not in self.prefill_graphs:
            if len(self.prefill_graphs) >= PREFILL_GRAPHS:  # the oldest shape's graph goes
                del self.prefill_graphs[next(iter(self.prefill_graphs))]
            static = (tokens.clone(), lengths.clone())
            # The warm-ups fill the caches from these very tokens: the replay below writes them again.
            self.prefill_graphs[key] = (static, *self._capture(lambda: self._prefill(*static), pool=self.prefill_pool))
        (static_tokens, static_lengths), graph, logits = self.prefill_graphs.pop(key)
        self.prefill_graphs[key] = ((static_tokens, static_lengths), graph, logits)  # now the newest
        static_tokens.copy_(tokens)
        static_lengths.copy_(lengths)
        graph.replay()
        return logits.clone()  # the pool's memory is the next prefill graph's too

    def _prefill(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device).expand(B, T)                  # (B, T)
        h = self.model.hidden(tokens, pos, self.caches)                            # (B, T, dim)
        return self.model.logits(h[torch.arange(B, device=tokens.device), lengths - 1])

    @torch.no_grad()
    def prefill_rows(self, rows: list[int], tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Prefill cache rows `rows` only (the others may be mid-answer): tokens (n, T) right-padded,
        lengths (n,) -> (n, V) next-token logits. Each row runs alone, through views of its cache
        row, so a row's logits do not depend on what else is in the batch (the server's continuous
        batching relies on that: an answer equals the same request's answer alone)."""
        n, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)[None]                         # (1, T)
        out = []
        for i, row in enumerate(rows):
            views = [CacheRows(c, row) for c in self.caches]
            h = self.model.hidden(tokens[i: i + 1], pos, views)                    # (1, T, dim)
            out.append(self.model.logits(h[:, int(lengths[i]) - 1]))              # (1, V)
        return torch.cat(out)                                                      # (n, V)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at positions pos (B,) -> (B, V) logits for the token after each."""
        self.tokens.copy_(tokens[:, None])
        self.pos.copy_(pos[:, None])
        self.x_valid = False  # sample_step gathers the rows again
        if self.graph is None:
            return self.forward_step()
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def begin(self, tokens: torch.Tensor, pos: torch.Tensor, done: torch.Tensor, vocab: int) -> None:
        """Set up sample_step: the first new tokens (B,), their positions (B,), which rows are done
        (B,) bool, and the logits' width."""
        self.tokens.copy_(tokens[:, None])
        self.pos.copy_(pos[:, None])
        self.done.copy_(done)
        self.gather_rows()
        if self.race is None or self.race.shape[1] != vocab:
            self.race = torch.empty(self.batch, vocab, dtype=torch.float32, device=self.tokens.device)

    def gather_rows(self) -> None:
        """self.x = the embedding rows of self.tokens (where sample_step reads them)."""
        if self.x is not None:
            self.x.copy_(self.model.tok_emb(self.tokens[:, 0]))
        self.x_valid = True

    def _sample_step(self, temperature: float, top_p: float, top_k: int, eot_id: int | None,
                     impl: str) -> torch.Tensor:
        # The sampler also masks finished rows, writes the next step's tokens, positions and
        # embedding rows (sample_advance_ref): on the extension all in its own launch.
        logits = self.forward_step(self.x)                                                   # (B, V)
        return sample_with_race(logits, self.race, temperature, top_p, top_k, impl, tokens=self.tokens,
                                pos=self.pos, done=self.done if eot_id is not None else None, eot_id=eot_id,
                                table=self.model.tok_emb.weight if self.x is not None else None, x=self.x)

    @torch.no_grad()
    def sample_step(self, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None,
                    eot_id: int | None, impl: str = "auto") -> torch.Tensor:
        """One step of generate() after its first token: the logits of the tokens set by begin() or
        by the last call, the next tokens sampled from them (sample_next's draw: the race comes from
        `generator` here, outside any graph, as sample_next draws it), the rows that are done kept
        at eot_id; returns those (B,) tokens, which are then the next call's input. On CUDA this is
        one replay of a graph of the whole step (the forward, then the sampling, which on the
        extension also masks finished rows, advances the positions and gathers the next
        embedding rows in its own launch), one graph per sampling setting, captured at its first use (the
        CLI's warm-up captures its own); outside it only the race's draw and the copy of the
        tokens out. Before, each step launched about ten small kernels around the forward's graph
        (the draw, 4-6 sampling passes, the masks, the copies of tokens and positions)."""
        if temperature > 0:
            self.race.exponential_(1, generator=generator)
        key = (float(temperature), float(top_p), int(top_k), eot_id, impl)
        if not self.x_valid:
            self.gather_rows()
        if self.graph is None:
            return self._sample_step(*key)
        if key not in self.sampling_graphs:
            if len(self.sampling_graphs) >= SAMPLING_GRAPHS:  # the oldest setting's graph goes
                del self.sampling_graphs[next(iter(self.sampling_graphs))]
            self.sampling_graphs[key] = self._capture_sampling(key)
        graph, token = self.sampling_graphs[key]
        graph.replay()
        return token.clone()  # the graph's output is rewritten by the next replay

    def _capture_sampling(self, key: tuple) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """sample_step's graph for one setting. The inputs its warm-up steps change are put back;
        the cache slots they write, at pos and pos + 1 (< max_seq_len: generate() steps there
        next), are written again by the next steps before any step reads them."""
        restore = (self.tokens, self.pos, self.done) + ((self.x,) if self.x is not None else ())
        return self._capture(lambda: self._sample_step(*key), restore)

    def warm_up(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> None:
        """One short answer, thrown away, read the way `answer` reads one (read_behind: the pinned
        copies, the end-of-text masks and stop checks; it captures sample_step's graph for these
        settings), then on CUDA one prefill of every padded prompt width (capturing its graph),
        and a wait for all of it. A kernel's first launch loads it, a pinned buffer's
        first allocation maps it, and each new prefill width makes the attention and matmul
        libraries plan anew (H200: the first answer to a 100-token prompt, width 128, waited 80 ms
        for its first token, the next ones 7 ms): without this, the first answer's tokens/s and
        first token would count that too, and without the wait, the warm-up's queued work. Its
        draws come from a generator of its own, so a seeded answer after it is the same as without
        it. The prefills only write cache slots that the next prefill writes again."""
        device, S = self.tokens.device, self.model.cfg.max_seq_len
        prompt = min(8, S // 2)
        steps = generate(self.model, [[EOT_ID] * prompt] * self.batch, min(WARM_UP_TOKENS, S - prompt),
                         temperature, top_p, top_k, torch.Generator(device).manual_seed(0), decoder=self)
        for _ in read_behind(steps):
            pass
        if device.type != "cuda":
            return
        for width in sorted(set(range(PREFILL_BUCKET, S + 1, PREFILL_BUCKET)) | {S}):  # generate()'s widths
            tokens = torch.full((self.batch, width), EOT_ID, dtype=torch.long, device=device)
            self.prefill(tokens, torch.full((self.batch,), width, device=device))
        torch.cuda.synchronize(device)

    def check(self) -> None:
        """Raise if any cache write was out of range (CUDA kernels flag it instead of raising)."""
        if bool(torch.cat([c.status for c in self.caches]).any()):  # one host sync, not one per layer
            raise RuntimeError("a KV-cache write or read fell outside the cache: positions must be < max_seq_len")


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> list[list[int]]:
    """Keep each prompt's newest tokens so prompt + answer fit in max_seq_len (warns when cut)."""
    if not 0 < max_new_tokens < max_seq_len:
        raise ValueError(f"max_new_tokens must be between 1 and max_seq_len - 1 = {max_seq_len - 1}, "
                         f"got {max_new_tokens}")
    # An empty prompt starts from <|endoftext|>, the token every training document follows.
    prompts = [p if len(p) else [EOT_ID] for p in prompts]
    keep = max_seq_len - max_new_tokens + 1  # the last new token is never fed back
    if any(len(p) > keep for p in prompts):
        warnings.warn(f"prompt longer than {keep} tokens (max_seq_len {max_seq_len} - max_new_tokens "
                      f"{max_new_tokens} + 1): its oldest tokens were dropped")
    return [p[-keep:] for p in prompts]


PREFILL_BUCKET = 64  # prompt lengths the prefill is padded to a multiple of
# Tokens of Decoder.warm_up's answer: past read_behind's lag and two of generate()'s stop checks,
# so every host path of a real answer has run once.
WARM_UP_TOKENS = 24


class HostCopy:
    """A tensor's copy to the host, started without waiting for it: into pinned memory behind the
    work queued so far, with an event after it. `wait()` waits for that event only, where `.item()`
    or `.cpu()` would wait for everything queued by then (their copy queues behind it). A tensor
    on any other device is passed through as it is (on the CPU: already there)."""

    def __init__(self, t: torch.Tensor):
        self.host, self.event = t, None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, eot_id: int | None = EOT_ID,
             decoder: Decoder | None = None, stop_check_every: int = 8):
    """Yield (B,) tensors of new tokens, one per step, for prompts of any lengths.

    A sequence that produced `eot_id` yields `eot_id` from then on; generation ends after
    max_new_tokens, or once every sequence is done. That is checked every `stop_check_every`
    steps on a copy of the flags taken at the check before (HostCopy), which the device passed
    long ago: reading the newest flags would wait for the step just queued and leave the device
    idle until Python queued the next. So it ends between stop_check_every and twice that many
    steps after the last sequence is done. Prompts too long for max_seq_len lose their oldest
    tokens, with a warning.
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
    sample_impl = "auto" if model.kernels(device, False) == "ext" else "ref"
    token = sample_next(logits, temperature, top_p, top_k, generator, impl=sample_impl)
    done = token == eot_id if eot_id is not None else torch.zeros(B, dtype=torch.bool, device=device)
    decoder.begin(token, lengths, done, logits.shape[1])
    done = decoder.done  # sample_step updates it
    all_done = None  # HostCopy of done.all() at the last check
    for i in range(max_new_tokens):
        if i > 0:  # the step, the sampling and the masks: one graph replay on CUDA
            token = decoder.sample_step(temperature, top_p, top_k, generator, eot_id, sample_impl)
        yield token
        if i + 1 == max_new_tokens:
            break
        if eot_id is not None and (i + 1) % stop_check_every == 0:
            if all_done is not None and bool(all_done.wait()):
                break
            all_done = HostCopy(done.all())
    decoder.check()


def load_tokenizer():
    """tiktoken's GPT-2 encoding; offline without its files, one UserError saying what to set."""
    try:
        return data_prep.gpt2_encoding()
    except data_prep.DataError as exc:
        raise UserError(str(exc)) from None


def ready_to_generate(model: Transformer, rt: Runtime, impl: str) -> Transformer:
    """A loaded model with `impl` kernels (built here when needed), bf16/fp16 weights on CUDA."""
    model.cfg.impl = impl
    if rt.device.type == "cuda":
        model = model.to(rt.dtype)  # decoding reads every weight per token: half the bytes, ~2x speed
    resolve_impl(impl, rt.device)
    return model


def inference_model(ckpt: str, device: str, impl: str) -> tuple[Transformer, dict, Runtime]:
    """A checkpoint's model ready to generate: on `device`, eval mode, bf16/fp16 weights on CUDA."""
    rt = resolve_runtime(device)
    model, ckpt_dict = load_checkpoint(ckpt, rt.device)
    check_tokenizer_fits(model, ckpt)
    return ready_to_generate(model, rt, impl), ckpt_dict, rt


def check_tokenizer_fits(model: Transformer, ckpt) -> None:
    """Refuse a model whose vocabulary is smaller than GPT-2's: a prompt's ids would have no row."""
    if model.cfg.vocab_size < data_prep.VOCAB_SIZE:
        raise UserError(f"{ckpt}: the model's vocab_size {model.cfg.vocab_size} is smaller than GPT-2's "
                        f"{data_prep.VOCAB_SIZE}, the tokenizer sample uses: pass another --ckpt")


DEFAULT_MAX_NEW_TOKENS = 256  # an answer's length limit when the user sets none and the model has room


def default_max_new_tokens(max_seq_len: int) -> int:
    """256 tokens, or half of max_seq_len when that is less: the other half stays for the prompt
    (and the conversation so far), which a default as long as the context would cut to one token."""
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, max_seq_len // 2))


def fit_max_new_tokens(requested: int | None, max_seq_len: int) -> int:
    """The answer length to use: the user's value, which must fit (UserError otherwise), or the
    default fitted to the model, with a note on stderr when it had to be lowered."""
    if requested is not None:
        if not 0 < requested < max_seq_len:
            raise UserError(f"--max_new_tokens must be between 1 and {max_seq_len - 1} "
                            f"(the model's max_seq_len - 1), got {requested}")
        return requested
    fitted = default_max_new_tokens(max_seq_len)
    if fitted < DEFAULT_MAX_NEW_TOKENS:
        print(f"note: answers stop at {fitted} tokens, half of this model's max_seq_len {max_seq_len} (the "
              f"default is {DEFAULT_MAX_NEW_TOKENS}); --max_new_tokens N sets it, up to {max_seq_len - 1}",
              file=sys.stderr)
    return fitted


def fit_history(history: list[list[int]], turn: list[int], budget: int) -> list[list[int]]:
    """The newest past turns (token ids, oldest first) that fit in `budget` tokens together with
    the new `turn`: whole turns, the oldest dropped first."""
    kept, used = [], len(turn)
    for past in reversed(history):
        if used + len(past) > budget:
            break
        kept.append(past)
        used += len(past)
    return kept[::-1]


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
    """Yield each (device) tensor of `steps` on the host, in order: as soon as its copy there has
    landed, and at most `lag` steps late. Each step's copy starts behind it (HostCopy), and the
    host waits for one only when `lag` newer steps are queued behind it, so the device always has
    work while Python turns tokens into text. Reading a device tensor itself (`int(token)`) waits
    for everything queued: the device then idles while Python prints and queues the next step (the
    CLI read its tokens that way and reported 2,112 tokens/s on the H200, 2026-12-02, where the
    bench, whose loop reads nothing, made 2,810)."""
    import collections
    pending: collections.deque[HostCopy] = collections.deque()
    for step in steps:
        pending.append(HostCopy(step))
        while pending and (len(pending) > lag or pending[0].ready()):
            yield pending.popleft().wait()
    while pending:
        yield pending.popleft().wait()


def answer_decoder(model: Transformer, settings: dict, compile: bool = False) -> Decoder:
    """The CLI's one-row Decoder, on CUDA warmed up for `settings` (Decoder.warm_up), then the
    garbage collector's survivors frozen. A full collection scans every object the process holds
    (about 320,000 once torch and a model are loaded), and the first answer of a process ran one:
    370-400 ms inside it on the development machine's shared CPU (tiny model on the CPU, two runs
    of tools/cli_breakdown.py, whose first answer is profiled), stalling its tokens. After gc.freeze() a collection scans only what
    came after, so this costs one full collection here, once per process."""
    decoder = Decoder(model, 1, compile=compile)
    if decoder.tokens.device.type == "cuda":
        decoder.warm_up(settings["temperature"], settings["top_p"], settings["top_k"])
    gc.collect()
    gc.freeze()
    return decoder


def answer(model: Transformer, decoder: Decoder, enc, text: str, settings: dict, template: dict | None,
           generator: torch.Generator | None, out=sys.stdout,
           history: list[list[int]] | None = None) -> tuple[int, float, float]:
    """Stream one answer to `out`; returns (tokens generated, seconds, seconds until the first token
    was on the host), both timed from the text's arrival: tokenising and the prompt's prefill
    included. Ctrl-C ends it early.

    With `history` (past turns' token ids, oldest first) the answer continues a conversation: the
    model reads the newest past turns that leave room for max_new_tokens in max_seq_len, then this
    turn, and this turn (prompt, answer, <|endoftext|>) is appended. Each turn is what training saw
    of one record, and records follow each other after <|endoftext|>. An empty text starts a
    document from scratch (the model reads only <|endoftext|>)."""
    import time
    start = time.perf_counter()
    prompt = data_prep.format_prompt(template, text) if template and not settings["raw"] else text
    ids = enc.encode_ordinary(prompt) if text.strip() else [EOT_ID]
    past = fit_history(history, ids, model.cfg.max_seq_len - settings["max_new_tokens"]) if history else []
    stream, tokens, first = TextStream(enc), [], 0.0
    try:
        for token in read_behind(generate(model, [sum(past, []) + ids], settings["max_new_tokens"],
                                          settings["temperature"], settings["top_p"], settings["top_k"],
                                          generator, decoder=decoder)):
            token = int(token[0])
            first = first or time.perf_counter() - start
            if token == EOT_ID:
                break
            tokens.append(token)
            out.write(stream.push(token))
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write(stream.flush() + "\n")
    out.flush()
    if history is not None:
        history[:] = [*past, ids + tokens + [EOT_ID]]
    return len(tokens), time.perf_counter() - start, first


REPL_HELP = """commands:
  /temp T      sampling temperature (0: greedy)
  /top_p P     nucleus sampling threshold in (0, 1]
  /top_k K     keep the K most likely tokens (0: all)
  /max N       new tokens per answer
  /raw on|off  feed prompts as-is instead of through the instruction template
  /reset       forget the conversation: the next answer starts afresh
  /show        the current settings
  /help        this list
  /quit        exit (Ctrl-D too); Ctrl-C stops an answer"""
REPL_SETTINGS = {"/temp": ("temperature", float), "/top_p": ("top_p", float), "/top_k": ("top_k", int),
                 "/max": ("max_new_tokens", int), "/raw": ("raw", bool)}


def repl_command(line: str, settings: dict, max_seq_len: int, history: list | None = None) -> str | None:
    """Apply one /command to the settings (or the conversation); returns what to print, or None to quit."""
    name, _, arg = line.strip().partition(" ")
    if name in ("/quit", "/exit"):
        return None
    if name == "/help":
        return REPL_HELP
    if name == "/reset":
        if history is not None:
            history.clear()
        return "conversation forgotten: the next answer starts afresh"
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
    """Chat with a checkpoint: one answer with --prompt, else a conversation read line by line."""
    args = command_flags(argv, SAMPLE_FLAGS)
    # Every check that needs no model comes first: loading it and building the extension take a while.
    try:
        check_sampling_args(args["temperature"], args["top_p"], args["top_k"])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args["impl"] not in ("auto", "ext", "ref"):
        raise UserError(f"--impl must be auto, ext or ref, got '{args['impl']}'")
    if args["max_new_tokens"] is not None and args["max_new_tokens"] < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args['max_new_tokens']}")
    if args["seed"] is not None and not 0 <= args["seed"] < 2**63:  # torch.Generator's range, as train's --seed
        raise UserError(f"--seed must be in [0, 2**63), got {args['seed']}")
    enc = load_tokenizer()
    rt = resolve_runtime(args["device"])
    model, ckpt = load_checkpoint(args["ckpt"], rt.device)
    check_tokenizer_fits(model, args["ckpt"])
    max_new_tokens = fit_max_new_tokens(args["max_new_tokens"], model.cfg.max_seq_len)
    model = ready_to_generate(model, rt, args["impl"])
    generator = None
    if args["seed"] is not None:
        generator = torch.Generator(rt.device).manual_seed(args["seed"])
    settings = {k: args[k] for k in ("temperature", "top_p", "top_k", "raw")}
    settings["max_new_tokens"] = max_new_tokens
    if args["compile"]:
        print("compiling the decoding step (once per process; tens of seconds on a GPU)...", file=sys.stderr)
    decoder, template = answer_decoder(model, settings, args["compile"]), ckpt.get("template")

    history: list[list[int]] = []  # the conversation's turns, as token ids (interactive only)

    def respond(text: str, history: list | None = None) -> None:
        count, seconds, first = answer(model, decoder, enc, text, settings, template, generator, history=history)
        print(f"[{count} tokens, {count / max(seconds, 1e-9):.1f} tokens/s, first token after "
              f"{first * 1e3:.0f} ms]", file=sys.stderr)

    if args["prompt"] is not None:
        respond(args["prompt"])
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Optimus Prime ({model.num_params() / 1e6:.1f}M parameters, {rt.device}). Each answer sees the "
              f"conversation so far (as much as max_seq_len {model.cfg.max_seq_len} holds); /reset forgets it, "
              f"/help lists commands, /quit exits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D exits)")
            continue
        if line.startswith("/"):
            reply = repl_command(line, settings, model.cfg.max_seq_len, history)
            if reply is None:
                return 0
            print(reply)
        elif line.strip():
            respond(line, history)


# ----------------------------------------------------------------------------- evaluation
# `optimus.py eval`: a checkpoint's loss on token files, and its greedy answers to a list of prompts,
# so two checkpoints (say, before and after fine-tuning) can be compared on the same footing.


@torch.no_grad()
def eval_losses(model: Transformer, rt: Runtime, files: list[tuple[Path, Path | None]], length: int,
                batch: int) -> dict:
    """The loss on every next-token target of the token files (with their response masks or None):
    windows of length + 1 tokens at a stride of length (the last one shorter), so each target counts
    once, with at most `length` tokens of context. Over all targets, and over the response ones."""
    sums = {"all": [0.0, 0], "response": [0.0, 0]}  # name: [loss sum, targets]
    tokens_total = 0
    for token_path, mask_path in files:
        tokens, mask = read_tokens(token_path), read_mask(mask_path)
        n = len(tokens)
        tokens_total += n
        starts = range(0, n - 1, length)
        full = [s for s in starts if s + length < n]
        groups = [(full[i: i + batch], length) for i in range(0, len(full), batch)]
        groups += [([s], n - 1 - s) for s in starts if s + length >= n]  # the shorter last window
        for group, size in groups:
            kinds = [("all", None)] + ([("response", mask)] if mask is not None else [])
            for name, kind_mask in kinds:
                inputs, targets = (t.to(rt.device) for t in window_pairs(tokens, kind_mask, group, size))
                with rt.autocast():
                    sums[name][0] += float(model(inputs, targets, "sum"))
                sums[name][1] += int((targets != IGNORE_INDEX).sum())
    report = {"tokens": tokens_total}
    for name, (total, count) in sums.items():
        if count:
            loss = total / count
            report.update({f"loss_{name}": loss, f"perplexity_{name}": math.exp(min(loss, 700.0)),
                           f"targets_{name}": count})
    return report


def read_prompts(path: Path) -> list[dict]:
    """{instruction, context} per prompt: one per line, or JSON Lines with "instruction" (and "context")."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompts file {path} ({type(exc).__name__}): give a UTF-8 text file, "
                        f"one prompt per line") from None
    prompts = []
    for i, line in enumerate(lines, start=1):
        if not line.lstrip().startswith("{"):
            prompts.append({"instruction": line.strip(), "context": ""})
            continue
        try:
            record = json.loads(line)
            prompts.append({"instruction": str(record["instruction"]), "context": str(record.get("context") or "")})
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {i} is not a JSON object with an 'instruction': write one prompt "
                            f"per line, or JSON Lines with 'instruction' (and 'context')") from None
    if not prompts:
        raise UserError(f"{path} holds no prompt: write one per line")
    return prompts


def greedy_answers(model: Transformer, prompts: list[dict], template: dict | None, max_new_tokens: int,
                   batch: int) -> list[dict]:
    """[{prompt, answer}]: greedy answers, prompts formatted with the checkpoint's template (as-is
    when it has none: a model pretrained on plain text)."""
    enc = load_tokenizer()
    texts = [data_prep.format_prompt(template, p["instruction"], p["context"]) if template
             else "\n\n".join(x for x in (p["instruction"], p["context"]) if x) for p in prompts]
    results = []
    for i in range(0, len(texts), batch):
        chunk = texts[i: i + batch]
        steps = list(generate(model, [enc.encode_ordinary(t) for t in chunk], max_new_tokens, temperature=0.0))
        for text, ids in zip(chunk, torch.stack(steps, dim=1).tolist()):                 # (B, steps)
            ids = ids[: ids.index(EOT_ID)] if EOT_ID in ids else ids
            results.append({"prompt": text, "answer": enc.decode(ids)})
    return results


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


def hf_generation_config(cfg: ModelConfig) -> dict:
    """generation_config.json: `model.generate()` samples like our `sample` command by default."""
    defaults = {name: SAMPLE_FLAGS[name][1] for name in ("temperature", "top_p", "top_k")}
    defaults["max_new_tokens"] = default_max_new_tokens(cfg.max_seq_len)  # what fits the model, as sample's
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
    try:
        exists = out.exists()
        if len(os.fsencode(out.name)) > 200:  # its staging sibling's name adds ~30 characters
            raise OSError(errno.ENAMETOOLONG, "name too long")
        ancestor = out.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OSError(errno.ENOTDIR, f"{ancestor} is a file")
    except OSError as exc:  # a name too long, a parent that is a file
        raise UserError(f"cannot use --out {str(out)[:200]} ({exc.strerror or exc}): choose another --out") from None
    if not exists:
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
    # An export writes plain files: a directory (or a link) under one of their names is the user's.
    not_files = [name for name in entries if (out / name).is_symlink() or not (out / name).is_file()]
    if not_files:
        raise UserError(f"{out / not_files[0]} is not a file an export wrote (a directory or a link): "
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
    # Resolved: the staging sibling must sit beside the directory, not in it ("." or ".."), and a
    # symlinked --out has its target replaced, so the link keeps pointing at the new export.
    if "\0" in str(out_dir):
        raise UserError("--out holds a NUL byte: choose another --out")
    out = Path(os.path.realpath(out_dir))
    ckpt_path = find_checkpoint(ckpt)
    check_export_dir(out, ckpt_path, force)  # before loading: a large checkpoint takes a while
    model, _ = load_checkpoint(ckpt_path, "cpu")
    cfg = model.cfg
    tokenizer = load_tokenizer()
    if cfg.vocab_size < tokenizer.n_vocab:
        raise UserError(f"the checkpoint's vocab_size {cfg.vocab_size} is smaller than GPT-2's "
                        f"{tokenizer.n_vocab}: its tokenizer cannot be exported with it")

    # Named like atomic_write's temporary files; mkdir (not mkdtemp's 0700) keeps the user's umask.
    remove_leftovers(out, kinds=("tmp", "old"))  # a killed export's staging and previous directories
    staging, old = (temporary_path(out, kind) for kind in ("tmp", "old"))
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed run that had our pid
    staging.mkdir(parents=True)
    try:
        files = {"config.json": hf_config(cfg), "generation_config.json": hf_generation_config(cfg),
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
        raise UserError(f"--{name} expects true/false/1/0/yes/no, got '{text}'")
    try:
        return typ(text)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(typ, typ.__name__)
        raise UserError(f"--{name} expects {kind}, got '{text}'") from None


class CLIExit(Exception):
    """`--help` was printed: the command ends here, with this exit code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class CLIParser(argparse.ArgumentParser):
    """argparse under the CLI's error rule: a bad command line is one UserError line (no usage dump,
    no SystemExit); `--help` ends the command through CLIExit, so main() returns its code."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            sys.stderr.write(message)
        raise CLIExit(status)


Flags = dict[str, tuple[type, object, str]]  # {name: (type, default, help)}: one command's flags
METAVARS = {int: "N", float: "X", str: "TEXT", bool: "BOOL"}
FLAG_FORMS = ("flags: --NAME VALUE or --NAME=VALUE; booleans take true/false/1/0/yes/no, "
              "and a bare --NAME means true")


def prog_name() -> str:
    """How the user called us: `optimus` (the console script) or `optimus.py`."""
    name = Path(sys.argv[0]).name
    return name if name in ("optimus", "optimus.py") else "optimus.py"


def flag_parser(prog: str, description: str, groups: dict[str, Flags], epilog: str = "") -> CLIParser:
    """An argparse parser with one `--name` per flag. Flags not given are absent from the result
    (argparse.SUPPRESS), so callers tell "left at its default" from "set to the default value"."""
    parser = CLIParser(prog=prog, description=description, epilog=f"{epilog}\n\n{FLAG_FORMS}".strip(),
                       allow_abbrev=False,  # `--temp` must not quietly mean --temperature
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.flag_types = {}
    for title, flags in groups.items():
        group = parser.add_argument_group(title) if title else parser
        for name, (typ, default, help_text) in flags.items():
            shown = str(default).lower() if typ is bool else "''" if default == "" else default
            help_text = (help_text + (f" (default: {shown})" if shown is not None else "")).replace("%", "%%")
            shape = {"nargs": "?", "const": True} if typ is bool else {}  # a bare --flag means true
            group.add_argument(f"--{name}", type=functools.partial(parse_value, name, typ=typ),
                               default=argparse.SUPPRESS, metavar=METAVARS.get(typ, "VALUE"),
                               help=help_text, **shape)
            parser.flag_types[name] = typ
    return parser


def parse_command(parser: CLIParser, argv: list[str]) -> dict:
    """{name: value} of the flags given; an unknown flag is a UserError with the closest names."""
    # `--name VALUE` takes the next word as the value, whatever it looks like (-1e-3, "-x", a
    # word starting with --), as the CLI always did; argparse alone would read "-1e-3" as a flag.
    joined, i = [], 0
    while i < len(argv):
        name = argv[i][2:] if argv[i].startswith("--") else None
        if parser.flag_types.get(name, bool) is not bool and i + 1 < len(argv):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    namespace, extra = parser.parse_known_args(joined)
    if extra:
        arg = extra[0]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument '{arg}': flags look like --name value (see {parser.prog} --help)")
        name = arg[2:].partition("=")[0]
        close = difflib.get_close_matches(name, list(parser.flag_types), n=3, cutoff=0.6)
        hint = f": did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        raise UserError(f"unknown flag --{name}{hint} (see {parser.prog} --help)")
    return vars(namespace)


def parse_flags(argv: list[str], spec: dict[str, type]) -> dict:
    """`--name value`, `--name=value`, bare `--name` (booleans only: true) -> {name: value} of those given."""
    return parse_command(flag_parser(prog_name(), "", {"": {n: (t, None, "") for n, t in spec.items()}}), argv)


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
    "max_new_tokens": (int, None, f"tokens per answer at most (default: {DEFAULT_MAX_NEW_TOKENS}, or half of "
                                  f"the model's max_seq_len when that is less)"),
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
SERVE_FLAGS: dict[str, tuple[type, object, str]] = {
    "ckpt": (str, "checkpoints", "checkpoint file, or a directory (its best, else its latest)"),
    "host": (str, "127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)"),
    "port": (int, 8000, "TCP port (0: any free port)"),
    "max_batch": (int, 32, "requests decoded together (KV-cache rows); more wait in a queue"),
    "max_queue": (int, 256, "requests waiting for a free row; one more gets HTTP 503"),
    "device": (str, "auto", "auto | cpu | cuda | cuda:N"),
    "impl": (str, "auto", "fused kernels: auto | ext | ref"),
    "compile": (bool, False, "torch.compile the one-token step: faster decoding after a slow start"),
}



EVAL_FLAGS: dict[str, tuple[type, object, str]] = {
    "ckpt": (str, "checkpoints", "checkpoint file, or a directory (its best, else its latest)"),
    "data_dir": (str, None, "score this token directory's val.bin (default: the checkpoint's data_dir)"),
    "input": (str, None, "score every record of this text / JSONL file instead (prepared by data_prep)"),
    "prompts": (str, None, "greedy answers to these prompts: one per line, or JSONL with 'instruction'"),
    "json": (str, None, "write the report (losses, counts, answers) to this JSON file"),
    "max_length": (int, 0, "tokens of context per window; 0: the checkpoint's training max_length"),
    "batch_size": (int, 8, "windows (or prompts) per forward pass"),
    "max_new_tokens": (int, 128, "tokens per answer at most"),
    "device": (str, "auto", "auto | cpu | cuda | cuda:N"),
    "impl": (str, "auto", "fused kernels: auto | ext | ref"),
}


def train_parser(prog: str) -> CLIParser:
    """train's flags: --preset and every config field, in groups; the epilog lists the presets."""
    groups: dict[str, Flags] = {"": {"preset": (str, "base", f"named field overrides: {', '.join(PRESETS)} "
                                                            f"(what each sets: below)")}}
    for title, cls in (("model config", ModelConfig), ("training config", TrainingConfig)):
        hints = typing.get_type_hints(cls)
        groups[title] = {f.name: (hints[f.name], f.default, f.metadata["help"]) for f in dataclasses.fields(cls)}
    presets = [f"  {name:<6} " + (" ".join(f"{k}={v}" for k, v in values.items()) or "the defaults above")
               for name, values in PRESETS.items()]
    epilog = "presets (--preset NAME sets these fields; the flags you pass override them):\n" + "\n".join(presets)
    return flag_parser(prog, "Train a model on the token files in --data_dir (prepared first if missing).",
                       groups, epilog)


def command_flags(argv: list[str], flags: Flags) -> dict:
    """Parse a subcommand's own flags (its COMMANDS entry names it in --help) and fill in their defaults."""
    name = next((n for n, c in COMMANDS.items() if c.flags is flags), "")
    description = COMMANDS[name].help if name else ""
    values = parse_command(flag_parser(f"{prog_name()} {name}".strip(), description, {"": flags}), argv)
    return {name: values.get(name, default) for name, (_, default, _) in flags.items()}


def cmd_train(argv: list[str]) -> int:
    """Train a model (flags: --preset and any config field)."""
    values = parse_command(train_parser(f"{prog_name()} train"), argv)
    model_cfg, train_cfg = make_configs(values.pop("preset", "base"), **values)
    train(model_cfg, train_cfg)
    return 0


def cmd_export(argv: list[str]) -> int:
    """Write a checkpoint as a Hugging Face Llama model directory."""
    flags = command_flags(argv, EXPORT_FLAGS)
    if not flags["out"]:
        raise UserError("export needs --out DIR: the directory to write the Hugging Face model to")
    try:
        out = export_hf(flags["ckpt"], flags["out"], force=flags["force"])
    except OSError as exc:  # a full disk, a read-only folder: export_hf has removed its staging copy
        raise UserError(f"cannot write the export to {flags['out']} ({exc.strerror or exc}): free some space "
                        f"or choose another --out") from None
    print(f"exported {find_checkpoint(flags['ckpt'])} to {out}/ ({', '.join(HF_FILES)})")
    print(f"load it with transformers: LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_eval(argv: list[str]) -> int:
    """Loss and perplexity of a checkpoint on token files or a text / JSONL file; greedy answers to prompts."""
    import tempfile
    args = command_flags(argv, EVAL_FLAGS)
    if args["data_dir"] and args["input"]:
        raise UserError("eval takes --data_dir DIR or --input FILE, not both")
    if args["impl"] not in ("auto", "ext", "ref"):
        raise UserError(f"--impl must be auto, ext or ref, got '{args['impl']}'")
    if args["batch_size"] < 1:
        raise UserError(f"--batch_size must be positive, got {args['batch_size']}")
    prompts = read_prompts(Path(args["prompts"])) if args["prompts"] else None
    rt = resolve_runtime(args["device"])
    path = find_checkpoint(args["ckpt"])
    model, ckpt = load_checkpoint(path, rt.device)
    model.cfg.impl = args["impl"]
    resolve_impl(args["impl"], rt.device)
    length = args["max_length"] or min(ckpt["training_config"].get("max_length", 0) or model.cfg.max_seq_len,
                                       model.cfg.max_seq_len)
    if not 0 < length <= model.cfg.max_seq_len:
        raise UserError(f"--max_length must be between 1 and the model's max_seq_len {model.cfg.max_seq_len}")
    if prompts and not 0 < args["max_new_tokens"] < model.cfg.max_seq_len:
        raise UserError(f"--max_new_tokens must be between 1 and {model.cfg.max_seq_len - 1}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args["input"]:  # every record lands in train.bin or val.bin: score both
                with contextlib.redirect_stdout(sys.stderr):
                    meta = data_prep.prepare(args["input"], tmp, dataset_size=0, train_val_split=0.5)
                data_dir, splits = Path(tmp), ("train", "val")
            else:
                data_dir, splits = Path(args["data_dir"] or ckpt["training_config"]["data_dir"]), ("val",)
                meta = data_prep.load_meta(data_dir)
        except data_prep.DataError as exc:
            raise UserError(str(exc)) from None
        files = []
        for split in splits:
            mask = data_dir / f"{split}.mask"
            if not (data_dir / f"{split}.bin").is_file():
                raise UserError(f"{data_dir / f'{split}.bin'} does not exist: prepare {data_dir} with data_prep.py")
            has_mask = meta.get("mask") == "response" and mask.is_file()
            files.append((data_dir / f"{split}.bin", mask if has_mask else None))
        if meta.get("format") == "dolly" and files[0][1] is None:
            print(f"note: {data_dir} has no response mask (prepared by an older data_prep): all-token loss only; "
                  f"prepare it again for the response loss", file=sys.stderr)
        report = {"ckpt": str(path), "step": ckpt["step"], "data": [str(f) for f, _ in files],
                  "format": meta.get("format"), "max_length": length,
                  **eval_losses(model, rt, files, length, args["batch_size"])}
    print(f"{path} (step {ckpt['step']}) on {', '.join(report['data'])}: {report['tokens']:,} tokens, "
          f"windows of {length}")
    for name in ("all", "response"):
        if f"loss_{name}" in report:
            print(f"  {name + ' tokens:':<17} loss {report[f'loss_{name}']:.4f}  perplexity "
                  f"{report[f'perplexity_{name}']:.2f}  ({report[f'targets_{name}']:,} targets)")
    if prompts:
        report["answers"] = greedy_answers(model, prompts, ckpt.get("template"), args["max_new_tokens"],
                                           args["batch_size"])
        for item in report["answers"]:
            print(f"\n>>> {item['prompt'].strip()}\n{item['answer']}")
    if args["json"]:
        atomic_write(Path(args["json"]), lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    return 0


def cmd_serve(argv: list[str]) -> int:
    """Serve a checkpoint over HTTP: the OpenAI API and a chat page (serve.py)."""
    args = command_flags(argv, SERVE_FLAGS)
    if args["max_batch"] < 1 or args["max_queue"] < 1:
        raise UserError("--max_batch and --max_queue must be at least 1")
    if not 0 <= args["port"] <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args['port']}")
    if args["impl"] not in ("auto", "ext", "ref"):
        raise UserError(f"--impl must be auto, ext or ref, got '{args['impl']}'")
    import serve  # the HTTP server is its own module; train/sample never import it
    return serve.run(**args)


class Command(typing.NamedTuple):
    run: typing.Callable[[list[str]], int]
    flags: Flags | None  # None: train, whose flags are the config fields
    help: str


# The CLI's commands: adding one is one line here (its flags dict generates its --help).
COMMANDS: dict[str, Command] = {
    "train": Command(cmd_train, None, "train a model: --preset NAME and any config field"),
    "sample": Command(cmd_sample, SAMPLE_FLAGS, "chat with a checkpoint (interactive without --prompt)"),
    "export": Command(cmd_export, EXPORT_FLAGS, "write a checkpoint in the Hugging Face Llama format"),
    "eval": Command(cmd_eval, EVAL_FLAGS, "loss and perplexity of a checkpoint; greedy answers to prompts"),
    "serve": Command(cmd_serve, SERVE_FLAGS, "serve a checkpoint: OpenAI-compatible HTTP API and a chat page"),
}


def top_parser(prog: str) -> CLIParser:
    parser = CLIParser(prog=prog, description="Optimus Prime: a small, fast, hackable Llama-style LM engine.",
                       epilog=f"'{prog} COMMAND --help' lists a command's flags.\n{FLAG_FORMS}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: `train`, `sample`, `export`; returns the exit code (2: a user error)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(top_parser(prog_name()).format_help())
            return 0
        if argv[0] not in COMMANDS:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown command '{argv[0]}'{hint}: use {', '.join(COMMANDS)} (see --help)")
        return COMMANDS[argv[0]].run(argv[1:]) or 0
    except CLIExit as exc:
        return exc.code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
