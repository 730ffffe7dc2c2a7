"""optimus::decode_attention against its reference and against SDPA on the full cache with the
position mask, in float64. The kernels compute in float32 and round once to the output dtype:
float32 within 1e-5, bfloat16 within 1e-2 and float16 within 2e-3 relative (about one unit in the
last place of the output). CUDA variants run on a GPU and are skipped on CPU with the reason."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import optimus
from conftest import DEVICES, DTYPES, requires_cuda

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}
# (B, H, KV, T, S, hd): GQA ratios 1, 2, 4, 8; head dims 128, 64, 80, 96, 6; odd cache lengths;
# the default model's decode step (8 heads, 2 kv heads, hd 128, 512 slots) at batch 1 and 16.
# On CUDA, up to 8 queries per kv head with hd a multiple of 32 (<= 256) take the one-token
# kernel (dims per lane 1..8: hd 64, 128, 192, 256 here), the rest the tiled kernel.
SHAPES = [(1, 8, 2, 1, 512, 128), (16, 8, 2, 1, 512, 128), (3, 8, 8, 1, 37, 64), (2, 4, 2, 3, 33, 80),
          (2, 8, 2, 4, 70, 96), (2, 8, 1, 2, 19, 6), (1, 16, 2, 1, 301, 128), (2, 8, 2, 16, 1000, 64),
          (2, 4, 2, 2, 65, 256), (1, 8, 1, 1, 130, 192), (4, 4, 4, 1, 2, 32)]


@pytest.fixture(autouse=True)
def extension_and_seed(request):
    optimus.load_extension()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def inputs(B, H, KV, T, S, hd, device, dtype):
    """Random q and caches (every slot written: nothing hides behind zeros); positions distinct
    per row, with slot 0 and the last slot among them."""
    q = torch.randn(B, H, T, hd, device=device, dtype=dtype)
    k = torch.randn(B, KV, S, hd, device=device, dtype=dtype)
    v = torch.randn(B, KV, S, hd, device=device, dtype=dtype)
    pos = torch.stack([torch.randperm(S)[:T] for _ in range(B)]).to(device)
    pos[0, 0] = 0
    pos[-1, -1] = S - 1
    return q, k, v, pos, torch.zeros(1, dtype=torch.int32, device=device)


def sdpa_float64(q, k, v, pos):
    """The independent reference: SDPA over all S slots with the mask slot <= position, float64."""
    S = k.shape[2]
    mask = torch.arange(S, device=q.device)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, S)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)


def call(q, k, v, pos, status):
    return torch.ops.optimus.decode_attention(q, k, v, pos, status, 1 / math.sqrt(q.shape[-1]))


def test_reference_equals_sdpa_with_the_mask():
    q, k, v, pos, status = inputs(2, 8, 2, 3, 41, 64, "cpu", torch.float32)
    out = optimus.decode_attention_ref(q, k, v, pos, status, 1 / math.sqrt(64))
    torch.testing.assert_close(out.double(), sdpa_float64(q, k, v, pos), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_attention_matches_sdpa_and_reference(device, dtype, shape):
    q, k, v, pos, status = inputs(*shape, device, dtype)
    out = call(q, k, v, pos, status)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), sdpa_float64(q, k, v, pos), **TOL[dtype])
    ref = optimus.decode_attention_ref(q, k, v, pos, torch.zeros_like(status), 1 / math.sqrt(shape[-1]))
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert int(status) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_slots_after_the_positions_are_never_read(device, dtype):
    """NaN in every slot after a row's last position: the output stays finite and right."""
    B, H, KV, T, S, hd = 3, 8, 2, 2, 300, 64
    q, k, v, pos, status = inputs(B, H, KV, T, S, hd, device, dtype)
    pos = torch.tensor([[0, 5], [130, 77], [299, 298]], device=device)
    k_nan, v_nan = k.clone(), v.clone()
    for b in range(B):
        last = int(pos[b].max())
        k_nan[b, :, last + 1:] = float("nan")
        v_nan[b, :, last + 1:] = float("nan")
    out = call(q, k_nan, v_nan, pos, status)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), sdpa_float64(q, k, v, pos), **TOL[dtype])


