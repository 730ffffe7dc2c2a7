"""The sampler: the nucleus rule, determinism, the KV cache, batching, and the CLI."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_prep
import optimus
from conftest import DEVICES, ROOT, requires_cuda


def nucleus_reference(probs, top_p):
    """Allowed token ids: sort by probability, keep adding until the kept mass reaches top_p."""
    order = np.argsort(-probs, kind="stable")
    kept, mass = [], 0.0
    for i in order:
        kept.append(int(i))
        mass += probs[i]
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.9, 0), (0.7, 0.5, 0), (1.3, 1.0, 4),
                                                       (1.0, 0.8, 5), (1.0, 0.05, 0)])
def test_sample_next_follows_the_nucleus_rule(temperature, top_p, top_k):
    torch.manual_seed(0)
    logits = torch.randn(12, dtype=torch.float64) * 1.5
    probs = torch.softmax(logits / temperature, -1).numpy()
    allowed = set(range(12))
    if top_k:
        allowed = set(np.argsort(-probs)[:top_k].tolist())
    masked = np.where(np.isin(np.arange(12), list(allowed)), probs, 0.0)
    masked /= masked.sum()
    allowed = nucleus_reference(masked, top_p)
    expected = np.where(np.isin(np.arange(12), list(allowed)), masked, 0.0)
    expected /= expected.sum()

    n = 200_000
    generator = torch.Generator().manual_seed(1234)
    draws = optimus.sample_next(logits.float().expand(n, 12), temperature, top_p, top_k, generator)
    counts = np.bincount(draws.numpy(), minlength=12)
    assert set(np.nonzero(counts)[0].tolist()) <= allowed
    freq = counts / n
    bound = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-4  # 5 sigma: a wrong rule is far outside
    assert np.all(np.abs(freq - expected) <= bound), (freq, expected)


def test_greedy_is_argmax_and_seeds_reproduce():
    logits = torch.randn(6, 50)
    assert torch.equal(optimus.sample_next(logits, temperature=0), logits.argmax(-1))
    a = optimus.sample_next(logits, 1.0, 0.9, 0, torch.Generator().manual_seed(7))
    b = optimus.sample_next(logits, 1.0, 0.9, 0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, needle", [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                            ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k")])
def test_sampling_arguments_out_of_range(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        optimus.sample_next(torch.randn(1, 10), **kwargs)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model_cfg, _ = optimus.make_configs("tiny", impl="ref")
    return optimus.Transformer(model_cfg).eval()


def greedy_without_cache(model, prompt, n):
    """The reference: a full forward pass over the whole sequence for every new token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens], device=model.tok_emb.weight.device))[0, -1].argmax()))
    return tokens[len(prompt):]


def greedy_with_cache(model, prompts, n, **kwargs):
    steps = list(optimus.generate(model, prompts, n, temperature=0, eot_id=None, **kwargs))
    return torch.stack(steps, 1).tolist()  # (B, n)


def test_cached_generation_equals_full_forward_passes():
    model = tiny_model()
    prompt = torch.randint(0, 50257, (9,)).tolist()
    assert greedy_with_cache(model, [prompt], 30)[0] == greedy_without_cache(model, prompt, 30)


def test_warm_up_leaves_no_trace_in_the_next_answer():
    model = tiny_model(2)
    prompt = torch.randint(0, 50257, (6,)).tolist()
    decoder = optimus.Decoder(model, 1)
    seeded = lambda: torch.stack(list(optimus.generate(model, [prompt], 20, 0.8, 0.9, 0,
                                                       torch.Generator().manual_seed(1), decoder=decoder)))
    before = seeded()
    decoder.warm_up(0.8, 0.9, 0)  # what the CLI does on CUDA before the first answer
    assert greedy_with_cache(model, [prompt], 20, decoder=decoder)[0] == greedy_without_cache(model, prompt, 20)
    assert torch.equal(seeded(), before)  # its draws come from its own generator


def sampled_step_by_step(model, decoder, prompts, n, settings, generator, eot_id=optimus.EOT_ID):
    """generate()'s draws the way it made them before Decoder.sample_step: sample_next on each
    step's logits (decoder.step, no graph of the sampling), the rows that ended kept at eot_id."""
    lengths = torch.tensor([len(p) for p in prompts], device=model.tok_emb.weight.device)
    width = -(-max(map(len, prompts)) // optimus.PREFILL_BUCKET) * optimus.PREFILL_BUCKET
    padded = torch.full((len(prompts), width), eot_id or 0, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    logits = decoder.prefill(padded.to(lengths.device), lengths)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=lengths.device)
    out = []
    with torch.no_grad():
        for i in range(n):
            token = optimus.sample_next(logits, *settings, generator)
            if eot_id is not None:
                token = token.masked_fill(done, eot_id)
                done |= token == eot_id
            out.append(token)
            logits = decoder.step(token, lengths + i)
    return torch.stack(out, 1)                                                      # (B, n)


def generated(model, decoder, prompts, n, settings, generator, eot_id=optimus.EOT_ID):
    return torch.stack(list(optimus.generate(model, prompts, n, *settings, generator, eot_id, decoder=decoder)), 1)


@pytest.mark.parametrize("settings", [(0.8, 0.9, 0), (1.0, 1.0, 7), (0.0, 1.0, 0)], ids=["top-p", "top-k", "greedy"])
def test_sample_step_draws_what_sample_next_on_each_step_did(settings):
    """generate() samples through Decoder.sample_step (on CUDA one graph of step and sampling):
    same tokens, same draws from a seeded generator, as sample_next after every step."""
    model = tiny_model(4)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (5, 12)]
    fast = generated(model, optimus.Decoder(model, 2), prompts, 20, settings, torch.Generator().manual_seed(3))
    slow = sampled_step_by_step(model, optimus.Decoder(model, 2), prompts, 20, settings,
                                torch.Generator().manual_seed(3))
    assert torch.equal(fast, slow)
    if settings[0] > 0:  # the draws matter: another seed gives other tokens
        other = generated(model, optimus.Decoder(model, 2), prompts, 20, settings, torch.Generator().manual_seed(4))
        assert not torch.equal(other, fast)


