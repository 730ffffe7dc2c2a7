"""optimus::rope_append_attention (a decoding step's rotary, cache write and attention in one op)
against an independent float64 computation (the rotary written out, the key and value put into a
copy of the cache, SDPA over every slot with the position mask) and against its reference (the
two reference ops in turn). Float32 within 1e-5, bfloat16 within 1e-2, float16 within 2e-3
relative, as for decode_attention. CUDA variants run on a GPU and are skipped on CPU."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import optimus
from conftest import DEVICES, DTYPES, requires_cuda
from test_kernels import rotate_float64

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}
# (B, H, KV, S, hd): the default model's step (8 heads, 2 kv heads, hd 128, 512 slots) at batch
# 1 and 16; GQA ratios 1, 2, 4, 8; hd 32, 64, 256 (the fused CUDA kernel's 1, 2, 8 dims per
# lane); hd 80 and GQA 8 at hd 128 (the CUDA path through the two ops); caches of 2 and 3000 slots.
SHAPES = [(1, 8, 2, 512, 128), (16, 8, 2, 512, 128), (3, 8, 8, 37, 64), (2, 4, 2, 33, 80), (2, 8, 4, 70, 32),
          (1, 8, 1, 130, 128), (2, 4, 2, 65, 256), (4, 4, 4, 2, 64), (1, 8, 2, 3000, 128), (3, 8, 1, 300, 64)]


@pytest.fixture(autouse=True)
def extension_and_seed(request):
    optimus.load_extension()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def inputs(B, H, KV, S, hd, device, dtype, positions=None):
    """Random qkv rows, tables and caches (every slot random: a stale or unwritten slot shows);
    positions distinct per row with slot 0 and the last slot among them, unless given."""
    qkv = torch.randn(B, (H + 2 * KV) * hd, device=device).to(dtype)
    angles = torch.rand(S, hd // 2, device=device) * 2 * math.pi
    if positions is None:
        positions = torch.randint(0, S, (B,))
        positions[0] = 0
        positions[-1] = S - 1
    pos = torch.as_tensor(positions, device=device).view(B, 1)
    k_cache = torch.randn(B, KV, S, hd, device=device).to(dtype)
    v_cache = torch.randn(B, KV, S, hd, device=device).to(dtype)
    status = torch.zeros(1, dtype=torch.int32, device=device)
    counts = torch.zeros(B * KV, dtype=torch.int32, device=device)
    return qkv, angles.cos(), angles.sin(), pos, k_cache, v_cache, status, counts


def expected_float64(qkv, cos, sin, pos, k_cache, v_cache, H):
    """Written out in float64: rotate q and k at each row's position, store k and v (rounded to
    the cache's dtype, as the cache holds them) into copies, SDPA with the mask slot <= position."""
    B, KV, S, hd = k_cache.shape
    heads = qkv.double().view(B, H + 2 * KV, hd)
    c, s = cos[pos[:, 0]][:, None], sin[pos[:, 0]][:, None]                        # (B, 1, hd/2)
    q = rotate_float64(heads[:, :H], c, s).to(qkv.dtype).double()                  # (B, H, hd), q's rounding
    keys, values = k_cache.clone(), v_cache.clone()
    rows = torch.arange(B, device=qkv.device)
    keys[rows, :, pos[:, 0]] = rotate_float64(heads[:, H:H + KV], c, s).to(k_cache.dtype)
    values[rows, :, pos[:, 0]] = heads[:, H + KV:].to(v_cache.dtype)
    mask = torch.arange(S, device=qkv.device)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, 1, S)
    out = F.scaled_dot_product_attention(q[:, :, None], keys.double(), values.double(), attn_mask=mask,
                                         enable_gqa=True)                          # (B, H, 1, hd)
    return out.reshape(B, H * hd), keys, values


