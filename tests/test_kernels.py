"""The extension's kernels (csrc/) against their pure-PyTorch references in optimus.py.

The kernels compute in float32 and round once to the output dtype, like the references, so the two
agree to about one unit in the last place of the output dtype: float32 within 1e-5 relative,
bfloat16 within 1e-2, float16 within 2e-3 (1 ulp is at most 7.8e-3 and 9.8e-4 relative). Every
CUDA variant runs on a GPU and is skipped on CPU with the reason.
"""
import contextlib
import math
import time
import zlib

import pytest
import torch

import optimus
from conftest import DEVICES, DTYPES, requires_cuda

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
OPS = ("swiglu", "swiglu_backward", "swiglu_packed", "swiglu_packed_backward", "rope_kv_append",
       "cross_entropy_fwd_bwd", "decode_attention", "sample", "add_rms_norm")


@pytest.fixture(autouse=True)
def extension_and_seed(request):
    """Build/load the extension once (a failure shows the compiler's message); seed per test."""
    optimus.load_extension()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def test_cpu_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"optimus::{op}", "CPU"), op


def test_cuda_kernels_registered_when_they_are_built():
    if not optimus.builds_cuda_kernels():
        pytest.skip("CUDA kernels build with a CUDA toolkit and a visible GPU, or a toolkit and "
                    "TORCH_CUDA_ARCH_LIST (.ci/run sets it); neither here")
    assert optimus.extension_status()[:2] == (True, True)
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"optimus::{op}", "CUDA"), op


@pytest.fixture
def fake_build(monkeypatch):
    """load_extension as if for the first time, with cpp_extension.load replaced: (calls, set delay)."""
    from torch.utils import cpp_extension
    calls, delay = [], {"s": 0.0}

    def load(**kwargs):
        calls.append(kwargs)
        time.sleep(delay["s"])
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # load_extension may set it
    monkeypatch.setattr(optimus, "_EXTENSION", {})
    monkeypatch.setattr(optimus, "_register_python_parts", lambda: None)  # the real ops stay registered
    monkeypatch.setattr(optimus, "BUILD_NOTICE_AFTER_S", 0.2)
    return calls, delay


def test_a_build_says_when_it_starts_and_ends_a_cached_load_says_nothing(fake_build, capsys):
    calls, delay = fake_build
    optimus.load_extension()
    assert len(calls) == 1 and capsys.readouterr().err == ""  # quick: nothing was compiled
    optimus._EXTENSION.clear()
    delay["s"] = 1.0
    optimus.load_extension()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("building the optimus extension (") and "once" in lines[0]
    assert lines[1].startswith("built the optimus extension in ")