@requires_cuda
def test_cuda_sample_step_graphs_draw_what_sample_next_on_eager_steps_did():
    """The default model in bf16 on CUDA: generate()'s graph of step + sampling (one per setting,
    captured at first use, its warm-up undone) gives the tokens of eager steps and sample_next with
    the same seeded generator; two settings on one decoder, each used twice. Top-p is left out: its
    boundary comes from float atomics, whose order varies."""
    torch.manual_seed(0)
    model_cfg, _ = optimus.make_configs("base")
    model = optimus.Transformer(model_cfg).cuda().to(torch.bfloat16).eval()
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (16, 40)]
    decoder, eager = optimus.Decoder(model, 2), optimus.Decoder(model, 2, use_graph=False)
    for settings in [(0.8, 1.0, 0), (1.0, 1.0, 50), (0.8, 1.0, 0), (0.0, 1.0, 0)]:
        fast = generated(model, decoder, prompts, 48, settings, torch.Generator("cuda").manual_seed(5))
        slow = sampled_step_by_step(model, eager, prompts, 48, settings, torch.Generator("cuda").manual_seed(5))
        assert torch.equal(fast, slow), settings
    assert len(decoder.sampling_graphs) == 3


def test_compiled_step_generates_what_the_full_forward_passes_do():
    model = tiny_model(3)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (4, 9)]
    decoder = optimus.Decoder(model, 2, compile=True)
    steps = torch.stack(list(optimus.generate(model, prompts, 12, temperature=0, eot_id=None, decoder=decoder)), 1)
    for prompt, row in zip(prompts, steps.tolist()):
        assert row == greedy_without_cache(model, prompt, 12)


@pytest.mark.parametrize("lands_after", [None, 0, 2, 9], ids=["never-early", "at-once", "2-steps", "9-steps"])
def test_read_behind_yields_each_step_once_landed_and_at_most_lag_late(monkeypatch, lands_after):
    """A fake device copy that lands `lands_after` steps after its own (None: only when waited
    for): read_behind yields it then, never more than `lag` steps late, and waits only for copies
    `lag` steps old (the host never waits on the newest step)."""
    lag, produced, waits = 4, [], []

    class FakeCopy:
        def __init__(self, item):
            self.item = item

        def ready(self):
            return lands_after is not None and len(produced) >= self.item + 1 + lands_after

        def wait(self):
            if not self.ready():  # a wait that blocks: how many steps were queued by then
                waits.append((self.item, len(produced)))
            return self.item
    monkeypatch.setattr(optimus, "HostCopy", FakeCopy)

    def source(n):
        for i in range(n):
            produced.append(i)
            yield i

    for n in (0, 3, 20):
        produced.clear()
        waits.clear()
        seen = []
        for item in optimus.read_behind(source(n), lag=lag):
            seen.append(item)
            late = lag if lands_after is None else min(lands_after, lag)
            assert len(produced) == min(n, item + 1 + late)
        assert seen == list(range(n))
        # Before the source ends, the host blocks on a copy only with `lag` newer steps queued behind it.
        assert all(queued == item + 1 + lag for item, queued in waits if queued < n)
        lands_late = lands_after is None or lands_after > lag
        assert any(queued < n for _, queued in waits) == (lands_late and n > lag + 1)


def test_read_behind_passes_host_tensors_through_at_once():
    steps = [torch.tensor([i, i + 1]) for i in range(5)]
    produced = []

    def source():
        for t in steps:
            produced.append(t)
            yield t
    for i, t in enumerate(optimus.read_behind(source(), lag=3)):
        assert t is steps[i] and len(produced) == i + 1  # nothing to wait for: no lag


@requires_cuda
def test_read_behind_brings_each_cuda_step_to_pinned_host_memory():
    steps = [torch.full((3,), i, device="cuda") * 2 for i in range(20)]
    got = list(optimus.read_behind(iter(steps), lag=4))
    assert [t.tolist() for t in got] == [[2 * i] * 3 for i in range(20)]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in got)


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    model = tiny_model(1)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (3, 17, 8)]
    batched = greedy_with_cache(model, prompts, 20)
    for prompt, row in zip(prompts, batched):
        assert row == greedy_with_cache(model, [prompt], 20)[0]


def test_generation_stops_each_sequence_at_end_of_text(monkeypatch):
    model = tiny_model(2)
    head, calls = model.logits, []

    def logits(h):  # call k makes token k: row 0 ends at its 2nd token, row 1 at its 5th
        out = head(h).clone()
        for row, ends_at in ((0, 1), (1, 4)):
            if len(calls) == ends_at:
                out[row, optimus.EOT_ID] = 1e4
        calls.append(1)
        return out
    monkeypatch.setattr(model, "logits", logits)
    steps = torch.stack(list(optimus.generate(model, [[1, 2, 3], [4, 5]], 50, temperature=0,
                                              stop_check_every=4)))          # (steps, B)
    # Both done after 5 tokens: the flags copied at the check after 8 are read at the one after 12.
    assert steps.shape == (12, 2)
    assert (steps[1:, 0] == optimus.EOT_ID).all() and steps[0, 0] != optimus.EOT_ID
    assert (steps[4:, 1] == optimus.EOT_ID).all() and (steps[:4, 1] != optimus.EOT_ID).all()


