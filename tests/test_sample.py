"""The sampler: the nucleus rule, determinism, the KV cache, batching, and the CLI."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import data_prep
import optimus
from conftest import ROOT, requires_cuda


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
    decoder.warm_up(0.8, 0.9, 0)  # what the CLI does on CUDA before the first answer
    assert greedy_with_cache(model, [prompt], 20, decoder=decoder)[0] == greedy_without_cache(model, prompt, 20)


def test_compiled_step_generates_what_the_full_forward_passes_do():
    model = tiny_model(3)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (4, 9)]
    decoder = optimus.Decoder(model, 2, compile=True)
    steps = torch.stack(list(optimus.generate(model, prompts, 12, temperature=0, eot_id=None, decoder=decoder)), 1)
    for prompt, row in zip(prompts, steps.tolist()):
        assert row == greedy_without_cache(model, prompt, 12)


def test_read_behind_keeps_order_and_stays_lag_steps_back():
    produced = []

    def source(n):
        for i in range(n):
            produced.append(i)
            yield i

    for n in (0, 3, 20):
        produced.clear()
        seen = []
        for item in optimus.read_behind(source(n), lag=4):
            seen.append(item)
            assert len(produced) == min(n, item + 5)  # the source runs 4 steps ahead, up to its end
        assert seen == list(range(n))


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
    assert steps.shape == (8, 2)  # both done after 5 tokens, noticed at the check after 8
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


def test_cli_default_length_and_an_empty_prompt(checkpoint):
    """No --max_new_tokens on a 128-token model: 64 tokens and a note; an empty prompt starts from <|endoftext|>."""
    result = run_sample("--ckpt", str(checkpoint), "--prompt", "", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "note: answers stop at 64 tokens" in result.stderr
    expected = greedy_without_cache(optimus.load_checkpoint(checkpoint)[0], [optimus.EOT_ID], 64)
    if optimus.EOT_ID in expected:
        expected = expected[: expected.index(optimus.EOT_ID)]
    assert result.stdout == optimus.load_tokenizer().decode(expected) + "\n"