def call(args, H):
    return torch.ops.optimus.rope_append_attention(*args, H, 1 / math.sqrt(args[4].shape[-1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_and_the_reference(device, dtype, shape):
    B, H, KV, S, hd = shape
    args = inputs(B, H, KV, S, hd, device, dtype)
    want, keys, values = expected_float64(*args[:6], H)
    ref_args = [a.clone() for a in args]
    out = call(args, H)
    assert out.shape == (B, H * hd) and out.dtype == dtype
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    torch.testing.assert_close(args[4], keys, **TOL[dtype])  # the new keys, and every other slot untouched
    assert torch.equal(args[5], values)
    ref = optimus.rope_append_attention_ref(*ref_args, H, 1 / math.sqrt(hd))
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert int(args[6]) == 0
    assert not args[7].any()  # the merge counters are zero again


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_slice_of_a_wider_projection_and_repeated_steps(device):
    """qkv as a column slice (row stride larger than the row), then 40 steps that each append at
    the next position: every step equals the reference run alongside (and the counters, reused
    at every step, never drift)."""
    B, H, KV, S, hd = 3, 8, 2, 64, 64
    args = list(inputs(B, H, KV, S, hd, device, torch.bfloat16, positions=[5, 0, 20]))
    ref_state = [a.clone() for a in args[4:8]]
    wide = torch.randn(B, (H + 2 * KV) * hd + 24, device=device).to(torch.bfloat16)
    for step in range(40):
        wide.normal_()
        args[0] = wide[:, 8: 8 + (H + 2 * KV) * hd]
        out = call(args, H)
        ref = optimus.rope_append_attention_ref(args[0], *args[1:4], *ref_state, H, 1 / math.sqrt(hd))
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
        args[3] = args[3] + 1
    torch.testing.assert_close(args[4], ref_state[0], **TOL[torch.bfloat16])
    assert not args[7].any() and int(args[6]) == 0


@requires_cuda
def test_cuda_graph_replays_equal_eager_steps():
    """The Decoder's use: the op captured once into a CUDA graph and replayed at new positions."""
    B, H, KV, S, hd = 2, 8, 2, 300, 128
    args = list(inputs(B, H, KV, S, hd, "cuda", torch.bfloat16, positions=[0, 100]))
    eager = [a.clone() for a in args]
    pos = args[3]
    call(args, H)  # warm-up outside the graph
    eager_out = call(eager, H)
    torch.testing.assert_close(eager[4], args[4], rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(args, H)
    for step in range(1, 120):
        pos.add_(1)
        eager[3] = pos.clone()
        graph.replay()
        eager_out = call(eager, H)
        torch.testing.assert_close(out, eager_out, **TOL[torch.bfloat16])
    torch.cuda.synchronize()
    torch.testing.assert_close(args[4], eager[4], rtol=0, atol=0)
    assert not args[7].any()


@pytest.mark.parametrize("bad", [-1, 64, 10_000])
def test_out_of_range_position_raises_on_cpu_before_writing(bad):
    args = inputs(2, 8, 2, 64, 32, "cpu", torch.float32, positions=[3, bad])
    before = [a.clone() for a in args[4:6]]
    with pytest.raises(IndexError, match=r"\[0, 64\)"):
        call(args, 8)
    assert torch.equal(args[4], before[0]) and torch.equal(args[5], before[1])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_position_sets_status_on_cuda(dtype):
    """status[0] becomes 1; the bad row writes nothing; the good row is still right."""
    B, H, KV, S, hd = 2, 8, 2, 50, 128
    args = inputs(B, H, KV, S, hd, "cuda", dtype, positions=[7, 50])
    before = args[4][1].clone()
    want, _, _ = expected_float64(*args[:3], args[3].clamp(0, S - 1), *args[4:6], H)
    out = call(args, H)
    torch.cuda.synchronize()  # an out-of-bounds access would surface here as an illegal address
    assert int(args[6]) == 1
    assert torch.equal(args[4][1], before)
    torch.testing.assert_close(out[0].double(), want[0], **TOL[dtype])
    assert not args[7].any()


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_arguments_with_a_message(device):
    args = list(inputs(2, 8, 2, 16, 8, device, torch.float32))
    bad = {
        "qkv must be \\(B, \\(H \\+ 2 KV\\) hd\\)": {0: args[0][:, :-8]},
        "pos must be int64 \\(B, 1\\)": {3: args[3].expand(2, 2)},
        "share one dtype": {4: args[4].half()},
        "counts must be a contiguous int32 \\(B x KV,\\) = \\(4,\\)": {7: args[7][:2]},
        "cos and sin must be float32": {1: args[1].double()},
        "status must be a one-element int32": {6: torch.zeros(2, dtype=torch.int32, device=device)},
    }
    for message, replace in bad.items():
        with pytest.raises(RuntimeError, match=message):
            call([replace.get(i, a) for i, a in enumerate(args)], 8)
    with pytest.raises(RuntimeError, match="multiple of the cache's 2 kv heads"):
        call(args, 7)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = inputs(2, 4, 2, 16, 8, device, torch.float32)
    torch.library.opcheck(torch.ops.optimus.rope_append_attention, (*args, 4, 0.35))


@requires_cuda
@pytest.mark.parametrize("batch", [1, 2, 16])
def test_cuda_graph_step_equals_the_eager_step_bitwise(batch):
    """The decode step replayed from its CUDA graph, where our kernels overlap through programmatic
    dependent launch, gives the eager step's logits bit for bit, replay after replay. Reading the
    QKV row with read-only loads while the projection still wrote it made 11 of 12 replays differ
    (up to 0.7 in the logits)."""
    torch.manual_seed(0)
    model_cfg, _ = optimus.make_configs("base")
    model = optimus.Transformer(model_cfg).cuda().to(torch.bfloat16).eval()
    prompts = torch.randint(0, 50257, (batch, 64), device="cuda")
    lengths = torch.full((batch,), 40, device="cuda")
    tokens = torch.arange(batch, device="cuda") + 7
    logits = {}
    for graph in (True, False):
        decoder = optimus.Decoder(model, batch, use_graph=graph)
        decoder.prefill(prompts, lengths)
        logits[graph] = [decoder.step(tokens, lengths).clone() for _ in range(8)]
    assert all(torch.equal(x, logits[False][0]) for x in logits[True] + logits[False])