def test_too_long_prompt_keeps_its_newest_tokens():
    model = tiny_model()
    S = model.cfg.max_seq_len
    prompt = torch.randint(0, 50257, (S + 10,)).tolist()
    with pytest.warns(UserWarning, match="oldest tokens were dropped"):
        long = greedy_with_cache(model, [prompt], 8)[0]
    assert long == greedy_with_cache(model, [prompt[-(S - 8 + 1):]], 8)[0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(optimus.generate(model, [prompt], S))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model = tiny_model(3)
    optimus.save_checkpoint(path, model, optimus.TrainingConfig(), step=1, best_val_loss=1.0,
                            template=data_prep.DOLLY_TEMPLATE)
    return path


def run_sample(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "optimus.py"), "sample", "--impl", "ref", *args],
                          capture_output=True, text=True, timeout=300, input=stdin)


@pytest.mark.parametrize("compile_flag", [[], ["--compile"]], ids=["eager", "compiled"])
def test_cli_one_shot_answer_is_the_greedy_continuation(checkpoint, compile_flag):
    result = run_sample("--ckpt", str(checkpoint), "--prompt", "Name a colour.", "--temperature", "0",
                        "--max_new_tokens", "12", *compile_flag)
    assert result.returncode == 0, result.stderr
    enc = optimus.load_tokenizer()
    prompt = enc.encode_ordinary(data_prep.format_prompt(data_prep.DOLLY_TEMPLATE, "Name a colour."))
    expected = greedy_without_cache(optimus.load_checkpoint(checkpoint)[0], prompt, 12)
    if optimus.EOT_ID in expected:
        expected = expected[: expected.index(optimus.EOT_ID)]
    assert result.stdout == enc.decode(expected) + "\n"
    assert "tokens/s" in result.stderr


def test_cli_same_seed_same_text(checkpoint):
    runs = [run_sample("--ckpt", str(checkpoint), "--prompt", "hi", "--raw", "--seed", str(seed),
                       "--max_new_tokens", "15") for seed in (5, 5, 6)]
    assert all(r.returncode == 0 for r in runs)
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout


def test_cli_interactive_commands_from_stdin(checkpoint):
    result = run_sample("--ckpt", str(checkpoint), "--max_new_tokens", "5",
                        stdin="/temp 0\n/top_p 2\n/show\nhello\n/help\n/quit\nnever answered\n")
    assert result.returncode == 0, result.stderr
    assert "temperature = 0.0" in result.stdout and "not changed: top_p" in result.stdout
    assert "temperature=0.0" in result.stdout and "/quit" in result.stdout
    assert result.stderr.count("tokens/s") == 1


@pytest.mark.parametrize("args, needle", [(["--top_p", "1.5"], "top_p"), (["--temperature", "-1"], "temperature"),
                                          (["--max_new_tokens", "500"], "max_new_tokens"),
                                          (["--top_k", "x"], "--top_k expects an integer")])
def test_cli_rejects_bad_arguments_in_one_line(checkpoint, args, needle):
    result = run_sample("--ckpt", str(checkpoint), "--prompt", "hi", *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_cli_corrupt_truncated_and_missing_checkpoints(checkpoint, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    for path, needle in ((garbage, "corrupt"), (truncated, "corrupt"), (tmp_path / "none.pt", "does not exist"),
                         (tmp_path, "no checkpoint in")):
        result = run_sample("--ckpt", str(path), "--prompt", "hi")
        assert result.returncode != 0 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0] and str(path) in errors[0], result.stderr


@requires_cuda
@pytest.mark.parametrize("impl, compiled", [("ref", False), ("ext", False), ("ext", True)])
def test_cuda_graph_decoding_equals_full_forward_passes(impl, compiled):
    torch.manual_seed(4)
    model_cfg, _ = optimus.make_configs("tiny", impl=impl)
    model = optimus.Transformer(model_cfg).cuda().eval()
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (5, 12)]
    decoder = optimus.Decoder(model, 2, use_graph=True, compile=compiled)
    assert decoder.graph is not None
    decoder.warm_up(0.8, 0.9, 0)
    batched = torch.stack(list(optimus.generate(model, prompts, 24, temperature=0, eot_id=None,
                                                decoder=decoder)), 1).tolist()
    for prompt, row in zip(prompts, batched):
        assert row == greedy_without_cache(model, prompt, 24)
    # The same decoder serves a second request (the interactive prompt reuses it).
    again = torch.stack(list(optimus.generate(model, prompts[::-1], 24, temperature=0, eot_id=None,
                                              decoder=decoder)), 1).tolist()
    assert again == batched[::-1]


@requires_cuda
def test_cuda_sampling_is_seeded_and_on_device():
    logits = torch.randn(4, 1000, device="cuda")
    draws = [optimus.sample_next(logits, 0.8, 0.9, 0, torch.Generator("cuda").manual_seed(3)) for _ in range(2)]
    assert draws[0].device.type == "cuda" and torch.equal(draws[0], draws[1])


def test_default_answer_length_fits_the_model_and_explicit_ones_must(capsys):
    assert optimus.fit_max_new_tokens(None, 1024) == 256 and capsys.readouterr().err == ""
    assert optimus.fit_max_new_tokens(None, 128) == 64       # tiny: half the context stays for the prompt
    note = capsys.readouterr().err
    assert note.startswith("note:") and note.count("\n") == 1 and "--max_new_tokens" in note
    assert optimus.fit_max_new_tokens(127, 128) == 127
    for bad in (128, 0):
        with pytest.raises(optimus.UserError, match="between 1 and 127"):
            optimus.fit_max_new_tokens(bad, 128)


