"""adamw_step (the trainer's clip + AdamW in place) against torch.nn.utils.clip_grad_norm_ followed
by torch.optim.AdamW, and its reference in optimus.py against the same."""
import zlib

import pytest
import torch

import optimus
from conftest import DEVICES, requires_cuda

# Float32 elementwise math in another order than torch's single-tensor AdamW (p * (1 - lr wd)
# against p - lr wd p, the bias corrections in float64): an ulp or two a step, over a few steps.
TOL = dict(rtol=1e-5, atol=1e-7)
BETAS, EPS = (0.9, 0.95), 1e-8
# Odd sizes (not multiples of the CUDA kernel's 4-float vectors), a scalar, a longer tensor.
SHAPES = [(37, 5), (1,), (3, 7, 11), (1024,), (64, 33)]


@pytest.fixture(autouse=True)
def extension_and_seed(request):
    optimus.load_extension()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make(device, shapes=SHAPES, misaligned=False):
    """Parameters and per-step gradients; with `misaligned`, one parameter starts 4 bytes into
    its storage (contiguous but not 16-byte aligned: the CUDA kernel's element-wise path)."""
    params = [torch.randn(s, device=device) for s in shapes]
    if misaligned:
        params.append(torch.randn(1001, device=device)[1:])
    return params


def torch_steps(params, grads_per_step, lr, decays, max_norm):
    """The independent reference: clip_grad_norm_ then torch.optim.AdamW (single-tensor), per step."""
    ps = [p.detach().clone().requires_grad_() for p in params]
    groups = {}
    for p, wd in zip(ps, decays):
        groups.setdefault(wd, []).append(p)
    opt = torch.optim.AdamW([{"params": g, "weight_decay": wd} for wd, g in groups.items()], lr=lr, betas=BETAS,
                            eps=EPS, foreach=False)
    norms = []
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if max_norm > 0:
            norms.append(torch.nn.utils.clip_grad_norm_(ps, max_norm))
        else:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in ps]))
        opt.step()
    return [p.detach() for p in ps], norms


def our_steps(params, grads_per_step, lr, decays, max_norm, impl):
    ps = [p.clone() for p in params]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros((), device=p.device) for p in ps]
    lr_t = torch.tensor(lr, device=params[0].device)
    norms = [optimus.adamw_step(ps, grads, ms, vs, steps, lr_t, decays, *BETAS, EPS, max_norm, impl=impl)
             for grads in grads_per_step]
    return ps, norms, steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0], ids=["clipping", "not_clipping", "off"])
def test_matches_clip_grad_norm_then_adamw(device, impl, max_norm):
    params = make(device, misaligned=True)
    decays = [0.1 if p.dim() >= 2 else 0.0 for p in params]
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(5)]
    kept = [[g.clone() for g in grads] for grads in grads_per_step]
    want, want_norms = torch_steps(params, grads_per_step, 3e-2, decays, max_norm)
    got, norms, steps = our_steps(params, grads_per_step, 3e-2, decays, max_norm, impl)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(norms, want_norms):
        assert a.shape == () and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert all(float(s) == 5 for s in steps)
    assert all(torch.equal(g, k) for grads, ks in zip(grads_per_step, kept) for g, k in zip(grads, ks))
    moved = max(float((a - p).abs().max()) for a, p in zip(got, params))
    assert moved > 1e-3  # the step did something (lr 3e-2, 5 steps)


