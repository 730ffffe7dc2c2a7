"""decode_linear (a decoding step's projection with its RMSNorm, SwiGLU and residual folded in)
against its reference in optimus.py and against the model's own modules, CPU and CUDA."""
import zlib

import pytest
import torch

import optimus
from conftest import DEVICES, DTYPES

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
def test_one_row_decoding_through_decode_linear_equals_full_forward_passes(device, monkeypatch):
    """Batch 1 on the extension takes Transformer.step_logits' decode_linear path (six launches a
    block); its greedy tokens are those of full forward passes, and its logits those of the
    unfused cached path."""
    torch.manual_seed(11)
    model_cfg, _ = optimus.make_configs("tiny", impl="ext")
    model = optimus.Transformer(model_cfg).to(device).eval()
    calls = []
    real = optimus.decode_linear
    monkeypatch.setattr(optimus, "decode_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = torch.randint(0, 50257, (7,)).tolist()
    decoder = optimus.Decoder(model, 1, use_graph=False)
    fast = [int(t) for t in optimus.generate(model, [prompt], 20, temperature=0, eot_id=None, decoder=decoder)]
    assert len(calls) == 19 * (4 * model_cfg.depth + 1)  # 19 steps after the prefill: 4 per block + the head
    with torch.no_grad():
        for i, token in enumerate(fast):
            assert token == int(model(torch.tensor([prompt + fast[:i]], device=device))[0, -1].argmax()), i
        tokens, pos = torch.tensor([[fast[0]]], device=device), torch.tensor([[len(prompt)]], device=device)
        unfused = optimus.Decoder(model, 1, use_graph=False, fused_linear=False)
        for d in (decoder, unfused):
            d.prefill(torch.tensor([prompt], device=device), torch.tensor([len(prompt)], device=device))
        torch.testing.assert_close(model.step_logits(tokens, pos, decoder.caches),
                                   model.step_logits(tokens, pos, unfused.caches, fused_linear=False),
                                   rtol=1e-4, atol=1e-4)