def test_sample_checks_its_arguments_before_loading_or_building(checkpoint, monkeypatch, capsys):
    def no_build(*args, **kwargs):
        raise AssertionError("the extension was built before the arguments were checked")
    monkeypatch.setattr(optimus, "resolve_impl", no_build)
    # Out of range for the model: known once the checkpoint's config is read, still before the build.
    assert optimus.main(["sample", "--ckpt", str(checkpoint), "--prompt", "hi", "--max_new_tokens", "128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max_new_tokens must be between 1 and 127" in err
    # Out of range for any model: before the checkpoint is even looked for.
    assert optimus.main(["sample", "--ckpt", "/no/such.pt", "--max_new_tokens", "0"]) == 2
    assert "--max_new_tokens must be at least 1" in capsys.readouterr().err


def test_offline_without_tiktoken_files_is_one_line(checkpoint, monkeypatch, capsys):
    import requests
    import tiktoken

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    for argv in (["sample", "--ckpt", str(checkpoint), "--prompt", "hi"],
                 ["export", "--ckpt", str(checkpoint), "--out", str(checkpoint.parent / "hf")]):
        assert optimus.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "set TIKTOKEN_CACHE_DIR" in err, err


def test_history_keeps_the_newest_whole_turns_that_fit():
    history = [[1] * 5, [2] * 3, [3] * 4]
    assert optimus.fit_history(history, [9] * 2, 100) == history
    assert optimus.fit_history(history, [9] * 2, 9) == [[2] * 3, [3] * 4]   # 2 + 4 + 3 fit, + 5 would not
    assert optimus.fit_history(history, [9] * 2, 8) == [[3] * 4]
    assert optimus.fit_history(history, [9] * 2, 5) == []
    assert optimus.fit_history(history, [9] * 20, 10) == []                # the new turn alone is too long
    assert optimus.fit_history([], [9], 10) == []


def test_chat_answers_continue_the_conversation_and_reset_forgets_it(checkpoint):
    import io
    model, ckpt = optimus.load_checkpoint(checkpoint)
    enc, template = optimus.load_tokenizer(), ckpt["template"]
    settings = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 10, "raw": False}
    decoder = optimus.Decoder(model, 1)
    turn = lambda text: enc.encode_ordinary(data_prep.format_prompt(data_prep.DOLLY_TEMPLATE, text))

    def expected(prompt):  # greedy tokens up to <|endoftext|>, by full forward passes
        out = greedy_without_cache(model, prompt, 10)
        return out[: out.index(optimus.EOT_ID)] if optimus.EOT_ID in out else out

    history = []
    optimus.answer(model, decoder, enc, "Name a colour.", settings, template, None, io.StringIO(), history)
    first = expected(turn("Name a colour."))
    assert history == [turn("Name a colour.") + first + [optimus.EOT_ID]]
    out = io.StringIO()
    optimus.answer(model, decoder, enc, "And another?", settings, template, None, out, history)
    second = expected(history[0] + turn("And another?"))
    assert out.getvalue() == enc.decode(second) + "\n" and len(history) == 2

    # A context too small for both turns keeps only the newest that fit.
    newest = turn("And another?") + second + [optimus.EOT_ID]
    assert history[1] == newest
    small = {**settings, "max_new_tokens": model.cfg.max_seq_len - len(newest) - len(turn("x"))}
    optimus.answer(model, decoder, enc, "x", small, template, None, io.StringIO(), history)
    assert len(history) == 2 and history[0] == newest and history[1][: len(turn("x"))] == turn("x")

    assert "forgotten" in optimus.repl_command("/reset", settings, model.cfg.max_seq_len, history)
    assert history == []


def test_answer_streams_the_seeded_tokens_and_stops_at_end_of_text(checkpoint, monkeypatch):
    import io
    model, _ = optimus.load_checkpoint(checkpoint)
    enc, decoder = optimus.load_tokenizer(), optimus.Decoder(model, 1)
    settings = {"temperature": 0.9, "top_p": 0.8, "top_k": 0, "max_new_tokens": 30, "raw": True}
    steps = optimus.generate(model, [enc.encode_ordinary("ROMEO:")], 30, 0.9, 0.8, 0,
                             torch.Generator().manual_seed(5), decoder=decoder)
    expected = [int(t) for t in steps]
    assert optimus.EOT_ID not in expected[:7]  # the model of this seed talks past the cut below
    expected = expected[: expected.index(optimus.EOT_ID)] if optimus.EOT_ID in expected else expected
    out = io.StringIO()
    count, seconds, first = optimus.answer(model, decoder, enc, "ROMEO:", settings, None,
                                           torch.Generator().manual_seed(5), out)
    assert out.getvalue() == enc.decode(expected) + "\n" and count == len(expected)
    assert 0 < first <= seconds

    head, calls = model.logits, []

    def logits(h):  # call k makes token k: the 7th token is <|endoftext|>
        out = head(h).clone()
        if len(calls) == 6:
            out[:, optimus.EOT_ID] = 1e4
        calls.append(1)
        return out
    monkeypatch.setattr(model, "logits", logits)
    out = io.StringIO()
    count, _, _ = optimus.answer(model, decoder, enc, "ROMEO:", settings, None, torch.Generator().manual_seed(5), out)
    assert count == 6 and out.getvalue() == enc.decode(expected[:6]) + "\n"


def test_cli_default_length_and_an_empty_prompt(checkpoint):
    """No --max_new_tokens on a 128-token model: 64 tokens and a note; an empty prompt starts from <|endoftext|>."""
    result = run_sample("--ckpt", str(checkpoint), "--prompt", "", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "note: answers stop at 64 tokens" in result.stderr
    expected = greedy_without_cache(optimus.load_checkpoint(checkpoint)[0], [optimus.EOT_ID], 64)
    if optimus.EOT_ID in expected:
        expected = expected[: expected.index(optimus.EOT_ID)]
    assert result.stdout == optimus.load_tokenizer().decode(expected) + "\n"


# ----------------------------------------------------------------------------- the sampling kernel

SAMPLER_DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def draw_frequencies(logits, n, temperature, top_p, top_k, impl, seed=1234):
    """Frequencies of n draws of sample_next from one row of logits (the row repeated n times)."""
    device = logits.device
    generator = torch.Generator(device).manual_seed(seed)
    draws = optimus.sample_next(logits.expand(n, -1), temperature, top_p, top_k, generator, impl=impl)
    return np.bincount(draws.cpu().numpy(), minlength=logits.shape[-1]) / n


def assert_frequencies_follow(freq, expected, n):
    """Support inside the expected one, each frequency within 5 sigma, and total variation within
    a bound far under what a wrong rule costs (moving one boundary token of these rows shifts
    0.03-0.3 of the mass; the bound is 0.01)."""
    assert np.all(freq[expected == 0] == 0), np.nonzero(freq * (expected == 0))
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-4), (freq, expected)
    assert 0.5 * np.abs(freq - expected).sum() < 0.01


SAMPLER_CASES = [(1.0, 0.9, 0), (0.7, 0.5, 0), (1.3, 1.0, 4), (1.0, 0.8, 5), (1.0, 0.05, 0), (2.0, 0.95, 7)]


@pytest.mark.parametrize("device", SAMPLER_DEVICES)
@pytest.mark.parametrize("temperature, top_p, top_k", SAMPLER_CASES)
def test_sampling_kernel_draws_from_logits_to_probs(device, temperature, top_p, top_k):
    optimus.load_extension()
    torch.manual_seed(5)
    logits = (torch.randn(1, 30) * 1.5).to(device)
    expected = optimus.logits_to_probs(logits.double(), temperature, top_p, top_k)[0].cpu().numpy()
    n = 200_000
    freq = draw_frequencies(logits, n, temperature, top_p, top_k, impl="ext")
    assert_frequencies_follow(freq, expected, n)


@pytest.mark.parametrize("device", SAMPLER_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [3.0, 0.02], ids=["peaked", "flat"])
def test_sampling_kernel_picks_the_reference_token_for_the_same_noise(device, dtype, scale):
    """With the same Exp(1) noise, the kernel and argmax(logits_to_probs / noise) agree on every
    row but those where a sum's rounding moves the nucleus boundary (none expected here)."""
    optimus.load_extension()
    B, V = 64, 50257
    logits = (torch.randn(B, V, device=device) * scale).to(dtype)
    for temperature, top_p, top_k in [(0.8, 0.9, 0), (1.0, 1.0, 50), (0.6, 0.7, 200), (1.0, 1.0, 0)]:
        race = torch.empty(B, V, device=device).exponential_(1)
        ours = torch.ops.optimus.sample(logits, race, temperature, top_k, top_p)
        ref = (optimus.logits_to_probs(logits, temperature, top_p, top_k) / race).argmax(-1)
        assert (ours == ref).float().mean() >= 0.97, (temperature, top_p, top_k)


@pytest.mark.parametrize("device", SAMPLER_DEVICES)
def test_top_k_and_top_p_keep_every_token_tied_at_the_threshold(device):
    optimus.load_extension()
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0, -1.0]], device=device)
    probs = optimus.logits_to_probs(logits, 1.0, 1.0, 2)[0]
    assert probs[:4].min() > 0 and probs[4:].max() == 0  # the 2nd largest is tied three ways
    n = 60_000
    assert_frequencies_follow(draw_frequencies(logits, n, 1.0, 1.0, 2, "ext"), probs.double().cpu().numpy(), n)
    # top-p 0.5 ends inside the tied group: all three stay.
    probs = optimus.logits_to_probs(logits, 1.0, 0.5, 0)[0]
    assert probs[:4].min() > 0 and probs[4:].max() == 0
    assert_frequencies_follow(draw_frequencies(logits, n, 1.0, 0.5, 0, "ext"), probs.double().cpu().numpy(), n)