@pytest.mark.parametrize("device", DEVICES)
def test_the_clip_changes_the_result(device):
    """The same gradients with and without the clip end apart (so the clip is really applied).
    Adam is blind to one scale for every step; the clip scales the large steps only."""
    params = make(device)
    decays = [0.0] * len(params)
    grads = [[torch.randn_like(p) * scale for p in params] for scale in (10, 0.01, 10)]
    clipped = our_steps(params, grads, 1e-2, decays, 0.1, "ext")[0]
    free = our_steps(params, grads, 1e-2, decays, 0.0, "ext")[0]
    assert max(float((a - b).abs().max()) for a, b in zip(clipped, free)) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors(device):
    """More tensors than one CUDA launch's table holds (48): several groups, one norm."""
    params = make(device, shapes=[(n % 13 + 1, 3) for n in range(101)])
    decays = [0.01 * (i % 2) for i in range(len(params))]
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(3)]
    want, want_norms = torch_steps(params, grads_per_step, 1e-2, decays, 2.0)
    got, norms, _ = our_steps(params, grads_per_step, 1e-2, decays, 2.0, "ext")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(norms[-1], want_norms[-1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_nonfinite_gradient_poisons_the_step_as_clip_grad_norm_does(device):
    params = make(device, shapes=[(5,), (7,)])
    grads = [[torch.randn_like(p) for p in params]]
    grads[0][1][3] = float("nan")
    got, norms, _ = our_steps(params, grads, 1e-2, [0.0, 0.0], 1.0, "ext")
    want, _ = torch_steps(params, grads, 1e-2, [0.0, 0.0], 1.0)
    assert torch.isnan(norms[0])
    for a, b in zip(got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and bool(torch.isnan(a).all())


@pytest.mark.parametrize("device", DEVICES)
def test_no_tensors(device):
    lr = torch.tensor(1e-3, device=device)
    norm = torch.ops.optimus.adamw_step([], [], [], [], [], lr, [], 0.9, 0.95, 1e-8, 1.0)
    assert float(norm) == 0.0


def test_cpu_result_does_not_depend_on_the_thread_count():
    """Resume's exactness on a CPU: the norm's partial sums are fixed chunks, not per thread."""
    params = make("cpu", shapes=[(300_000,), (70_001,)])
    grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(our_steps(params, grads, 1e-2, [0.1, 0.0], 1.0, "ext"))
    finally:
        torch.set_num_threads(threads)
    (a, na, _), (b, nb, _) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(na, nb))


@requires_cuda
def test_cuda_step_replays_from_a_graph():
    """Captured once, replayed: the same bits as the eager calls (lr and the step counters live on
    the device, so each replay is the next step)."""
    params = make("cuda", misaligned=True)
    decays = [0.1] * len(params)
    grads = [torch.randn_like(p) for p in params]
    eager, _, _ = our_steps(params, [grads] * 4, 1e-2, decays, 0.5, "ext")
    ps = [p.clone() for p in params]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros((), device="cuda") for _ in ps]
    lr = torch.tensor(1e-2, device="cuda")
    args = (ps, grads, ms, vs, steps, lr, decays, *BETAS, EPS, 0.5)
    torch.ops.optimus.adamw_step(*args)  # step 1, eager (loads the kernels before the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.optimus.adamw_step(*args)
    for _ in range(3):  # steps 2-4
        graph.replay()
    torch.cuda.synchronize()
    assert all(float(s) == 4 for s in steps)
    assert all(torch.equal(a, b) for a, b in zip(ps, eager))


def test_bad_arguments_are_named():
    p, g = torch.randn(4, 3), torch.randn(4, 3)
    m, v, s, lr = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(()), torch.tensor(1e-3)
    op = torch.ops.optimus.adamw_step
    with pytest.raises(RuntimeError, match="must have one length"):
        op([p], [g, g], [m], [v], [s], lr, [0.0], 0.9, 0.95, 1e-8, 1.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \(3, 4\) but params\[0\] has \(4, 3\)"):
        op([p], [g.t().contiguous()], [m], [v], [s], lr, [0.0], 0.9, 0.95, 1e-8, 1.0)
    with pytest.raises(RuntimeError, match=r"params\[0\] is BFloat16; this step takes float32"):
        op([p.bfloat16()], [g], [m], [v], [s], lr, [0.0], 0.9, 0.95, 1e-8, 1.0)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] is not contiguous"):
        op([p], [g], [torch.zeros(3, 4).t()], [v], [s], lr, [0.0], 0.9, 0.95, 1e-8, 1.0)
    with pytest.raises(RuntimeError, match="lr must be a float32 scalar tensor"):
        op([p], [g], [m], [v], [s], lr.double(), [0.0], 0.9, 0.95, 1e-8, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    params = make(device, shapes=[(5, 3), (7,)])
    args = (params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros((), device=device) for _ in params],
            torch.tensor(1e-3, device=device), [0.1, 0.0], 0.9, 0.95, 1e-8, 1.0)
    torch.library.opcheck(torch.ops.optimus.adamw_step, args)
