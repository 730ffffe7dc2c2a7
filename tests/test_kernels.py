"""The extension's kernels (csrc/) against their pure-PyTorch references in optimus.py.

The kernels compute in float32 and round once to the output dtype, like the references, so the two
agree to about one unit in the last place of the output dtype: float32 within 1e-5 relative,
bfloat16 within 1e-2, float16 within 2e-3 (1 ulp is at most 7.8e-3 and 9.8e-4 relative). Every
CUDA variant runs on a GPU and is skipped on CPU with the reason.
"""
import math
import zlib

import pytest
import torch

import optimus
from conftest import requires_cuda

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
OPS = ("swiglu", "swiglu_backward", "rope_kv_append", "decode_attention", "sample", "add_rms_norm")


@pytest.fixture(autouse=True)
def extension_and_seed(request):
    """Build/load the extension once (a failure shows the compiler's message); seed per test."""
    optimus.load_extension()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def test_cpu_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"optimus::{op}", "CPU"), op


def test_cuda_kernels_registered_when_toolkit_present():
    if optimus.cuda_toolkit() is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit (nvcc and headers); none here")
    assert optimus.extension_status()[:2] == (True, True)
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"optimus::{op}", "CUDA"), op


# ----------------------------------------------------------------------------- swiglu

# numel: 1, 255 (odd, not a multiple of 8), 11264 (round), 2063 (prime), 21 * 2816.
SWIGLU_SHAPES = [(1,), (3, 5, 17), (4, 2816), (2063,), (3, 7, 2816)]