@pytest.mark.parametrize("device", SAMPLER_DEVICES)
@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_one_token_holding_all_the_mass_is_always_drawn(device, impl):
    optimus.load_extension()
    logits = torch.zeros(3, 1000, device=device)
    logits[0, 417] = 1e4
    logits[1] = float("-inf")
    logits[1, 3] = 0.5
    logits[2, 999] = 200.0
    generator = torch.Generator(device).manual_seed(0)
    for top_p, top_k in [(1.0, 0), (0.9, 0), (1.0, 5), (0.3, 1)]:
        token = optimus.sample_next(logits, 1.0, top_p, top_k, generator, impl=impl)
        assert token.tolist() == [417, 3, 999]


@pytest.mark.parametrize("device", SAMPLER_DEVICES)
@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_temperature_zero_and_tiny_temperatures_are_greedy(device, impl):
    """temperature 0 is argmax; 1e-40 (which overflowed to NaN probabilities, always token 0)
    is the limit: uniform over the tokens tied at the top logit, never anything else."""
    optimus.load_extension()
    logits = torch.randn(4, 500, device=device)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1
    generator = torch.Generator(device).manual_seed(0)
    assert torch.equal(optimus.sample_next(logits, 0.0, impl=impl), logits.argmax(-1))
    for temperature in (1e-40, 1e-300, 1e-30):
        probs = optimus.logits_to_probs(logits, temperature, 0.9, 0)
        assert torch.isfinite(probs).all()
        assert torch.equal(probs[:3].argmax(-1), logits[:3].argmax(-1)) and probs[:3].max(-1).values.eq(1).all()
        draws = torch.stack([optimus.sample_next(logits, temperature, 0.9, 0, generator, impl=impl) for _ in range(200)])
        assert torch.equal(draws[:, :3], logits[:3].argmax(-1).expand(200, 3))
        assert set(draws[:, 3].tolist()) == {10, 20}


