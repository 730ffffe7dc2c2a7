"""decode_linear (a decoding step's projection with its RMSNorm, SwiGLU and residual folded in)
against its reference in optimus.py and against the model's own modules, CPU and CUDA."""
import zlib

import pytest
import torch

import optimus
from conftest import DEVICES, DTYPES, requires_cuda

# Summation order differs from F.linear's: float32 to ~1e-5 relative; a 16-bit output may land
# one rounding step (an ulp: 2^-8 / 2^-11 relative) away, so those compare at about an ulp.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.fixture(autouse=True)
def extension_and_seed(request):
    optimus.load_extension()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def inputs(B, K, N, dtype, device, norm, residual, swiglu):
    x = torch.randn(B, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    nw = (1 + 0.1 * torch.randn(K, device=device)).to(dtype) if norm else None
    res = torch.randn(B, N // 2 if swiglu else N, device=device).to(dtype) if residual else None
    return x, w, nw, res


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,N", [(1, 64, 96), (3, 1024, 1536), (6, 24, 50), (1, 13, 7)])
@pytest.mark.parametrize("norm,residual,swiglu", [(False, False, False), (True, False, False), (False, True, False),
                                                  (True, False, True), (True, True, True)])
def test_matches_reference(device, dtype, B, K, N, norm, residual, swiglu):
    if swiglu and N % 2:
        N += 1
    x, w, nw, res = inputs(B, K, N, dtype, device, norm, residual, swiglu)
    out = torch.ops.optimus.decode_linear(x, w, nw, res, 1e-5, swiglu)
    expected = optimus.decode_linear_ref(x.double(), w.double(), None if nw is None else nw.double(),
                                         None if res is None else res.double(), 1e-5, swiglu)
    assert out.dtype == dtype and out.shape == expected.shape
    if dtype == torch.float32:  # float32 roundings are far below the tolerance: float64 math is the reference
        torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    # 16-bit: the reference in the same dtype makes the same roundings (the model's), so the two
    # differ by summation order alone: about an ulp of the output.
    torch.testing.assert_close(out, optimus.decode_linear_ref(x, w, nw, res, 1e-5, swiglu), **TOL[dtype])


# CUDA, 16-bit, several rows: the tensor-core kernel for K a multiple of 32 (N with a partial last
# tile of 8 features), the CUDA-core one for K = 1000; 40 rows are two launches (32 + 8).
MMA_SHAPES = [(1024, 1540), (2816, 1032), (1000, 520)]


@pytest.fixture
def full_precision_reference(monkeypatch):
    """cuBLAS may reduce split-K partial sums of 16-bit GEMMs in 16 bits (PyTorch allows it by
    default); the reference's F.linear then rounds more than once. Off here, it rounds once, as
    the op does, so the two differ by summation order alone."""
    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr(matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(matmul, "allow_fp16_reduced_precision_reduction", False)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [2, 3, 8, 16, 17, 32, 40])
@pytest.mark.parametrize("K,N", MMA_SHAPES)
@pytest.mark.parametrize("norm,residual,swiglu", [(False, False, False), (True, False, False), (False, True, False),
                                                  (True, False, True), (True, True, True)])
def test_cuda_several_rows_match_reference(dtype, B, K, N, norm, residual, swiglu, full_precision_reference):
    x, w, nw, res = inputs(B, K, N, dtype, "cuda", norm, residual, swiglu)
    out = torch.ops.optimus.decode_linear(x, w, nw, res, 1e-5, swiglu)
    assert out.shape == (B, N // 2 if swiglu else N)
    torch.testing.assert_close(out, optimus.decode_linear_ref(x, w, nw, res, 1e-5, swiglu), **TOL[dtype])
    # The split over warps reduces in a fixed order: a second call gives the same bits.
    assert torch.equal(out, torch.ops.optimus.decode_linear(x, w, nw, res, 1e-5, swiglu))


@requires_cuda
@pytest.mark.parametrize("offset", [0, 8, 1])
def test_cuda_strided_and_misaligned_rows(offset, full_precision_reference):
    """x as a view into wider rows: 16-byte aligned (offset 0, 8 elements) takes the tensor-core
    kernel, an odd offset (rows not 16-byte aligned) the CUDA-core one; both compute the op."""
    B, K, N = 16, 1024, 1536
    wide = torch.randn(B, K + 64, device="cuda").to(torch.bfloat16)
    x = wide[:, offset: offset + K]                            # (B, K), row stride K + 64
    w = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(K, device="cuda")).to(torch.bfloat16)
    out = torch.ops.optimus.decode_linear(x, w, nw, None, 1e-5, False)
    torch.testing.assert_close(out, optimus.decode_linear_ref(x, w, nw, None, 1e-5, False), **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_the_models_modules(device):
    """A view of the last position of (B, T, K) hidden states goes in without a copy, and the op
    computes what the model's RMSNorm, Linear and swiglu compute."""
    cfg = optimus.ModelConfig(vocab_size=100, dim=64, depth=1, num_heads=4, num_kv_heads=2, impl="ref")
    block = optimus.Block(cfg).to(device)
    h = torch.randn(3, 5, cfg.dim, device=device)[:, -1]      # (B, dim), row stride 5 * dim
    with torch.no_grad():
        mlp = block.mlp
        packed = torch.cat([mlp.gate.weight, mlp.up.weight])  # (2 * hidden, dim)
        y = torch.ops.optimus.decode_linear(h, packed, block.norm2.weight, None, cfg.norm_eps, True)
        n = block.norm2(h)
        torch.testing.assert_close(y, optimus.swiglu_ref(mlp.gate(n), mlp.up(n)), rtol=2e-5, atol=2e-5)
        out = torch.ops.optimus.decode_linear(y, mlp.down.weight, None, h, cfg.norm_eps, False)
        torch.testing.assert_close(out, h + mlp.down(y), rtol=2e-5, atol=2e-5)


def test_bad_arguments_are_named():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight has 6 columns"):
        torch.ops.optimus.decode_linear(x, torch.randn(4, 6), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="even number of weight rows"):
        torch.ops.optimus.decode_linear(x, torch.randn(5, 8), None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.optimus.decode_linear(x, w, None, torch.randn(2, 3), 1e-5, False)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.optimus.decode_linear(x, w.double(), None, None, 1e-5, False)


def test_opcheck():
    x, w, nw, res = inputs(2, 32, 48, torch.float32, "cpu", True, True, True)
    torch.library.opcheck(torch.ops.optimus.decode_linear.default, (x, w, nw, res, 1e-5, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,fused_linear", [(1, None), (16, True), (16, None)])
def test_decoding_through_decode_linear_equals_full_forward_passes(device, batch, fused_linear, monkeypatch):
    """Transformer.step_logits takes the decode_linear path (the first block's QKV and the head
    decode_linear, each block's other projections and the next block's QKV one decode_tail,
    Block.decode_row) at batch 1 by default and at batch 16 when forced (`fused_linear=True`), and the
    library path at batch 16 by default (while DECODE_LINEAR_MAX_ROWS is below 16); either way its
    greedy tokens are those of full forward passes, and its logits those of the unfused path."""
    torch.manual_seed(11)
    model_cfg, _ = optimus.make_configs("tiny", impl="ext")
    model = optimus.Transformer(model_cfg).to(device).eval()
    calls = []
    real = optimus.decode_linear
    monkeypatch.setattr(optimus, "decode_linear", lambda *a, **k: calls.append("linear") or real(*a, **k))
    real_tail = optimus.decode_tail
    monkeypatch.setattr(optimus, "decode_tail", lambda *a, **k: calls.append("tail") or real_tail(*a, **k))
    prompts = [torch.randint(0, 50257, (3 + i % 7,)).tolist() for i in range(batch)]
    decoder = optimus.Decoder(model, batch, use_graph=False, fused_linear=fused_linear)
    fast = torch.stack(list(optimus.generate(model, prompts, 20, temperature=0, eot_id=None, decoder=decoder)),
                       1).tolist()                                                        # (batch, 20)
    fused = fused_linear or (fused_linear is None and batch <= optimus.DECODE_LINEAR_MAX_ROWS)
    # 19 steps after the prefill: the first QKV and the head, and one decode_tail per block
    assert (calls.count("linear"), calls.count("tail")) == ((19 * 2, 19 * model_cfg.depth) if fused else (0, 0))
    with torch.no_grad():
        for prompt, row in zip(prompts, fast):
            for i, token in enumerate(row):
                assert token == int(model(torch.tensor([prompt + row[:i]], device=device))[0, -1].argmax()), i
        tokens = torch.tensor([[row[0]] for row in fast], device=device)                  # (batch, 1)
        pos = torch.tensor([[len(p)] for p in prompts], device=device)                    # (batch, 1)
        padded = torch.tensor([p + [0] * (9 - len(p)) for p in prompts], device=device)   # (batch, 9)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        unfused = optimus.Decoder(model, batch, use_graph=False, fused_linear=False)
        for d in (decoder, unfused):
            d.prefill(padded, lengths)
        torch.testing.assert_close(model.step_logits(tokens, pos, decoder.caches, fused_linear),
                                   model.step_logits(tokens, pos, unfused.caches, fused_linear=False),
                                   rtol=1e-4, atol=1e-4)


BF16_TIE = 0.05  # logits this close in a bf16 full pass may order either way on the fast path


@requires_cuda
def test_cuda_bf16_batch16_decode_row_greedy_equals_full_forward_passes():
    """The default model in bf16 at batch 16 through the forced decode_row path (CUDA graph,
    decode_linear's tensor-core kernel, programmatic dependent launch): each row's first 32 greedy
    tokens are the argmax of a full forward pass over the same prefix. The paths round bf16
    differently, so where the full pass's best logit beats the fast path's token by at most
    BF16_TIE either is right; three steps in four must agree exactly."""
    torch.manual_seed(0)
    model_cfg, _ = optimus.make_configs("base")
    model = optimus.Transformer(model_cfg).cuda().to(torch.bfloat16).eval()
    prompts = torch.randint(0, 50257, (16, 16))
    decoder = optimus.Decoder(model, 16, fused_linear=True)
    assert decoder.graph is not None
    fast = torch.stack(list(optimus.generate(model, prompts.tolist(), 32, temperature=0, eot_id=None,
                                             decoder=decoder)), 1).cpu()                 # (16, 32)
    equal = 0
    with torch.no_grad():
        for i in range(32):  # every row's prefix has the same length: one batched full pass a step
            logits = model(torch.cat([prompts, fast[:, :i]], 1).cuda())[:, -1].float()  # (16, V)
            best = logits.argmax(-1)
            token = fast[:, i].cuda()
            equal += int((best == token).sum())
            gap = logits.gather(1, best[:, None]) - logits.gather(1, token[:, None])
            assert bool((gap <= BF16_TIE).all()), (i, best.tolist(), token.tolist())
    assert equal >= 16 * 32 * 3 // 4, f"only {equal} of {16 * 32} tokens agree exactly"
