"""The model against an independent, plain float64 implementation of the same math."""
import collections
import contextlib
import gc
import math
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import optimus
from conftest import DEVICES, ROOT


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model_cfg, _ = optimus.make_configs("tiny", impl="ref", **overrides)
    model = optimus.Transformer(model_cfg)
    with torch.no_grad():  # norm gains of 1 would hide a missing multiply
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def plain_reference(model, tokens):
    """Same math written the long way: explicit rotary, explicit kv repeat, explicit causal mask."""
    cfg = model.cfg
    W = {k: v.detach().double() for k, v in model.state_dict().items()}
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T = tokens.shape

    def rmsnorm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rotary(x):  # x: (B, T, n, hd); pair (i, i + hd/2) turned by pos * theta^(-2i/hd)
        out = torch.empty_like(x)
        for t in range(T):
            for i in range(hd // 2):
                angle = t * cfg.rope_theta ** (-2 * i / hd)
                a, b = x[:, t, :, i], x[:, t, :, i + hd // 2]
                out[:, t, :, i] = a * math.cos(angle) - b * math.sin(angle)
                out[:, t, :, i + hd // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    x = W["tok_emb.weight"][tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(cfg.depth):
        p = f"blocks.{layer}."
        h = rmsnorm(x, W[p + "norm1.weight"])
        q = rotary((h @ W[p + "attn.wq.weight"].T).view(B, T, H, hd))
        k = rotary((h @ W[p + "attn.wk.weight"].T).view(B, T, KV, hd))
        v = (h @ W[p + "attn.wv.weight"].T).view(B, T, KV, hd)
        heads = []
        for head in range(H):
            kv = head // (H // KV)
            scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, :, kv])                  # (B, T, hd)
        x = x + torch.cat(heads, -1) @ W[p + "attn.wo.weight"].T
        h = rmsnorm(x, W[p + "norm2.weight"])
        gate, up = h @ W[p + "mlp.gate.weight"].T, h @ W[p + "mlp.up.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ W[p + "mlp.down.weight"].T
    x = rmsnorm(x, W["norm.weight"])
    return (x @ W["tok_emb.weight"].T)[..., : cfg.vocab_size]


def test_default_config_has_141_7m_parameters():
    with torch.device("meta"):
        model = optimus.Transformer(optimus.ModelConfig())
    assert model.cfg.hidden_dim == 2816
    assert abs(model.num_params() - 141.7e6) < 0.5e6


@pytest.mark.parametrize("shape", [(2, 17), (1, 64)])
def test_logits_match_plain_reference(shape):
    model = tiny_model()
    tokens = torch.randint(0, model.cfg.vocab_size, shape)
    with torch.no_grad():
        ours = model(tokens)
    ref = plain_reference(model, tokens)
    assert ours.shape == (*shape, model.cfg.vocab_size)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_untied_head_matches_reference_math():
    model = tiny_model(tie_embeddings=False)
    assert model.head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        h = model.hidden(tokens)
        expected = (h.double() @ model.head.weight.double().T)[..., : model.cfg.vocab_size]
        torch.testing.assert_close(model(tokens).double(), expected, rtol=1e-5, atol=1e-5)


def test_full_heads_equal_standard_multihead_attention():
    """num_kv_heads == num_heads, rotary off: the attention is torch's nn.MultiheadAttention."""
    torch.manual_seed(1)
    cfg, _ = optimus.make_configs("tiny", num_kv_heads=4, impl="ref")
    attn = optimus.Attention(cfg)
    B, T = 3, 11
    x = torch.randn(B, T, cfg.dim)
    cos, sin = torch.ones(T, cfg.head_dim // 2), torch.zeros(T, cfg.head_dim // 2)
    mha = torch.nn.MultiheadAttention(cfg.dim, cfg.num_heads, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        mha.out_proj.weight.copy_(attn.wo.weight)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = masked
        expected, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
        torch.testing.assert_close(attn(x, cos, sin, "ref"), expected, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_distance():
    cfg, _ = optimus.make_configs("tiny")
    cos, sin = optimus.rope_tables(cfg)
    torch.manual_seed(2)
    q, k = torch.randn(cfg.head_dim, dtype=torch.float64), torch.randn(cfg.head_dim, dtype=torch.float64)

    def score(m, n):
        qm = optimus.rotate_half_ref(q, cos[m].double(), sin[m].double())
        kn = optimus.rotate_half_ref(k, cos[n].double(), sin[n].double())
        return float(qm @ kn)

    for distance in (0, 1, 5, 40):
        scores = [score(m + distance, m) for m in (0, 3, 17, 60)]
        assert max(scores) - min(scores) < 1e-4 * (1 + abs(scores[0]))
    # ...and the score does change with the distance (the test above is not vacuous).
    assert abs(score(5, 0) - score(1, 0)) > 1e-3


CHECKPOINTING = [(False, "full"), (True, "full"), (True, "selective")]  # (checkpointing, checkpoint_policy)


def loss_and_grads(checkpointing, policy, modes=(), device="cpu"):
    """The tiny model's loss and gradients on fixed tokens (on CUDA under the trainer's autocast);
    each of `modes` (a TorchDispatchMode per phase: forward, backward) sees that phase's ops."""
    model = tiny_model(seed=3, checkpointing=checkpointing, checkpoint_policy=policy).to(device).train()
    torch.manual_seed(4)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33), device=device)
    forward, backward = (*modes, contextlib.nullcontext(), contextlib.nullcontext())[:2]
    with forward, optimus.resolve_runtime(device).autocast():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    with backward:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing, policy", CHECKPOINTING[1:])
def test_gradient_checkpointing_gives_same_loss_and_grads(checkpointing, policy):
    loss_a, grads_a = loss_and_grads(False, "full")
    loss_b, grads_b = loss_and_grads(checkpointing, policy)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7)


def op_counts(names) -> collections.Counter:
    """Each op name's count, plus "attention" for the forward ops of SDPA's backends (which one
    runs depends on the device and dtype: flash, cuDNN, efficient, the CPU's)."""
    counts = collections.Counter(names)
    counts["attention"] = sum(n for name, n in counts.items() if name.startswith("_scaled_dot_product")
                              and "backward" not in name)
    return counts


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher, by name ("mm", "rsqrt", ...)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_selective_checkpointing_recomputes_only_the_pointwise_ops(device):
    """The backward's ops against the backward without checkpointing: full checkpointing runs a
    block's matmuls and its attention again (6 of its 7 matmuls: the recompute stops once it has
    what the backward needs, and the down projection's output only feeds the residual add),
    selective only norms, rotary, SwiGLU and adds (an op whose output it keeps is taken from the
    forward, never run again)."""
    backward = {}
    for checkpointing, policy in CHECKPOINTING:
        counter = OpCounter()
        loss_and_grads(checkpointing, policy, modes=(contextlib.nullcontext(), counter), device=device)
        backward[policy if checkpointing else "off"] = op_counts(counter.names)
    depth = optimus.make_configs("tiny")[0].depth
    full, selective = backward["full"] - backward["off"], backward["selective"] - backward["off"]
    assert full["mm"] == 6 * depth and full["attention"] == depth  # the test can see a recompute
    assert selective["mm"] == selective["bmm"] == selective["addmm"] == selective["attention"] == 0
    assert backward["selective"]["mm"] == backward["off"]["mm"] > 0
    # What it does recompute: both norms (rsqrt), rotary (its cat of halves) and SwiGLU's silu (sigmoid).
    assert selective["rsqrt"] == 2 * depth and selective["sigmoid"] == depth and selective["cat"] >= 2 * depth
    assert set(selective) <= POINTWISE_OPS, set(selective) - POINTWISE_OPS


# Ops a block's recompute may run besides its norms, rotary and SwiGLU: views, casts, elementwise math.
POINTWISE_OPS = {"add", "mul", "sub", "neg", "rsqrt", "pow", "mean", "sigmoid", "cat", "slice", "view",
                 "_unsafe_view", "unsqueeze", "transpose", "t", "split", "detach", "_to_copy", "promote_types",
                 "expand", "clone"}


class KeptBytes(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns: after the forward, the bytes
    still alive are what autograd and checkpointing keep for the backward."""

    def __init__(self):
        super().__init__()
        self.storages = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.storages.append((weakref.ref(t.untyped_storage()), t.untyped_storage().nbytes()))
        return out

    def alive(self, exclude) -> int:
        gc.collect()
        alive = {id(s): n for s, n in ((ref(), n) for ref, n in self.storages) if s is not None}
        return sum(n for key, n in alive.items() if key not in exclude)


def test_selective_checkpointing_keeps_less_than_no_checkpointing():
    kept = {}
    for checkpointing, policy in CHECKPOINTING:
        model = tiny_model(seed=3, checkpointing=checkpointing, checkpoint_policy=policy).train()
        tokens = torch.randint(0, model.cfg.vocab_size, (4, 65))
        weights = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
        census = KeptBytes()
        with census:  # the blocks' activations: the hidden states, not the loss over 50,257 logits
            loss = model.hidden(tokens).square().mean()
        kept[policy if checkpointing else "off"] = census.alive(weights)
        loss.backward()  # the graph was complete: the kept tensors were the ones it needed
    # Here selective keeps about half of what no checkpointing does (the matmul and attention
    # outputs, where autograd alone also keeps the norms', rotary's and SwiGLU's inputs and casts).
    assert kept["full"] < kept["selective"] < 0.6 * kept["off"], kept


def test_selective_checkpointing_compiles_and_its_backward_runs_no_matmul_again():
    """Under torch.compile the partitioner decides what the backward recomputes, from the policy's
    tags. Inductor's own partitioner (min-cut) over AOT autograd's graphs, left uncompiled (Inductor's
    code generation adds nothing to what is saved): the same loss and gradients as eager without
    checkpointing, and a backward graph with no more matmuls than that one's and no attention forward.
    Full checkpointing is the control: its backward graph runs the matmuls again. Whether it also
    runs the attention forward again is the partitioner's choice, which changed between torch
    versions (2.14 recomputes it, 2.13 keeps its output), so that is counted eagerly only
    (test_selective_checkpointing_recomputes_only_the_pointwise_ops)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    eager_loss, eager_grads = loss_and_grads(False, "full")
    backward = {}
    for checkpointing, policy in CHECKPOINTING:
        graphs = []

        def keep_backward(gm, inputs):
            graphs.append(op_counts(n.target.overloadpacket.__name__ for n in gm.graph.nodes
                                    if n.op == "call_function" and hasattr(n.target, "overloadpacket")))
            return make_boxed_func(gm.forward)

        backend = aot_autograd(fw_compiler=lambda gm, inputs: make_boxed_func(gm.forward), bw_compiler=keep_backward,
                               partition_fn=min_cut_rematerialization_partition)
        torch._dynamo.reset()
        model = tiny_model(seed=3, checkpointing=checkpointing, checkpoint_policy=policy).train()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        torch.manual_seed(4)
        tokens = torch.randint(0, model.cfg.vocab_size, (2, 33))
        loss = F.cross_entropy(compiled(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.testing.assert_close(loss.detach(), eager_loss, rtol=1e-6, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-5, atol=1e-6)
        backward[policy if checkpointing else "off"] = sum(graphs, collections.Counter())
    torch._dynamo.reset()
    assert backward["full"]["mm"] > backward["off"]["mm"]
    assert backward["selective"]["mm"] == backward["off"]["mm"] and backward["selective"]["attention"] == 0


def test_a_bad_checkpoint_policy_is_one_clear_error():
    with pytest.raises(optimus.UserError, match="checkpoint_policy must be full or selective, got 'some'"):
        optimus.make_configs("tiny", checkpoint_policy="some")
    result = run_cli("train", "--checkpoint_policy", "blocks")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: invalid model config: checkpoint_policy must be full or selective, got 'blocks'")


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "optimus.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["train", "--no_such_field", "3"], "--no_such_field"),
    (["train", "--dim", "wide"], "--dim expects an integer"),
    (["train", "--checkpointing=maybe"], "--checkpointing expects true/false"),
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--lerning_rate", "3e-4"], "unknown flag --lerning_rate: did you mean --learning_rate?"),
    (["train", "--dim"], "--dim: expected one argument"),        # argparse's own errors: one line too
    (["train", "extra"], "unexpected argument 'extra'"),
    (["sample", "--temprature", "0"], "did you mean --temperature?"),
    (["sample", "--prompt"], "--prompt: expected one argument"),
    (["export", "--fource"], "did you mean --force?"),
    (["trian"], "did you mean train?"),
])
def test_cli_rejects_bad_flags_in_one_line(args, needle):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_main_returns_the_exit_code_of_errors_and_help(capsys):
    assert optimus.main(["train", "--no_such_field", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert optimus.main(["sample", "--help"]) == 0
    assert "--max_new_tokens" in capsys.readouterr().out


def test_help_lists_commands_and_each_command_its_own_flags():
    top = run_cli("--help")
    assert top.returncode == 0
    for name in ("train", "sample", "export"):
        assert name in top.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0 and train.stdout.startswith("usage: optimus.py train")
    for cls in (optimus.ModelConfig, optimus.TrainingConfig):
        for f in optimus.dataclasses.fields(cls):
            assert f"--{f.name} " in train.stdout
    # What a preset sets is written in train's help: every override of `tiny`.
    tiny_line = next(line for line in train.stdout.splitlines() if line.strip().startswith("tiny "))
    for key, value in optimus.PRESETS["tiny"].items():
        assert f"{key}={value}" in tiny_line
    for command, flags in (("sample", optimus.SAMPLE_FLAGS), ("export", optimus.EXPORT_FLAGS)):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: optimus.py {command}")
        assert all(f"--{name} " in result.stdout for name in flags)
        assert "--dim " not in result.stdout  # its own flags, not train's


def test_flag_forms():
    types = optimus.config_flag_types()
    parsed = optimus.parse_flags(["--dim=96", "--checkpointing", "--resume", "0", "--learning_rate", "3e-4"], types)
    assert parsed == {"dim": 96, "checkpointing": True, "resume": False, "learning_rate": 3e-4}
    model_cfg, train_cfg = optimus.make_configs("tiny", **parsed)
    assert model_cfg.dim == 96 and model_cfg.hidden_dim == 256 and train_cfg.learning_rate == 3e-4
    for text, value in (("true", True), ("1", True), ("yes", True), ("YES", True), ("false", False), ("0", False),
                        ("no", False)):
        assert optimus.parse_flags([f"--resume={text}"], types) == {"resume": value}
        assert optimus.parse_flags(["--resume", text, "--dim", "8"], types) == {"resume": value, "dim": 8}
    assert optimus.parse_flags(["--resume", "--dim", "8", "--tie_embeddings"], types) == {
        "resume": True, "dim": 8, "tie_embeddings": True}  # bare booleans, before a flag and at the end
    assert optimus.parse_flags(["--learning_rate", "-1e-3"], types) == {"learning_rate": -1e-3}  # a negative value


def test_auto_kernels_are_references_for_training_only():
    model = tiny_model()
    model.cfg.impl = "auto"
    cpu = torch.device("cpu")
    assert model.kernels(cpu, training=True) == "ref"
    assert model.kernels(cpu, training=False) == optimus.resolve_impl("auto", cpu)
    model.cfg.impl = "ext"
    if optimus.extension_status()[0]:
        assert model.kernels(cpu, training=True) == "ext"