@requires_cuda
@pytest.mark.parametrize("V", [80_000, 400_000], ids=["cluster", "chain"])
def test_cuda_sampling_kernel_on_long_rows(V):
    """80,000 tokens a row still fit a cluster's shared memory (16 slices of 5,000 tokens);
    400,000 do not, and take the chain of launches with its histograms in global memory."""
    optimus.load_extension()
    logits = torch.randn(8, V, device="cuda") * 2
    race = torch.empty_like(logits).exponential_(1)
    ours = torch.ops.optimus.sample(logits, race, 0.9, 0, 0.9)
    ref = (optimus.logits_to_probs(logits, 0.9, 0.9, 0) / race).argmax(-1)
    assert (ours == ref).float().mean() >= 0.97


def test_sampling_op_opcheck():
    optimus.load_extension()
    logits = torch.randn(3, 40)
    race = torch.empty(3, 40).exponential_(1)
    torch.library.opcheck(torch.ops.optimus.sample, (logits, race, 0.8, 5, 0.9))
    step = dict(tokens=torch.zeros(3, 1, dtype=torch.long), pos=torch.arange(3), done=torch.tensor([True, False, False]),
                eot_id=7, table=torch.randn(41, 8), x=torch.zeros(3, 8))
    torch.library.opcheck(torch.ops.optimus.sample, (logits, race, 0.8, 5, 0.9), step)


def advance_inputs(B, V, D, device, dtype=torch.bfloat16):
    """Logits where row 1 puts all its mass on the end-of-text token 3, row 0 is already done,
    and the others draw freely; the step's tensors as the Decoder holds them."""
    logits = torch.randn(B, V, device=device).to(dtype)
    logits[1] = -1e4
    logits[1, 3] = 10
    race = torch.empty(B, V, device=device).exponential_(1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    done[0] = True
    step = dict(tokens=torch.full((B, 1), -1, dtype=torch.long, device=device),
                pos=torch.arange(B, device=device)[:, None] + 5, done=done, eot_id=3,
                table=torch.randn(V + 9, D, device=device).to(dtype), x=torch.zeros(B, D, device=device, dtype=dtype))
    return logits, race, step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [1024, 7], ids=["whole_packs", "odd_rows"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 0, 0.9), (1.0, 20, 1.0)], ids=["top-p", "top-k"])
def test_sampling_op_advances_the_step_as_its_reference(device, D, temperature, top_k, top_p):
    """optimus::sample's advance (end-of-text masks, next tokens, positions, embedding rows) is
    sample_advance_ref's applied to the op's own draw: a done row keeps eot, a row drawing eot
    becomes done, the others keep their draw."""
    optimus.load_extension()
    logits, race, step = advance_inputs(6, 300, D, device)
    want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in step.items()}
    drawn = torch.ops.optimus.sample(logits, race, temperature, top_k, top_p)
    token = torch.ops.optimus.sample(logits, race, temperature, top_k, top_p, **step)
    want_token = optimus.sample_advance_ref(drawn, **want)
    assert torch.equal(token, want_token) and token[0] == 3 and token[1] == 3
    assert torch.equal(token[2:], drawn[2:])
    for name in ("tokens", "pos", "done", "x"):
        assert torch.equal(step[name], want[name]), name
    assert step["done"][:2].all() and torch.equal(step["x"], step["table"][token])


def test_sampling_op_advance_arguments_are_named():
    optimus.load_extension()
    logits, race, step = advance_inputs(2, 50, 8, "cpu")
    sample = torch.ops.optimus.sample
    with pytest.raises(RuntimeError, match="pass table and x together"):
        sample(logits, race, 0.8, 0, 0.9, table=step["table"])
    with pytest.raises(RuntimeError, match="done needs the end-of-text token"):
        sample(logits, race, 0.8, 0, 0.9, done=step["done"])
    with pytest.raises(RuntimeError, match=r"tokens must be a contiguous Long tensor of shape \(2\) or \(2, 1\)"):
        sample(logits, race, 0.8, 0, 0.9, tokens=step["tokens"].int())
    with pytest.raises(RuntimeError, match="table must be a contiguous"):
        sample(logits, race, 0.8, 0, 0.9, table=step["table"][:10], x=step["x"])
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        sample(logits, race, 0.8, 0, 0.9, table=step["table"], x=step["x"].float())