def swiglu_backward_float64(grad, gate, up):
    """The backward's formula, in float64: an independent reference for the kernel."""
    g, u, dy = gate.double(), up.double(), grad.double()
    s = torch.sigmoid(g)
    return dy * u * s * (1 + g * (1 - s)), dy * g * s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_forward_matches_reference(device, dtype, shape):
    gate = (3 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    out = torch.ops.optimus.swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, optimus.swiglu_ref(gate, up), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_backward_matches_reference(device, dtype, shape):
    gate = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)
    # Through the registered autograd formula, against autograd through the reference.
    d_gate, d_up = torch.autograd.grad(optimus.swiglu(gate, up, impl="ext"), (gate, up), grad)
    ref_gate, ref_up = torch.autograd.grad(optimus.swiglu_ref(gate, up), (gate, up), grad)
    torch.testing.assert_close(d_gate, ref_gate, **TOL[dtype])
    torch.testing.assert_close(d_up, ref_up, **TOL[dtype])
    # The backward op alone, against the formula in float64.
    d_gate, d_up = torch.ops.optimus.swiglu_backward(grad, gate.detach(), up.detach())
    exp_gate, exp_up = swiglu_backward_float64(grad, gate, up)
    torch.testing.assert_close(d_gate, exp_gate.to(dtype), **TOL[dtype])
    torch.testing.assert_close(d_up, exp_up.to(dtype), **TOL[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_cuda_grid_stride_loop_and_tail(dtype):
    """More elements than one pass of the grid covers (several loop trips), and an odd tail."""
    n = 24 * 1024 * 1024 + 5
    gate, up, grad = (torch.randn(n, device="cuda", dtype=dtype) for _ in range(3))
    torch.testing.assert_close(torch.ops.optimus.swiglu(gate, up), optimus.swiglu_ref(gate, up), **TOL[dtype])
    d_gate, d_up = torch.ops.optimus.swiglu_backward(grad, gate, up)
    exp_gate, exp_up = swiglu_backward_float64(grad, gate, up)
    torch.testing.assert_close(d_gate, exp_gate.to(dtype), **TOL[dtype])
    torch.testing.assert_close(d_up, exp_up.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_extreme_values_match_reference(device):
    """Large |gate| (exp overflow and underflow), infinities, NaN and signed zeros."""
    gate = torch.cat([torch.linspace(-100, 100, 20001),
                      torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])]).to(device)
    up = torch.randn_like(gate)
    torch.testing.assert_close(torch.ops.optimus.swiglu(gate, up), optimus.swiglu_ref(gate, up),
                               equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_non_contiguous_and_misaligned_inputs(device, dtype):
    base = torch.randn(6, 2 * 2816 + 1, device=device).to(dtype)
    flat = base.view(-1)
    cases = {  # name: (gate, up, grad)
        "strided": (base[:, :-1:2], base[:, 1::2], base[:, 2::2]),        # every other column
        "transposed": (base[:, :64].t(), base[:, 64:128].t(), base[:, 128:192].t()),  # (64, 6) views
        "misaligned": (flat[1:2818], flat[3:2820], flat[5:2822]),       # contiguous, odd offsets
    }
    for name, (gate, up, grad) in cases.items():
        assert not (gate.is_contiguous() and gate.data_ptr() % 16 == 0), name
        out = torch.ops.optimus.swiglu(gate, up)
        assert out.is_contiguous(), name
        torch.testing.assert_close(out, optimus.swiglu_ref(gate, up), **TOL[dtype], msg=name)
        d_gate, d_up = torch.ops.optimus.swiglu_backward(grad, gate, up)
        exp_gate, exp_up = swiglu_backward_float64(grad, gate, up)
        torch.testing.assert_close(d_gate, exp_gate.to(dtype), **TOL[dtype], msg=name)
        torch.testing.assert_close(d_up, exp_up.to(dtype), **TOL[dtype], msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_rejects_bad_arguments_with_a_message(device):
    gate = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.optimus.swiglu(gate, torch.randn(4, 1, device=device))
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.optimus.swiglu(gate, gate.half())
    with pytest.raises(RuntimeError, match="not supported"):
        torch.ops.optimus.swiglu(gate.int(), gate.int())


def test_swiglu_float64_gradcheck_through_registered_autograd():
    """The CPU kernel also takes float64 (computed in float64) so gradcheck can check the
    registered backward: finite differences need float64 resolution."""
    gate = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(torch.ops.optimus.swiglu(gate, up), optimus.swiglu_ref(gate, up),
                               **TOL[torch.float64])
    assert torch.autograd.gradcheck(torch.ops.optimus.swiglu, (gate, up))


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_compiles_fullgraph(device):
    fn = torch.compile(lambda gate, up: torch.ops.optimus.swiglu(gate, up), fullgraph=True)
    gate = torch.randn(5, 7, device=device, requires_grad=True)
    up = torch.randn(5, 7, device=device, requires_grad=True)
    out = fn(gate, up)
    torch.testing.assert_close(out, optimus.swiglu_ref(gate, up), **TOL[torch.float32])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate, up), grad)
    expected = torch.autograd.grad(optimus.swiglu_ref(gate, up), (gate, up), grad)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_opcheck(device):
    gate = torch.randn(3, 17, device=device, requires_grad=True)
    up = torch.randn(3, 17, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.optimus.swiglu, (gate, up))
    torch.library.opcheck(torch.ops.optimus.swiglu_backward,
                          (torch.randn(3, 17, device=device), gate.detach(), up.detach()))


# ----------------------------------------------------------------------------- rope_kv_append

# (B, T, H, KV, hd, S): decode; odd hd (hd/2 = 12: 1-element packs for 16-bit dtypes); B*T odd;
# hd/2 = 5 (1-element packs for every dtype); a prefill at the model's head size.
ROPE_SHAPES = [(1, 1, 8, 2, 128, 64), (2, 5, 4, 2, 24, 16), (3, 7, 4, 1, 64, 32), (2, 3, 2, 2, 10, 8),
               (2, 33, 8, 2, 128, 40)]


def rope_inputs(B, T, H, KV, hd, S, device, dtype, table=None):
    """Random q, k, v, tables and caches (random, so untouched slots are recognisable); distinct
    positions per batch row."""
    table = table or S
    q = torch.randn(B, T, H, hd, device=device).to(dtype)
    k = torch.randn(B, T, KV, hd, device=device).to(dtype)
    v = torch.randn(B, T, KV, hd, device=device).to(dtype)
    angles = torch.rand(table, hd // 2, device=device) * 2 * math.pi
    pos = torch.stack([torch.randperm(min(S, table))[:T] for _ in range(B)]).to(device)
    k_cache = torch.randn(B, KV, S, hd, device=device).to(dtype)
    v_cache = torch.randn(B, KV, S, hd, device=device).to(dtype)
    status = torch.zeros(1, dtype=torch.int32, device=device)
    return q, k, v, angles.cos(), angles.sin(), pos, k_cache, v_cache, status


def rotate_float64(x, cos, sin):
    """Rotate-half rotary in float64, written out: x (..., hd); cos, sin (..., hd/2)."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def clone_all(args):
    return [a.clone() for a in args]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_kv_append_matches_reference(device, dtype, shape):
    args = rope_inputs(*shape, device, dtype)
    ext_args, ref_args = clone_all(args), clone_all(args)
    q_ext = torch.ops.optimus.rope_kv_append(*ext_args)
    q_ref = optimus.rope_kv_append_ref(*ref_args)
    assert q_ext.shape == q_ref.shape and q_ext.is_contiguous() and q_ext.dtype == dtype
    torch.testing.assert_close(q_ext, q_ref, **TOL[dtype])
    torch.testing.assert_close(ext_args[6], ref_args[6], **TOL[dtype])   # k_cache
    torch.testing.assert_close(ext_args[7], ref_args[7], rtol=0, atol=0)  # v_cache: copied
    assert int(ext_args[8]) == 0
    if device == "cuda":  # the CUDA kernel rounds like the reference's eager ops: bit for bit
        assert torch.equal(q_ext, q_ref) and torch.equal(ext_args[6], ref_args[6])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_append_writes_the_right_slots_only(device, dtype):
    B, T, H, KV, hd, S = 3, 4, 4, 2, 64, 16
    q, k, v, cos, sin, pos, k_cache, v_cache, status = rope_inputs(B, T, H, KV, hd, S, device, dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_out = torch.ops.optimus.rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status)
    assert q_out.shape == (B, H, T, hd) and q_out.is_contiguous()
    written = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            written[b, p] = True
            torch.testing.assert_close(q_out[b, :, t], rotate_float64(q[b, t], cos[p], sin[p]).to(dtype),
                                       **TOL[dtype])
            torch.testing.assert_close(k_cache[b, :, p], rotate_float64(k[b, t], cos[p], sin[p]).to(dtype),
                                       **TOL[dtype])
            assert torch.equal(v_cache[b, :, p], v[b, t])
    untouched = ~written.to(device)[:, None, :, None].expand_as(k_cache)  # (B, KV, S, hd)
    assert torch.equal(k_cache[untouched], k_before[untouched])
    assert torch.equal(v_cache[untouched], v_before[untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_rope_kv_append_strided_inputs(device, dtype):
    """q, k, v as views into one fused projection (row strides, handled in place), and a q whose
    last dimension is strided (copied first)."""
    B, T, H, KV, hd, S = 2, 3, 4, 2, 32, 8
    _, _, _, cos, sin, pos, k_cache, v_cache, status = rope_inputs(B, T, H, KV, hd, S, device, dtype)
    qkv = torch.randn(B, T, (H + 2 * KV) * hd, device=device).to(dtype)
    q, k, v = (x.unflatten(-1, (-1, hd)) for x in qkv.split([H * hd, KV * hd, KV * hd], dim=-1))
    assert not q.is_contiguous()
    cases = {"fused projection": (q, k, v),
             "strided last dim": (torch.randn(B, T, H, 2 * hd, device=device).to(dtype)[..., ::2], k, v)}
    for name, (qi, ki, vi) in cases.items():
        ext = [k_cache.clone(), v_cache.clone(), status.clone()]
        ref = [k_cache.clone(), v_cache.clone(), status.clone()]
        q_ext = torch.ops.optimus.rope_kv_append(qi, ki, vi, cos, sin, pos, *ext)
        q_ref = optimus.rope_kv_append_ref(qi.contiguous(), ki.contiguous(), vi.contiguous(), cos, sin, pos, *ref)
        torch.testing.assert_close(q_ext, q_ref, **TOL[dtype], msg=name)
        torch.testing.assert_close(ext[0], ref[0], **TOL[dtype], msg=name)
        assert torch.equal(ext[1], ref[1]), name


@pytest.mark.parametrize("bad", [-1, 16, 100])
def test_rope_kv_append_out_of_range_raises_on_cpu_before_writing(bad):
    B, T, H, KV, hd, S = 2, 3, 4, 2, 16, 16
    args = rope_inputs(B, T, H, KV, hd, S, "cpu", torch.float32)
    args[5][1, 2] = bad
    before = clone_all(args)
    with pytest.raises(IndexError, match=rf"\[0, 16\).*{bad} at pos\[1, 2\]"):
        torch.ops.optimus.rope_kv_append(*args)
    for got, expected in zip(args, before):
        assert torch.equal(got, expected)


def test_rope_kv_append_position_beyond_rotary_table_raises_on_cpu():
    """The valid range is [0, min(S, S_table)): a cache longer than the table does not widen it."""
    args = rope_inputs(1, 2, 2, 1, 8, 32, "cpu", torch.float32, table=8)
    args[5][0, 1] = 8
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        torch.ops.optimus.rope_kv_append(*args)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_append_out_of_range_sets_status_on_cuda(dtype):
    """No out-of-range slot is written and status[0] becomes 1; the call's in-range tokens are
    written (documented in rope_kv_append.cu); q is rotated at the clamped position."""
    B, T, H, KV, hd, S = 2, 3, 4, 2, 64, 16
    q, k, v, cos, sin, pos, k_cache, v_cache, status = rope_inputs(B, T, H, KV, hd, S, "cuda", dtype)
    pos[0, 1], pos[1, 0], pos[1, 2] = -1, S, S + 1000
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_out = torch.ops.optimus.rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status)
    torch.cuda.synchronize()  # an out-of-bounds write would surface here as an illegal address
    assert int(status) == 1
    ref_state = [k_before.clone(), v_before.clone(), torch.zeros_like(status)]
    torch.testing.assert_close(q_out, optimus.rope_kv_append_ref(q, k, v, cos, sin, pos, *ref_state), **TOL[dtype])
    expected_k, expected_v = k_before.clone(), v_before.clone()
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if 0 <= p < S:
                expected_k[b, :, p] = rotate_float64(k[b, t], cos[p], sin[p]).to(dtype)
                expected_v[b, :, p] = v[b, t]
    torch.testing.assert_close(k_cache, expected_k, **TOL[dtype])
    assert torch.equal(v_cache, expected_v)
    # status is sticky: a later valid call does not clear it.
    pos.copy_(torch.stack([torch.randperm(S)[:T] for _ in range(B)]))
    torch.ops.optimus.rope_kv_append(q, k, v, cos, sin, pos, k_cache, v_cache, status)
    assert int(status) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_rope_kv_append_rejects_bad_arguments_with_a_message(device):
    args = rope_inputs(2, 3, 4, 2, 16, 8, device, torch.float32)
    bad = {
        "pos must be int64": {5: args[5].int()},
        "k_cache and v_cache must be contiguous": {6: args[6].transpose(2, 3).contiguous().transpose(2, 3)},
        "share one dtype": {2: args[2].half()},
        "cos and sin must be float32": {3: args[3].double(), 4: args[4].double()},
        "status must be a one-element int32": {8: torch.zeros(1, dtype=torch.int64, device=device)},
        "head dim must be even": {0: args[0][..., :15]},
    }
    for message, replace in bad.items():
        call = [replace.get(i, a) for i, a in enumerate(args)]
        with pytest.raises(RuntimeError, match=message):
            torch.ops.optimus.rope_kv_append(*call)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_kv_append_opcheck(device):
    torch.library.opcheck(torch.ops.optimus.rope_kv_append, tuple(rope_inputs(2, 3, 4, 2, 16, 8, device, torch.float32)))


# ----------------------------------------------------------------------------- the model on either implementation

def model_pair(device):
    """The tiny model twice, impl="ref" and impl="ext", with the same weights."""
    models = {}
    for impl in ("ref", "ext"):
        cfg, _ = optimus.make_configs("tiny", impl=impl)
        models[impl] = optimus.Transformer(cfg).to(device)
    models["ext"].load_state_dict(models["ref"].state_dict())
    return models["ref"], models["ext"]


MODEL_TOL = {"cpu": dict(rtol=1e-5, atol=1e-5), "cuda": dict(rtol=1e-4, atol=1e-4)}


@pytest.fixture
def no_tf32():
    """Full float32 matmuls: with TF32 (which resolve_runtime turns on for training), a one-ulp
    difference in an activation can round to a different TF32 value, and the two models drift."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("device", DEVICES)
def test_model_logits_and_grads_equal_with_ext_and_ref(device):
    ref, ext = model_pair(device)
    tokens = torch.randint(0, ref.cfg.vocab_size, (2, 33), device=device)
    losses = []
    for model in (ref, ext):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append((logits.detach(), loss.detach()))
    torch.testing.assert_close(losses[1][0], losses[0][0], **MODEL_TOL[device])
    torch.testing.assert_close(losses[1][1], losses[0][1], **MODEL_TOL[device])
    for (name, p_ref), p_ext in zip(ref.named_parameters(), ext.parameters()):
        torch.testing.assert_close(p_ext.grad, p_ref.grad, **MODEL_TOL[device], msg=name)


def cached_logits(model, tokens, prefill):
    """Logits of `tokens` through the KV cache: a prefill of `prefill` tokens, then one at a time."""
    B, T = tokens.shape
    device = tokens.device
    caches = [optimus.KVCache(B, model.cfg, torch.float32, device) for _ in range(model.cfg.depth)]
    pos = torch.arange(prefill, device=device).expand(B, prefill)
    out = [model(tokens[:, :prefill], pos, caches)]
    for t in range(prefill, T):
        out.append(model(tokens[:, t:t + 1], torch.full((B, 1), t, device=device), caches))
    assert all(int(c.status) == 0 for c in caches)
    return torch.cat(out, dim=1)


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("device", DEVICES)
def test_model_kv_cache_logits_equal_with_ext_and_ref(device):
    ref, ext = model_pair(device)
    tokens = torch.randint(0, ref.cfg.vocab_size, (3, 12), device=device)
    with torch.no_grad():
        ext_logits = cached_logits(ext.eval(), tokens, prefill=5)
        ref_logits = cached_logits(ref.eval(), tokens, prefill=5)
        full_logits = ref(tokens)
    torch.testing.assert_close(ext_logits, ref_logits, **MODEL_TOL[device])
    # ...and both equal the cache-free forward over the whole sequence.
    torch.testing.assert_close(ext_logits, full_logits, rtol=1e-4, atol=1e-4)