@pytest.mark.parametrize("bad", [-1, 16, 10_000])
def test_out_of_range_position_raises_on_cpu(bad):
    q, k, v, pos, status = inputs(2, 4, 2, 3, 16, 8, "cpu", torch.float32)
    pos[1, 2] = bad
    with pytest.raises(IndexError, match=r"\[0, 16\)"):
        call(q, k, v, pos, status)
    with pytest.raises(IndexError, match=r"\[0, 16\)"):
        optimus.decode_attention_ref(q, k, v, pos, status, 0.1)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_position_sets_status_on_cuda(dtype):
    """status[0] becomes 1 and stays; the bad row attends up to its clamped position."""
    q, k, v, pos, status = inputs(2, 8, 2, 3, 50, 64, "cuda", dtype)
    pos[0, 1], pos[1, 2] = -3, 50
    out = call(q, k, v, pos, status)
    torch.cuda.synchronize()  # an out-of-bounds read would surface here as an illegal address
    assert int(status) == 1
    torch.testing.assert_close(out.double(), sdpa_float64(q, k, v, pos.clamp(0, 49)), **TOL[dtype])
    pos.clamp_(0, 49)
    call(q, k, v, pos, status)
    assert int(status) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_rejects_bad_arguments_with_a_message(device):
    args = list(inputs(2, 8, 2, 3, 16, 8, device, torch.float32))
    bad = {
        "pos must be int64": {3: args[3].int()},
        "must be contiguous": {1: args[1].transpose(2, 3).contiguous().transpose(2, 3)},
        "share one dtype": {1: args[1].half()},
        "multiple of the cache's 3 kv heads": {1: args[1][:, :1].expand(2, 3, 16, 8).contiguous(),
                                               2: args[2][:, :1].expand(2, 3, 16, 8).contiguous()},
        "status must be a one-element int32": {4: torch.zeros(1, dtype=torch.int64, device=device)},
        "pos must be \\(B, T\\)": {3: args[3][:, :2]},
    }
    for message, replace in bad.items():
        with pytest.raises(RuntimeError, match=message):
            call(*[replace.get(i, a) for i, a in enumerate(args)])


@requires_cuda
def test_cuda_rejects_query_blocks_too_long_for_shared_memory():
    args = inputs(1, 8, 2, 17, 64, 64, "cuda", torch.bfloat16)  # 4 heads x 17 tokens per kv head
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        call(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_opcheck(device):
    q, k, v, pos, status = inputs(2, 4, 2, 3, 16, 8, device, torch.float32)
    torch.library.opcheck(torch.ops.optimus.decode_attention, (q, k, v, pos, status, 0.35))


# ----------------------------------------------------------------------------- add_rms_norm (the decode path's fused norms)

NORM_SHAPES = [(1, 1024), (16, 1, 1024), (3, 7, 96), (2, 5), (2, 2100)]  # 2100: past the kernel's registers


def rms_norm_float64(s, weight, eps):
    """RMSNorm's rounding steps, statistics in float64: an independent check of the kernel."""
    sd = s.double()
    y = (sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return (weight.double() * y.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm_matches_the_residual_add_and_rmsnorm(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    delta = torch.randn(shape, device=device, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    s, out = torch.ops.optimus.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(s, x + delta)  # the sum is rounded once, as the model's residual add
    torch.testing.assert_close(out.double(), rms_norm_float64(x + delta, weight, 1e-5), **TOL[dtype])
    norm = optimus.RMSNorm(shape[-1], 1e-5).to(device=device, dtype=dtype)
    norm.weight.data.copy_(weight)
    ref_s, ref_out = optimus.add_rms_norm_ref(x, delta, weight, 1e-5)
    torch.testing.assert_close(ref_out, norm(x + delta), rtol=0, atol=0)  # the reference is the module's math
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    s, out = torch.ops.optimus.add_rms_norm(x, None, weight, 1e-5)
    assert torch.equal(s, x)
    torch.testing.assert_close(out, norm(x), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_rejects_bad_arguments_with_a_message(device):
    x, w = torch.randn(2, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.optimus.add_rms_norm(x, None, torch.ones(7, device=device), 1e-5)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.optimus.add_rms_norm(x, None, w.half(), 1e-5)
    with pytest.raises(RuntimeError, match="delta must have x's shape"):
        torch.ops.optimus.add_rms_norm(x, x[:1], w, 1e-5)


def test_add_rms_norm_opcheck():
    x, w = torch.randn(3, 40), torch.randn(40)
    torch.library.opcheck(torch.ops.optimus.add_rms_norm, (x, torch.randn(3, 40), w, 1e-5))
    torch.library.opcheck(torch.ops.optimus.add_rms_norm, (x, None, w, 1e-5))