@requires_cuda
def test_cuda_prefill_graphs_equal_eager_prefills():
    """Decoder.prefill through its CUDA graphs (one per padded shape, captured at first use, the
    newest kept) gives the eager prefill's logits and cache contents bit for bit, with new tokens
    and lengths at each replay."""
    torch.manual_seed(0)
    model_cfg, _ = optimus.make_configs("base")
    model = optimus.Transformer(model_cfg).cuda().to(torch.bfloat16).eval()
    graphed, eager = optimus.Decoder(model, 2), optimus.Decoder(model, 2, use_graph=False)
    for width, lengths in [(64, [16, 40]), (128, [100, 70]), (64, [64, 1]), (128, [3, 128])]:
        tokens = torch.randint(0, 50257, (2, width), device="cuda")
        lengths = torch.tensor(lengths, device="cuda")
        got, want = graphed.prefill(tokens, lengths), eager.prefill(tokens, lengths)
        assert torch.equal(got, want), width
        for a, b in zip(graphed.caches, eager.caches):
            assert torch.equal(a.k[:, :, :width], b.k[:, :, :width]) and torch.equal(a.v[:, :, :width], b.v[:, :, :width])
    assert sorted(graphed.prefill_graphs) == [(2, 64), (2, 128)] and eager.prefill_graphs is None


@requires_cuda
def test_cuda_sampling_step_launches_only_the_step_and_its_sampler():
    """On the decode_row path the sampling step of the default model is its kernels and the
    sampler, which also masks, advances and gathers the next embedding rows: no copy, gather or
    pointwise launch."""
    torch.manual_seed(0)
    model_cfg, _ = optimus.make_configs("base", impl="ext")
    model = optimus.Transformer(model_cfg).cuda().to(torch.bfloat16).eval()
    decoder = optimus.Decoder(model, 1, use_graph=False)
    decoder.begin(torch.tensor([5], device="cuda"), torch.tensor([3], device="cuda"),
                  torch.zeros(1, dtype=torch.bool, device="cuda"), model_cfg.vocab_size)
    decoder.race.exponential_(1)
    decoder._sample_step(0.8, 0.9, 0, optimus.EOT_ID, "ext")  # warm
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder._sample_step(0.8, 0.9, 0, optimus.EOT_ID, "ext")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names and all(any(k in n for k in ("decode_linear", "rope_append_attention", "decode_tail", "sample"))
                         for n in names), names


def test_cached_generation_with_the_extension_equals_full_forward_passes():
    torch.manual_seed(6)
    model_cfg, _ = optimus.make_configs("tiny", impl="ext")
    model = optimus.Transformer(model_cfg).eval()
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (3, 11)]
    rows = greedy_with_cache(model, prompts, 25)
    for prompt, row in zip(prompts, rows):
        assert row == greedy_without_cache(model, prompt, 25)


BF16_TIE = 0.05  # logits this close in a bf16 full pass may order either way on the fast path


@requires_cuda
def test_cuda_default_model_bf16_fast_path_greedy_equals_full_forward_passes():
    """The default model in bf16 (random weights) on the default path (CUDA graph, packed weights,
    decode attention, sampler kernel): each of its first 32 greedy tokens is the argmax of a full
    forward pass over the same prefix. The two paths round bf16 differently (other kernels and
    shapes), so where the full pass's best logit beats the fast path's token by at most BF16_TIE,
    either is right; every other step must agree exactly."""
    torch.manual_seed(0)
    model_cfg, _ = optimus.make_configs("base")
    model = optimus.Transformer(model_cfg).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 50257, (16,)).tolist()
    fast = greedy_with_cache(model, [prompt], 32)[0]
    equal = 0
    with torch.no_grad():
        for i, token in enumerate(fast):
            logits = model(torch.tensor([prompt + fast[:i]], device="cuda"))[0, -1].float()
            best = int(logits.argmax())
            equal += best == token
            assert best == token or float(logits[best] - logits[token]) <= BF16_TIE, (i, best, token)
    assert equal >= 24, f"only {equal} of 32 steps agree exactly"


# ----------------------------------------------------------------------------- the CUDA kernel's row split
# On CUDA a row is split over several blocks (at least 512 tokens a block): on sm_90 the blocks of
# one cluster, which keep the row in shared memory (clusters of 16 up to about 330,000 tokens, of 8
# about 165,000); on older GPUs, and for longer rows, a chain of launches over about two blocks per
# SM in all, with histograms in global memory. ROW_PATHS takes both on an H200.
CHAIN_V = 400_000
ROW_PATHS = pytest.mark.parametrize("V", [5000, CHAIN_V], ids=["cluster", "chain"])
GPT2_ROW_PATHS = pytest.mark.parametrize("V", [50257, CHAIN_V], ids=["cluster", "chain"])