def test_cuda_kernels_build_only_for_a_gpu_or_an_explicit_arch_list(fake_build, monkeypatch):
    calls, _ = fake_build
    monkeypatch.setattr(optimus, "cuda_toolkit", lambda: "/opt/some-cuda")
    monkeypatch.setenv("CUDA_HOME", "/opt/some-cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert not optimus.builds_cuda_kernels()   # a toolkit but no GPU: sm_90 kernels would never run
    optimus.load_extension()
    assert not any(s.endswith(".cu") for s in calls[-1]["sources"]) and optimus._EXTENSION["cuda"] is False
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # how CI compile-checks the .cu files
    optimus._EXTENSION.clear()
    assert optimus.builds_cuda_kernels()
    optimus.load_extension()
    assert any(s.endswith(".cu") for s in calls[-1]["sources"]) and optimus._EXTENSION["cuda"] is True
    assert "-DOPTIMUS_WITH_CUDA" in calls[-1]["extra_cflags"]


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


# (leading dims, H): the base model's width (16-byte rows); an odd width (1-element packs).
PACKED_SHAPES = [((3, 5), 2816), ((2, 3), 37), ((7,), 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, H", PACKED_SHAPES)
def test_swiglu_reads_the_halves_of_a_packed_tensor_in_place(device, dtype, lead, H):
    """gate and up as row-strided views [..., :H] and [..., H:] of one (..., 2H) tensor, and of a
    wider one at an odd column offset (misaligned rows)."""
    packed = (2 * torch.randn(*lead, 2 * H, device=device)).to(dtype)
    wide = (2 * torch.randn(*lead, 2 * H + 3, device=device)).to(dtype)
    grad = torch.randn(*lead, H, device=device).to(dtype)
    views = {"packed": (packed[..., :H], packed[..., H:]), "offset": (wide[..., 1:H + 1], wide[..., H + 2:2 * H + 2])}
    for name, (gate, up) in views.items():
        assert not gate.is_contiguous() and gate.stride(-1) == 1, name
        out = torch.ops.optimus.swiglu(gate, up)
        torch.testing.assert_close(out, optimus.swiglu_ref(gate, up), **TOL[dtype], msg=name)
        d_gate, d_up = torch.ops.optimus.swiglu_backward(grad, gate, up)
        exp_gate, exp_up = swiglu_backward_float64(grad, gate, up)
        torch.testing.assert_close(d_gate, exp_gate.to(dtype), **TOL[dtype], msg=name)
        torch.testing.assert_close(d_up, exp_up.to(dtype), **TOL[dtype], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, H", PACKED_SHAPES)
def test_swiglu_packed_forward_and_one_packed_gradient(device, dtype, lead, H):
    gate_up = (2 * torch.randn(*lead, 2 * H, device=device)).to(dtype).requires_grad_()
    grad = torch.randn(*lead, H, device=device).to(dtype)
    out = optimus.swiglu_packed(gate_up, impl="ext")
    assert out.shape == (*lead, H) and out.is_contiguous()
    torch.testing.assert_close(out, optimus.swiglu_packed_ref(gate_up), **TOL[dtype])
    (d_gate_up,) = torch.autograd.grad(out, gate_up, grad)
    exp_gate, exp_up = swiglu_backward_float64(grad, gate_up[..., :H], gate_up[..., H:])
    assert d_gate_up.shape == gate_up.shape
    torch.testing.assert_close(d_gate_up, torch.cat([exp_gate, exp_up], -1).to(dtype), **TOL[dtype])
    # A packed input that is itself a row view (a wider buffer's first 2H columns).
    wide = torch.randn(*lead, 2 * H + 8, device=device).to(dtype)
    torch.testing.assert_close(torch.ops.optimus.swiglu_packed(wide[..., :2 * H]),
                               optimus.swiglu_packed_ref(wide[..., :2 * H]), **TOL[dtype])


def test_swiglu_packed_float64_gradcheck_and_opcheck():
    gate_up = torch.randn(3, 2 * 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.optimus.swiglu_packed, (gate_up,))
    x = torch.randn(3, 2 * 17, requires_grad=True)
    torch.library.opcheck(torch.ops.optimus.swiglu_packed, (x,))
    torch.library.opcheck(torch.ops.optimus.swiglu_packed_backward, (torch.randn(3, 17), x.detach()))


def test_swiglu_packed_rejects_an_odd_width():
    with pytest.raises(RuntimeError, match="2H"):
        torch.ops.optimus.swiglu_packed(torch.randn(4, 7))


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


# ----------------------------------------------------------------------------- cross-entropy (the LM head's loss)

IGNORE = optimus.IGNORE_INDEX
# (rows, cols, vocab): one row; odd rows and a padded vocabulary not a multiple of a pack; the
# GPT-2 vocabulary padded to 50304, as the model has it; cols not a multiple of 8 (1-element packs).
CE_SHAPES = [(1, 64, 64), (37, 128, 100), (5, 50304, 50257), (9, 203, 201)]


def ce_inputs(rows, cols, vocab, device, dtype):
    logits = (4 * torch.randn(rows, cols, device=device)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=device)
    if rows > 2:
        targets[1] = IGNORE
        targets[-1] = vocab - 1  # the last real column
    return logits, targets


def ce_float64(logits, targets, scale, vocab):
    """Loss and gradient of each row, written out in float64: the independent reference."""
    x = logits[:, :vocab].double()
    lse = torch.logsumexp(x, dim=-1)
    keep = targets != IGNORE
    safe = torch.where(keep, targets, 0)
    loss = torch.where(keep, lse - x[torch.arange(len(x)), safe], 0.0)
    grad = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    onehot = torch.nn.functional.one_hot(safe, logits.shape[1])[:, :vocab].double()
    grad[:, :vocab] = (torch.exp(x - lse[:, None]) - onehot) * scale * keep[:, None]
    return loss, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES)
def test_cross_entropy_op_matches_reference(device, dtype, shape):
    logits, targets = ce_inputs(*shape, device, dtype)
    scale = torch.tensor([0.37], device=device)
    exp_loss, exp_grad = ce_float64(logits, targets, 0.37, shape[2])
    for impl in ("ext", "ref"):
        x = logits.clone()
        loss = optimus.cross_entropy_fwd_bwd(x, targets, scale, shape[2], impl=impl)
        assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
        torch.testing.assert_close(loss, exp_loss.float(), rtol=1e-5, atol=1e-5, msg=impl)
        # The gradient, rounded once to the logits' dtype; padded columns and ignored rows exactly 0.
        torch.testing.assert_close(x, exp_grad.to(dtype), **TOL[dtype], msg=impl)
        assert torch.all(x[:, shape[2]:] == 0) and (shape[0] < 3 or torch.all(x[1] == 0)), impl


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_op_misaligned_rows_and_extreme_logits(device):
    """A view at an odd offset (1-element packs), huge and tiny logits, a row of one hot logit."""
    base = torch.randn(4 * 72 + 1, device=device)
    x = base[1:].view(4, 72)
    x[0, 5] = 80.0         # softmax saturates at the target's neighbour
    x[1] = -1e4            # every logit very negative
    x[2, :] = 0.0          # uniform
    targets = torch.tensor([7, 0, 70, IGNORE], device=device)
    exp_loss, exp_grad = ce_float64(x, targets, 1.0, 71)
    loss = torch.ops.optimus.cross_entropy_fwd_bwd(x, targets, torch.ones(1, device=device), 71)
    torch.testing.assert_close(loss, exp_loss.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x, exp_grad.float(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_op_bad_target_raises_on_cpu_before_writing():
    logits, targets = ce_inputs(6, 64, 50, "cpu", torch.float32)
    targets[4] = 50  # a padded column: not a real token
    for impl in ("ext", "ref"):
        x = logits.clone()
        with pytest.raises(IndexError, match="outside"):
            optimus.cross_entropy_fwd_bwd(x, targets, torch.ones(1), 50, impl=impl)
        assert torch.equal(x, logits), impl


@requires_cuda
def test_cross_entropy_op_bad_target_gives_nan_on_cuda():
    logits, targets = ce_inputs(6, 64, 50, "cuda", torch.float32)
    targets[4] = -3
    loss = torch.ops.optimus.cross_entropy_fwd_bwd(logits, targets, torch.ones(1, device="cuda"), 50)
    assert torch.isnan(loss[4]) and torch.isfinite(loss[torch.arange(6, device="cuda") != 4]).all()
    assert torch.all(logits[4] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_op_rejects_bad_arguments_with_a_message(device):
    logits, targets = ce_inputs(4, 64, 60, device, torch.float32)
    one = torch.ones(1, device=device)
    op = torch.ops.optimus.cross_entropy_fwd_bwd
    with pytest.raises(RuntimeError, match="contiguous"):
        op(logits.t(), targets, one, 4)
    with pytest.raises(RuntimeError, match="targets must have shape"):
        op(logits, targets[:3], one, 60)
    with pytest.raises(RuntimeError, match="int64"):
        op(logits, targets.int(), one, 60)
    with pytest.raises(RuntimeError, match="scale"):
        op(logits, targets, one.double(), 60)
    with pytest.raises(RuntimeError, match="vocab_size"):
        op(logits, targets, one, 65)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_op_opcheck(device):
    logits, targets = ce_inputs(5, 64, 60, device, torch.float32)
    torch.library.opcheck(torch.ops.optimus.cross_entropy_fwd_bwd, (logits, targets, torch.ones(1, device=device), 60))


# (tokens, chunk): one chunk; a chunk edge that leaves one token over; exactly two chunks; a chunk
# of one token.
LCE_CASES = [(7, 8192), (33, 8), (64, 32), (5, 1)]


def head_loss(h, weight, targets, vocab, reduction):
    """F.cross_entropy on head(h)[..., :vocab] in float32: what the fused path replaces."""
    logits = torch.nn.functional.linear(h, weight)[..., :vocab].float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens, chunk", LCE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_f_cross_entropy_float32(device, tokens, chunk, reduction, no_tf32):
    vocab, padded, dim = 201, 256, 48
    h = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    weight = (0.3 * torch.randn(padded, dim, device=device)).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens), device=device)
    targets[0, ::3] = IGNORE
    expected = head_loss(h, weight, targets, vocab, reduction)
    exp_h, exp_w = torch.autograd.grad(expected, (h, weight))
    for impl in ("ext", "ref"):
        loss = optimus.linear_cross_entropy(h, weight, targets, vocab, reduction, impl=impl, chunk=chunk)
        got_h, got_w = torch.autograd.grad(2.5 * loss, (h, weight))  # the backward scales by its grad
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=impl)
        torch.testing.assert_close(got_h, 2.5 * exp_h, rtol=1e-5, atol=1e-6, msg=impl)
        torch.testing.assert_close(got_w, 2.5 * exp_w, rtol=1e-5, atol=1e-6, msg=impl)
        assert torch.all(got_w[vocab:] == 0), impl  # padded rows of the head get no gradient
    spec = optimus.linear_cross_entropy_ref(h, weight, targets, vocab, reduction)
    torch.testing.assert_close(spec, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_bf16(device):
    """bf16 matmuls (autocast on CUDA, bf16 tensors on CPU): against F.cross_entropy on the
    float32 of the same bf16 logits. Loss within 1e-3 relative (the float32 log-sum-exp sees the
    same numbers); gradients within bf16's rounding of the gradient logits (1e-2)."""
    vocab, padded, dim, tokens = 1000, 1024, 64, 70
    h32 = torch.randn(2, tokens // 2, dim, device=device)
    w32 = 0.2 * torch.randn(padded, dim, device=device)
    targets = torch.randint(0, vocab, (2, tokens // 2), device=device)
    targets[:, :4] = IGNORE
    cuda = device == "cuda"
    h = (h32 if cuda else h32.bfloat16()).requires_grad_()
    w = (w32 if cuda else w32.bfloat16()).requires_grad_()
    context = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with context:
        expected = head_loss(h, w, targets, vocab, "mean")
        loss = optimus.linear_cross_entropy(h, w, targets, vocab, "mean", impl="ext", chunk=16)
    exp_h, exp_w = torch.autograd.grad(expected, (h, w))
    got_h, got_w = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and got_h.dtype == h.dtype and got_w.dtype == w.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    for got, exp in ((got_h, exp_h), (got_w, exp_w)):
        assert float((got.float() - exp.float()).norm() / exp.float().norm()) < 1e-2


def test_linear_cross_entropy_float64_gradcheck_on_cpu():
    """The gradients made in the forward (through the CPU kernel, float64) against finite differences."""
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, IGNORE, 12, 1, 11, 4])
    for reduction in ("mean", "sum"):
        fn = lambda h, w: optimus.linear_cross_entropy(h, w, targets, 13, reduction, impl="ext", chunk=3)
        assert torch.autograd.gradcheck(fn, (h, weight))


def test_linear_cross_entropy_all_ignored_gives_zero_mean_and_no_gradient():
    h = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(64, 8, requires_grad=True)
    targets = torch.full((4,), IGNORE)
    for impl in ("ext", "ref"):
        loss = optimus.linear_cross_entropy(h, weight, targets, 60, impl=impl)
        assert float(loss) == 0.0
        assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, (h, weight)))
    assert float(optimus.linear_cross_entropy_ref(h, weight, targets, 60)) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_model_loss_compiles_and_equals_eager(device, no_tf32):
    """Transformer.forward(tokens, targets) under torch.compile: the fused loss runs eagerly after a
    graph break, and gives the eager model's loss and gradients."""
    ref, ext = model_pair(device)
    tokens = torch.randint(0, ref.cfg.vocab_size, (2, 17), device=device)
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = IGNORE
    compiled = torch.compile(ext, backend="aot_eager")
    results = []
    for fn in (ref, compiled):
        loss = fn(tokens, targets)
        results.append((loss.detach(), torch.autograd.grad(loss, list(ext.parameters()) if fn is compiled
                                                           else list(ref.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0], **MODEL_TOL[device])
    for got, exp in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, exp, **MODEL_TOL[device])


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
    out = [model(tokens[:, :prefill], pos=pos, caches=caches)]
    for t in range(prefill, T):
        out.append(model(tokens[:, t:t + 1], pos=torch.full((B, 1), t, device=device), caches=caches))
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
