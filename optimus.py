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
import math
import os
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

EOT_ID = 50256  # GPT-2's <|endoftext|>: separates documents, ends every answer


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
    eval_batches: int = cfg_field(20, "validation batches (a fixed set)")
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
    """silu(gate) * up, computed in float32 and rounded once to the input dtype."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


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
    A position outside [0, S) writes nothing: on CPU it raises; on CUDA (where raising would
    need a host sync every layer) nothing in this call is written and status[0] is set to 1.
    """
    B, T = pos.shape
    S = k_cache.shape[2]
    bad = (pos < 0) | (pos >= min(S, cos.shape[0]))
    if pos.device.type == "cpu" and bool(bad.any()):
        raise IndexError(f"KV cache position out of range: positions must lie in [0, {S}), "
                         f"got {int(pos.min())}..{int(pos.max())}")
    all_ok = ~bad.any()
    p = pos.clamp(0, S - 1)                                   # (B, T)
    c, s = cos[p][:, :, None, :], sin[p][:, :, None, :]       # (B, T, 1, hd/2)
    q_rot = rotate_half_ref(q, c, s).transpose(1, 2)          # (B, H, T, hd)
    k_rot = rotate_half_ref(k, c, s)                          # (B, T, KV, hd)
    rows = torch.arange(B, device=pos.device)[:, None]        # (B, 1)
    # Advanced indices around a slice: k_cache[rows, :, p] is (B, T, KV, hd).
    k_cache[rows, :, p] = torch.where(all_ok, k_rot, k_cache[rows, :, p])
    v_cache[rows, :, p] = torch.where(all_ok, v, v_cache[rows, :, p])
    status.copy_(torch.maximum(status, (~all_ok).to(status.dtype)))
    return q_rot.contiguous()


_EXTENSION: dict = {}  # filled once by load_extension(): the build's outcome


def _register_python_parts() -> None:
    """Autograd and fake (meta) implementations of the C++ ops, so they train and compile."""
    lib = torch.ops.optimus

    @torch.library.register_fake("optimus::swiglu")
    def _(gate, up):
        return torch.empty_like(gate)

    @torch.library.register_fake("optimus::swiglu_backward")
    def _(grad, gate, up):
        return torch.empty_like(gate), torch.empty_like(up)

    @torch.library.register_fake("optimus::rope_kv_append")
    def _(q, k, v, cos, sin, pos, k_cache, v_cache, status):
        B, T, H, hd = q.shape
        return q.new_empty((B, H, T, hd))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # the backward recomputes silu from gate: no activation kept

    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return tuple(lib.swiglu_backward(grad.contiguous(), gate, up))

    torch.library.register_autograd("optimus::swiglu", backward, setup_context=setup_context)


def _cuda_arch_list() -> str:
    """sm_90 (H100/H200) always, plus the local GPU's architecture when there is one."""
    archs = {"9.0"}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs.add(f"{major}.{minor}")
    return ";".join(sorted(archs))


def load_extension(verbose: bool = False) -> None:
    """JIT-build (ninja, cached, rebuilt when a source changes) and load the csrc/ extension.

    CUDA kernels are built where torch is a CUDA build and a CUDA toolkit is found, CPU kernels
    alone otherwise. Raises RuntimeError with the compiler's message when the build fails.
    """
    if _EXTENSION.get("loaded"):
        return
    from torch.utils import cpp_extension

    src = Path(__file__).resolve().parent / "csrc"
    sources = sorted(str(p) for p in src.glob("*.cpp"))
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(str(p) for p in src.glob("*.cu"))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch_list())
    if not sources:
        raise RuntimeError(f"no extension sources found in {src}")
    cpp_extension.load(
        name="optimus_ext", sources=sources, is_python_module=False, verbose=verbose,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
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


def rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status, impl: str = "ref") -> torch.Tensor:
    """Rotary on q and k plus the KV-cache write, in one pass (see rope_kv_append_ref)."""
    if impl == "ext":
        return torch.ops.optimus.rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status)
    return rope_kv_append_ref(q, k, v, cos, sin, pos, k_cache, v_cache, status)


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

    def hidden(self, tokens: torch.Tensor, pos=None, caches=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim). With `caches`, tokens sit at `pos` (B, T)."""
        impl = resolve_impl(self.cfg.impl, tokens.device)
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

    def forward(self, tokens: torch.Tensor, pos=None, caches=None) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab_size)."""
        return self.logits(self.hidden(tokens, pos, caches))


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_VERSION = 1  # bump when the layout below changes; load_checkpoint refuses others


def atomic_write(path: Path, write) -> None:
    """Run write(tmp_path), fsync, then rename over `path`: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """(model on `device` in eval mode, the checkpoint dict). Errors name the file and the fix."""
    path = find_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, foreign formats: all one message
        raise UserError(f"checkpoint {path} is corrupt or not an Optimus checkpoint "
                        f"({type(exc).__name__}): re-create it or pass another --ckpt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_VERSION:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"checkpoint {path} has format version {found}, this code reads "
                        f"{CHECKPOINT_VERSION}: re-create it with this version")
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError, UserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} does not match this model code ({first}): "
                        f"re-create it with this version") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- data loading


# ----------------------------------------------------------------------------- trainer


# ----------------------------------------------------------------------------- sampler


# ----------------------------------------------------------------------------- export


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
}
EXPORT_FLAGS: dict[str, tuple[type, object, str]] = {
    "ckpt": (str, "checkpoints", "checkpoint file, or a directory (its best, else its latest)"),
    "out": (str, None, "output directory for the Hugging Face model"),
    "force": (bool, False, "write into an existing non-empty directory"),
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
    raise UserError("`train` is not built yet (issue 3: the trainer)")


def cmd_sample(argv: list[str]) -> int:
    command_flags(argv, SAMPLE_FLAGS)
    raise UserError("`sample` is not built yet (issue 4: the sampler)")


def cmd_export(argv: list[str]) -> int:
    command_flags(argv, EXPORT_FLAGS)
    raise UserError("`export` is not built yet (issue 6: Hugging Face export)")


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
