"""decode_tail (a decoding step's projections after the attention, and the next block's QKV)
against its reference in optimus.py and, on CUDA, against the decode_linear launches it fuses."""
import zlib

import pytest
import torch

import optimus
from conftest import DEVICES, DTYPES, requires_cuda

# Each step as in test_decode_linear (summation order alone, about an ulp of 16-bit outputs), with
# room for an ulp carried from one step into the next.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}
# (B, A, D, Hd, Nq): attention width, model width, hidden width, next QKV rows
SHAPES = [(1, 64, 64, 96, 96), (3, 40, 24, 50, 40), (1, 13, 7, 11, 9), (2, 1024, 1024, 2816, 1536)]


@pytest.fixture(autouse=True)
def extension_and_seed(request):
    optimus.load_extension()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def inputs(B, A, D, Hd, Nq, dtype, device, following=True):
    def w(n, k):
        return (torch.randn(n, k, device=device) / k**0.5).to(dtype)

    def gain(n):
        return (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    y, x = torch.randn(B, A, device=device).to(dtype), torch.randn(B, D, device=device).to(dtype)
    nxt = (gain(D), w(Nq, D)) if following else (None, None)
    return (y, x, w(D, A), gain(D), w(2 * Hd, D), w(D, Hd), *nxt, 1e-5, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("following", [True, False], ids=["next_block", "last_block"])
def test_matches_reference(device, dtype, shape, following):
    args = inputs(*shape, dtype, device, following)
    out, qkv = torch.ops.optimus.decode_tail(*args)
    B, Nq = shape[0], shape[4] if following else 0
    assert out.shape == args[1].shape and qkv.shape == (B, Nq) and out.dtype == qkv.dtype == dtype
    want_out, want_qkv = optimus.decode_tail_ref(*args)
    if dtype == torch.float32:  # float64 math is the reference for float32's roundings
        wide = [None if a is None or isinstance(a, float) else a.double() for a in args[:8]]
        ref64 = optimus.decode_tail_ref(*wide, *args[8:])
        torch.testing.assert_close(out.double(), ref64[0], **TOL[dtype])
        torch.testing.assert_close(qkv.double(), ref64[1], **TOL[dtype])
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    torch.testing.assert_close(qkv, want_qkv, **TOL[dtype])


def test_bad_arguments_are_named():
    y, x, wo, n2, wgu, wd, nn, nq, eps, neps = inputs(1, 16, 8, 12, 20, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="next_norm and next_wqkv together"):
        torch.ops.optimus.decode_tail(y, x, wo, n2, wgu, wd, nn, None, eps, neps)
    with pytest.raises(RuntimeError, match=r"wo must be \(8, 16\), got \(8, 15\)"):
        torch.ops.optimus.decode_tail(y, x, wo[:, :15], n2, wgu, wd, nn, nq, eps, neps)
    with pytest.raises(RuntimeError, match=r"wdown must be \(8, 12\)"):
        torch.ops.optimus.decode_tail(y, x, wo, n2, wgu, wd[:, :10], nn, nq, eps, neps)
    with pytest.raises(RuntimeError, match=r"wgu must be \[gate; up\]"):
        torch.ops.optimus.decode_tail(y, x, wo, n2, wgu[:23], wd, nn, nq, eps, neps)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.optimus.decode_tail(y, x, wo, n2.double(), wgu, wd, nn, nq, eps, neps)
    with pytest.raises(RuntimeError, match="same B"):
        torch.ops.optimus.decode_tail(y[:0], x, wo, n2, wgu, wd, nn, nq, eps, neps)


def test_opcheck():
    torch.library.opcheck(torch.ops.optimus.decode_tail.default, inputs(2, 16, 8, 12, 20, torch.float32, "cpu"))


def cuda_kernels(fn) -> set[str]:
    """The names of the CUDA kernels fn launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


# One row: the default model's shapes, odd ones of whole 16-byte packs, and shapes the fused
# kernel does not take (K not a whole number of packs: the decode_linear launches).
CUDA_SHAPES = [((1, 1024, 1024, 2816, 1536), True), ((1, 136, 200, 344, 264), True), ((1, 40, 24, 56, 40), True),
               ((1, 13, 7, 11, 9), False)]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,fused", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("following", [True, False], ids=["next_block", "last_block"])
def test_cuda_one_row_equals_the_decode_linear_launches(dtype, shape, fused, following, monkeypatch):
    """With one row the fused kernel computes the bits of the decode_linear launches it replaces
    (OPTIMUS_DECODE_TAIL=0 forces those), and runs where the shapes allow (16-bit and float32
    rows of whole 16-byte packs)."""
    if dtype == torch.float32 and shape[3] == 2816:
        fused = False  # float32 slices of the default model (300 KB a block) exceed shared memory
    args = inputs(*shape, dtype, "cuda", following)
    names = cuda_kernels(lambda: torch.ops.optimus.decode_tail(*args))
    assert any("decode_tail_kernel" in n for n in names) == fused, names
    out, qkv = torch.ops.optimus.decode_tail(*args)
    monkeypatch.setenv("OPTIMUS_DECODE_TAIL", "0")
    assert not any("decode_tail_kernel" in n for n in cuda_kernels(lambda: torch.ops.optimus.decode_tail(*args)))
    want_out, want_qkv = torch.ops.optimus.decode_tail(*args)
    assert torch.equal(out, want_out) and torch.equal(qkv, want_qkv)
    torch.testing.assert_close(out, optimus.decode_tail_ref(*args)[0], **TOL[dtype])


@requires_cuda
def test_cuda_graph_replays_and_chains_are_exact():
    """Inside a CUDA graph (programmatic dependent launch between the kernels), a chain of
    decode_tail launches as the decoding step runs them (each one's output the next one's input,
    with the last block's form at the end) replays to the eager chain's bits, every replay."""
    dtype = torch.bfloat16
    layers = [inputs(1, 1024, 1024, 2816, 1536, dtype, "cuda", following=i < 3) for i in range(4)]
    x0 = torch.randn(1, 1024, device="cuda").to(dtype)

    def chain(x):
        outs = []
        for y, _, wo, n2, wgu, wd, nn, nq, eps, neps in layers:
            x, qkv = optimus.decode_tail(y, x, wo, n2, wgu, wd, nn, nq, eps, neps, "ext")
            outs += [x, qkv]
        return outs

    eager = chain(x0)
    static = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(static)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, eager))