def peaked_row(V, device, seed):
    """Flat logits over V tokens with 30 tokens lifted far above them: at V = 5,000 most mass on
    the 30 tokens, the flat rest about 5% (at 400,000 about 80%), so a top-p of 0.97 ends among
    the flat tokens (one histogram bin). The lift stays 8 at any V: the exponential race cannot
    represent a token whose weight is under about 1e-7 of the winner's (torch's float32 Exp(1)
    draws are not resolved that close to 0), so lifting by log V would leave the flat tokens
    undrawn."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g) * 0.5
    logits[torch.randperm(V, generator=g)[:30]] += 8 + torch.randn(30, generator=g)
    return logits.to(device)


@requires_cuda
@ROW_PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature, top_p, top_k", [(0.8, 0.9, 0), (1.0, 0.97, 0), (1.0, 1.0, 50), (0.8, 1.0, 0),
                                                       (1.2, 0.95, 20)])
def test_cuda_split_rows_draw_from_logits_to_probs(V, dtype, temperature, top_p, top_k):
    """16 rows of a V-token vocabulary: 40,000 draws against the exact probabilities, tokens
    under 1e-3 pooled; every pool within 5 sigma, nothing drawn outside the kept set, and total
    variation within 0.03 (about 3x its sampling noise here)."""
    optimus.load_extension()
    rows, calls = 16, 2500
    logits = peaked_row(V, "cuda", 11).to(dtype)
    expected = optimus.logits_to_probs(logits[None].double(), temperature, top_p, top_k)[0].cpu().numpy()
    generator = torch.Generator("cuda").manual_seed(2)
    draws = torch.cat([optimus.sample_next(logits.expand(rows, V), temperature, top_p, top_k, generator, impl="ext")
                       for _ in range(calls)]).cpu().numpy()
    n = draws.size
    counts = np.bincount(draws, minlength=V)
    assert counts[expected == 0].sum() == 0, np.nonzero(counts * (expected == 0))
    big = expected >= 1e-3
    freq = np.append(counts[big], counts[~big].sum()) / n
    pooled = np.append(expected[big], expected[~big].sum())
    sigma = np.sqrt(pooled * (1 - pooled) / n)
    assert np.all(np.abs(freq - pooled) <= 5 * sigma + 1e-4), (freq, pooled)
    assert 0.5 * np.abs(freq - pooled).sum() < 0.03


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3, 16])
@GPT2_ROW_PATHS
def test_cuda_split_rows_pick_the_reference_token_for_the_same_noise(dtype, B, V):
    """Batch 1, 3 and 16 of the GPT-2 vocabulary (and of a longer one), rows strided in a wider
    buffer (the LM head's padded output): with the same Exp(1) noise the kernel picks
    argmax(logits_to_probs / noise) on all draws but those where rounding moves a boundary."""
    optimus.load_extension()
    trials = 12
    agree = total = 0
    for trial in range(trials):
        wide = torch.randn(B, V + 47, device="cuda", generator=torch.Generator("cuda").manual_seed(trial))
        wide *= (3.0, 0.02, 1.0)[trial % 3]  # peaked, flat (the random-weights case), in between
        logits = wide.to(dtype)[:, :V]
        assert logits.stride(0) == V + 47
        for temperature, top_p, top_k in [(0.8, 0.9, 0), (1.0, 1.0, 50), (0.6, 0.7, 200), (1.0, 1.0, 0),
                                          (1e-30, 0.9, 0), (0.8, 0.95, 1)]:
            race = torch.empty(B, V, device="cuda").exponential_(1)
            ours = torch.ops.optimus.sample(logits, race, temperature, top_k, top_p)
            ref = (optimus.logits_to_probs(logits, temperature, top_p, top_k) / race).argmax(-1)
            agree += int((ours == ref).sum())
            total += B
    assert agree >= 0.97 * total, f"{agree} of {total}"


@requires_cuda
@GPT2_ROW_PATHS
def test_cuda_split_rows_keep_ties_and_odd_rows(V):
    """Ties across blocks at the top-k and top-p boundaries, a row of -inf but one token, a row
    all NaN (token 0), and one token holding all the mass in a flat row."""
    optimus.load_extension()
    logits = torch.full((4, V), -5.0, device="cuda")
    tied = torch.arange(0, V, 997, device="cuda")   # 51 tokens tied at the top, spread over every block
    logits[0, tied] = 3.0
    logits[1] = float("-inf")
    logits[1, 40000] = 0.0
    logits[2] = float("nan")
    logits[3] = torch.randn(V, device="cuda") * 0.01
    logits[3, 31337] = 60.0
    generator = torch.Generator("cuda").manual_seed(0)
    seen = set()
    for top_p, top_k in [(1.0, 5), (0.5, 0), (0.74, 0), (0.2, 51)]:  # the tie holds 75% of row 0
        for _ in range(40):
            token = optimus.sample_next(logits, 1.0, top_p, top_k, generator, impl="ext").tolist()
            assert token[0] in set(tied.tolist()) and token[1:] == [40000, 0, 31337], (top_p, top_k, token)
            seen.add(token[0])
    assert len(seen) > 30  # all 51 tied tokens stay in (top-k 5 and top-p 0.5 cut inside the tie)


@requires_cuda
@GPT2_ROW_PATHS
def test_cuda_sampling_kernel_replays_in_a_cuda_graph(V):
    """The kernel (cluster or chain) captured in a CUDA graph: replays draw what eager calls draw
    for the same noise, after the logits change under the graph."""
    optimus.load_extension()
    logits = torch.randn(2, V, device="cuda").to(torch.bfloat16)
    race = torch.empty(2, V, device="cuda").exponential_(1)
    out = torch.ops.optimus.sample(logits, race, 0.8, 0, 0.9)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.optimus.sample(logits, race, 0.8, 0, 0.9)
    for _ in range(5):
        logits.copy_(torch.randn(2, V, device="cuda"))
        race.exponential_(1)
        graph.replay()
        assert torch.equal(out, torch.ops.optimus.sample(logits, race, 0.8, 0, 0.9))


def test_a_second_decoder_refreshes_the_packed_weights_in_place():
    """Each Decoder packs the model's weights (prepare_for_inference). A second Decoder of the same
    model refreshes the first one's packs in place: the same storage, which the CUDA graphs the
    first one captured read, now holding the weights' current values."""
    model = tiny_model(4)
    optimus.Decoder(model, 1)
    storage = [(b.attn.wqkv.data_ptr(), b.mlp.wgu.data_ptr()) for b in model.blocks]
    first = model.blocks[0]
    with torch.no_grad():
        first.attn.wk.weight.add_(1.0)
        first.mlp.up.weight.mul_(2.0)
    optimus.Decoder(model, 1)
    assert [(b.attn.wqkv.data_ptr(), b.mlp.wgu.data_ptr()) for b in model.blocks] == storage
    a, m = first.attn, first.mlp
    assert torch.equal(a.wqkv, torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
    assert torch.equal(m.wgu, torch.cat([m.gate.weight, m.up.weight]))
