"""The server: the OpenAI API through the real `openai` client, continuous batching, cancellation,
bad input, the CLI, and the chat page in a headless Chromium. Everything on CPU, on 127.0.0.1."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import data_prep
import optimus
import serve
from conftest import ROOT, requires_cuda

try:  # the tests that need it skip without it; the engine's own tests (the GPU's among them) still run
    import openai
except ImportError:
    openai = None

MAX_SEQ_LEN = 1024  # room for answers long enough to be cut off mid-way, even on a fast machine
TIMEOUT_S = 60  # every request, and every wait for the server, is bounded by this


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A freshly initialised tiny model. Untied embeddings: a random model with tied ones mostly
    repeats its input token, which would make every greedy comparison below trivially true."""
    torch.manual_seed(11)
    model_cfg, _ = optimus.make_configs("tiny", impl="ref", max_seq_len=MAX_SEQ_LEN, tie_embeddings=False)
    path = tmp_path_factory.mktemp("serve") / "tiny.pt"
    optimus.save_checkpoint(path, optimus.Transformer(model_cfg), optimus.TrainingConfig(), step=1,
                            best_val_loss=1.0, template=data_prep.DOLLY_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return optimus.load_checkpoint(checkpoint)[0]


@pytest.fixture(scope="module")
def enc():
    return optimus.load_tokenizer()


def start_server(checkpoint, max_batch, max_queue=serve.MAX_QUEUE, attach=True):
    server = serve.Server(("127.0.0.1", 0), log_requests=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if attach:
        attach_model(server, checkpoint, max_batch, max_queue)
    return server


def attach_model(server, checkpoint, max_batch, max_queue=serve.MAX_QUEUE):
    model, ckpt, _ = optimus.inference_model(str(checkpoint), "cpu", "ref")
    server.attach(serve.Engine(model, optimus.load_tokenizer(), max_batch, max_queue), checkpoint.name,
                  ckpt["template"])


def stop_server(server):
    server.shutdown()
    server.server_close()
    if server.engine is not None:
        server.engine.stop()


@pytest.fixture(scope="module")
def server(checkpoint):
    server = start_server(checkpoint, max_batch=4)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server):
    if openai is None:
        pytest.skip("the openai client is a test extra: pip install -e '.[test]'")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def greedy_reference(model, prompt, n):
    """Independent of the server: a full forward pass per new token, stopping at <|endoftext|>."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
            if tokens[-1] == optimus.EOT_ID:
                break
    return tokens[len(prompt):]


def text_of(enc, tokens):
    tokens = [t for t in tokens if t != optimus.EOT_ID]
    return b"".join(enc.decode_single_token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


def chat_prompt(enc, question, system=""):
    return enc.encode_ordinary(data_prep.format_prompt(data_prep.DOLLY_TEMPLATE, question, system))


def raw_request(server, method, path, body=None, headers=None):
    """(status, parsed JSON) of one request over a fresh connection; `body` bytes are sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def open_request(server, path, body):
    """A socket that has sent one POST and reads nothing (yet)."""
    conn = socket.create_connection(server.server_address[:2], timeout=TIMEOUT_S)
    conn.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return conn


def wait_until(condition, what):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- the decoder


def test_prefill_rows_fills_one_row_and_leaves_the_others(model):
    torch.manual_seed(2)
    prompts = [torch.randint(0, optimus.EOT_ID, (n,)).tolist() for n in (7, 12)]
    decoder = optimus.Decoder(model, 3)
    first = decoder.prefill_rows([2], torch.tensor([prompts[0]]), torch.tensor([7]))
    before = [(c.k.clone(), c.v.clone()) for c in decoder.caches]
    # Row 0 joins later, with a padded prompt: rows 1 and 2 stay exactly as they were.
    padded = torch.tensor([prompts[1] + [optimus.EOT_ID] * 4])
    second = decoder.prefill_rows([0], padded, torch.tensor([12]))
    for (k, v), c in zip(before, decoder.caches):
        assert torch.equal(k[1:], c.k[1:]) and torch.equal(v[1:], c.v[1:])
        assert not torch.equal(k[0], c.k[0])
    # Decoding both rows on from there gives each prompt's own greedy continuation.
    rows = {2: [int(first.argmax())], 0: [int(second.argmax())]}
    lengths = {2: 7, 0: 12}
    for i in range(9):
        tokens = torch.tensor([rows[0][-1], optimus.EOT_ID, rows[2][-1]])
        pos = torch.tensor([lengths[0] + i, 0, lengths[2] + i])
        logits = decoder.step(tokens, pos)
        rows[0].append(int(logits[0].argmax()))
        rows[2].append(int(logits[2].argmax()))
    for row, prompt in ((2, prompts[0]), (0, prompts[1])):
        reference = greedy_reference(model, prompt, 10)
        assert rows[row][: len(reference)] == reference


def engine_answers(engine, jobs, together=True):
    """(text, finish_reason, completion tokens) of each job, submitted all at once or one by one."""
    def collect(job):
        text = ""
        while True:
            kind, value = job.events.get(timeout=TIMEOUT_S)
            if kind != "text":
                assert kind == "end", value
                return text, value, job.completion_tokens
            text += value
    if together:
        for job in jobs:
            engine.submit(job)
        return [collect(job) for job in jobs]
    out = []
    for job in jobs:
        engine.submit(job)
        out.append(collect(job))
    return out


def test_pipelined_engine_rows_end_and_rejoin_between_steps(enc):
    """Jobs end while the next step is already queued (one after one token, one at the very end of
    the cache) and others take their rows: each answer is still its prompt's greedy continuation,
    and no row's device position leaves the cache."""
    torch.manual_seed(5)
    seq = 64
    model_cfg, _ = optimus.make_configs("tiny", impl="ref", max_seq_len=seq, tie_embeddings=False)
    model = optimus.Transformer(model_cfg).eval()
    prompts = [torch.randint(0, optimus.EOT_ID, (n,)).tolist() for n in (3, 10, 1, 20, 5)]
    lengths = [1, 7, seq, 3, seq - 4]  # prompts 3 and 5: prompt + max_tokens = max_seq_len + 1, the most allowed
    engine = serve.Engine(model, enc, 2)
    try:
        got = engine_answers(engine, [serve.Job(prompt=p, max_tokens=n, temperature=0) for p, n in zip(prompts, lengths)])
        for (text, finish, count), prompt, n in zip(got, prompts, lengths):
            reference = greedy_reference(model, prompt, n)
            assert text == text_of(enc, reference)
            assert count == len(reference)
            assert finish == ("stop" if optimus.EOT_ID in reference else "length")
        assert engine.peak_busy == 2 and int(engine.pos.max()) < seq
        engine.decoder.check()  # no cache write fell outside the cache
    finally:
        engine.stop()


def test_per_row_sampling_equals_logits_to_probs_row_by_row():
    torch.manual_seed(7)
    V = 301
    logits = torch.randn(6, V) * 3
    logits[4, :5] = logits[4].max() + 1  # five tied top logits: a tiny temperature is uniform over them
    settings = [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.5, 0.5, 40), (1e-30, 1.0, 0), (2.0, 0.95, V)]
    t, p, k = (torch.tensor(column, dtype=dtype) for column, dtype in
               zip(zip(*settings), (torch.float32, torch.float32, torch.long)))
    got = optimus.logits_to_probs_rows(logits, t, p, k)
    for b, (temperature, top_p, top_k) in enumerate(settings):
        want = optimus.logits_to_probs(logits[b: b + 1], temperature, top_p, top_k)[0]
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-7)
        assert torch.equal(got[b] > 0, want > 0)  # exactly the same tokens kept
    # sample_rows draws from those distributions: frequencies of 4000 draws, within ~4 standard deviations.
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([optimus.sample_rows(logits, t, p, k, generator) for _ in range(4000)])  # (N, 6)
    for b in range(6):
        freq = torch.bincount(draws[:, b], minlength=V).float() / len(draws)
        assert (freq[got[b] == 0] == 0).all()
        assert (freq - got[b]).abs().max() < 0.035


def test_engine_samples_rows_with_different_settings_in_one_batch(model, enc, monkeypatch):
    """Unseeded rows with three different settings share one per-row sampling call beside a greedy
    row: the greedy answer is still its greedy continuation, the others run to their lengths."""
    calls = []
    sample_rows = optimus.sample_rows
    monkeypatch.setattr(optimus, "sample_rows", lambda logits, **kw: calls.append(len(logits)) or sample_rows(logits, **kw))
    engine = serve.Engine(model, enc, 4)
    prompt = enc.encode_ordinary("The quick brown fox")
    try:
        jobs = [serve.Job(prompt=prompt, max_tokens=12, temperature=0)] + [
            serve.Job(prompt=prompt, max_tokens=n, temperature=t, top_p=p, top_k=k)
            for n, t, p, k in ((10, 0.8, 0.9, 0), (14, 1.5, 1.0, 20), (8, 0.3, 0.5, 0))]
        answers = engine_answers(engine, jobs)
        assert answers[0][0] == text_of(enc, greedy_reference(model, prompt, 12))
        for (text, finish, count), job in zip(answers, jobs):
            assert count == job.max_tokens if finish == "length" else finish == "stop"
        assert engine.peak_busy == 4 and 3 in calls  # the three sampled rows in one call
    finally:
        engine.stop()


@requires_cuda
def test_cuda_concurrent_engine_answers_equal_each_alone(checkpoint, enc):
    """On the GPU (bf16, the extension's kernels, the CUDA graph): greedy answers of different
    lengths token for token, and seeded ones, equal the same jobs run alone."""
    model, _, _ = optimus.inference_model(str(checkpoint), "cuda", "auto")
    engine = serve.Engine(model, enc, 4)
    assert engine.decoder.graph is not None and not engine.decoder.sampling_graphs  # warm-up's sampling graph freed
    torch.manual_seed(3)
    prompts = [torch.randint(0, optimus.EOT_ID, (n,)).tolist() for n in (1, 4, 9, 17, 30, 50, 70, 3)]
    lengths = [20, 64, 12, 100, 33, 7, 90, 1]
    seeds = [None, None, 4, None, None, 8, None, None]

    def jobs():
        return [serve.Job(prompt=p, max_tokens=n, temperature=0 if s is None else 0.9, top_p=1.0 if s is None else 0.9,
                          seed=s) for p, n, s in zip(prompts, lengths, seeds)]
    try:
        alone = engine_answers(engine, jobs(), together=False)
        engine.peak_busy = 0
        assert engine_answers(engine, jobs()) == alone
        assert engine.peak_busy == 4
        engine.decoder.check()
    finally:
        engine.stop()


def test_handler_merges_text_events_that_are_already_waiting():
    """A handler that fell behind sends what has queued up as one chunk; the end stays its own event."""
    job = serve.Job(prompt=[1], max_tokens=4)
    for event in (("text", "a"), ("text", "bc"), ("text", "d"), ("end", "length")):
        job.events.put(event)
    server = type("FakeServer", (), {"open_streams": set()})()
    handler = type("FakeHandler", (), {"client_gone": lambda self: False, "server": server})()
    assert list(serve.Handler.events(handler, job)) == [("text", "abcd"), ("end", "length")]


def test_handler_holds_text_while_many_streams_are_open_but_never_the_end(monkeypatch):
    """With streams open, text is sent at most once per hold (what arrives meanwhile merges into
    the next chunk); the first chunk and the end are not held (text waiting when the end comes
    goes out with it). Times are taken where the events are put, so a slow machine only widens
    the margins the asserts leave."""
    monkeypatch.setattr(serve, "STREAM_HOLD_PER_CLIENT_S", 0.25)
    monkeypatch.setattr(serve, "STREAM_HOLD_MAX_S", 0.5)
    job = serve.Job(prompt=[1], max_tokens=8)
    server = type("FakeServer", (), {"open_streams": {1}})()  # with this job's, two: holds of 0.5 s
    handler = type("FakeHandler", (), {"client_gone": lambda self: False, "server": server})()
    put_at = {}

    def produce():
        for piece in "abcdef":
            put_at[piece] = time.monotonic()
            job.events.put(("text", piece))
            time.sleep(0.15)
        put_at["end"] = time.monotonic()
        job.end(("end", "length"))
    threading.Thread(target=produce, daemon=True).start()
    got = [(event, time.monotonic()) for event in serve.Handler.events(handler, job)]
    texts = [e[1] for e, _ in got if e[0] == "text"]
    assert texts[0] == "a" and got[0][1] - put_at["a"] < 0.25        # at once: a hold would be 0.5 s
    assert got[1][0][1].startswith("b") and got[1][1] - got[0][1] >= 0.499  # the next text waited out the hold
    assert "".join(texts) == "abcdef" and len(texts) < 6             # the rest merged
    assert got[-1][0] == ("end", "length") and got[-1][1] - put_at["end"] < 0.25  # the end not held
    assert server.open_streams == {1}                                # this job's entry is gone again


# ----------------------------------------------------------------------------- the API


def test_completions_match_greedy_reference_streamed_and_not(server, client, model, enc):
    prompt = "The quick brown fox"
    ids = enc.encode_ordinary(prompt)
    expected = greedy_reference(model, ids, 12)
    assert optimus.EOT_ID not in expected  # this prompt runs to max_tokens: finish_reason "length"
    result = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=12, temperature=0)
    assert result.choices[0].text == text_of(enc, expected)
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (len(ids), 12, len(ids) + 12)

    chunks = list(client.completions.create(model=server.model_name, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed piece by piece, not in one block
    assert "".join(pieces) == text_of(enc, expected)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_renders_the_template_and_streams(server, client, model, enc):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids = chat_prompt(enc, "Name a colour.", "Be brief.")
    expected = text_of(enc, greedy_reference(model, ids, 20))
    result = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=20, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected
    assert result.usage.prompt_tokens == len(ids) and result.usage.total_tokens == len(ids) + result.usage.completion_tokens

    stream = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=20,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_multi_turn_chat_is_rendered_as_consecutive_records(enc):
    template = data_prep.DOLLY_TEMPLATE
    messages = [{"role": "system", "content": "Use French."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "A colour?"}]
    first = enc.encode_ordinary("### Instruction:\nHi\n\n### Response:\nBonjour") + [optimus.EOT_ID]
    last = enc.encode_ordinary("### Instruction:\nA colour?\n\n### Context:\nUse French.\n\n### Response:\n")
    assert serve.render_chat(enc, template, messages, 10_000) == first + last
    assert serve.render_chat(enc, template, messages, len(last) + 1) == last  # the oldest record dropped
    assert serve.render_chat(enc, template, messages, len(last) - 1) == []    # the last turn cannot fit
    assert serve.render_chat(enc, None, messages[1:], 100) == enc.encode_ordinary("Hi\n\nBonjour\n\nA colour?")


def test_stop_strings_end_the_answer_and_never_leak(server, client, model, enc):
    prompt = "Once upon a time"
    tokens = greedy_reference(model, enc.encode_ordinary(prompt), 30)
    pieces = [text_of(enc, [t]) for t in tokens]
    # A stop string made of the end of one token's text and the start of the next one's.
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    full = "".join(pieces)
    expected = full[: full.index(stop)]
    result = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=30, temperature=0,
                                       stop=[stop, "never appears \x00"])
    assert result.choices[0].text == expected and result.choices[0].finish_reason == "stop"
    chunks = [c.choices[0].text for c in client.completions.create(
        model=server.model_name, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(chunks) == expected and not any(stop in c for c in chunks)


@pytest.mark.parametrize("pieces, stops, sent, hit", [
    (["ab", "cd", "ef"], ["de"], "abc", True),       # split across pieces: "d" is held back, never sent
    (["a", "b", "c"], ["bcd"], "a", False),         # "bc" could still become "bcd": held
    (["xy", "zSTOP", "more"], ["STOP", "yz"], "x", True),  # the earliest stop string wins
    (["hello ", "world"], ["lo w", "xyz"], "hel", True),
    (["abc"], [], "abc", False),
])
def test_stop_text_holds_back_only_what_may_become_a_stop(pieces, stops, sent, hit):
    stop, out, done = serve.StopText(stops), "", False
    for piece in pieces:
        text, done = stop.push(piece)
        out += text
        if done:
            break
    assert (out, done) == (sent, hit)


def test_seed_repeats_and_temperature_samples(server, client):
    def ask(seed):
        return client.completions.create(model=server.model_name, prompt="Tell me", max_tokens=16,
                                         temperature=1.0, top_p=0.95, seed=seed).choices[0].text
    assert ask(5) == ask(5) != ask(6)


def test_eight_concurrent_requests_equal_each_alone(server, client, enc):
    """max_batch 4: four decode while four wait; each joins a free slot as another leaves."""
    prompts = [("word " * n).strip() for n in (1, 3, 6, 10, 15, 21, 28, 36)]
    lengths = [20, 35, 12, 40, 25, 30, 16, 45]
    seeds = [None, None, None, 3, None, None, 9, None]  # two seeded samplers among the greedy rows

    def ask(i):
        kwargs = dict(temperature=0.9, seed=seeds[i]) if seeds[i] is not None else dict(temperature=0)
        r = client.completions.create(model=server.model_name, prompt=prompts[i], max_tokens=lengths[i], **kwargs)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(i) for i in range(8)]
    server.engine.peak_busy = 0
    together = [None] * 8

    def worker(i):
        together[i] = ask(i)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert together == alone
    assert server.engine.peak_busy == 4  # they really shared the batch


def test_disconnected_stream_is_cancelled_and_frees_its_slot(server, client):
    body = json.dumps({"prompt": "Go on", "max_tokens": MAX_SEQ_LEN - 10, "temperature": 0, "stream": True}).encode()
    conn = open_request(server, "/v1/completions", body)
    received = b""
    while received.count(b"data: ") < 4:
        chunk = conn.recv(4096)
        assert chunk, "the server closed the stream early"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    conn.close()
    wait_until(lambda: server.engine.busy() == 0, "the cancelled request's slot to be freed")
    job = server.engine.done[-1]
    assert job.finish == "cancelled" and job.completion_tokens < MAX_SEQ_LEN - 10
    # The server keeps serving, at once.
    start = time.monotonic()
    r = client.completions.create(model=server.model_name, prompt="Still there?", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and time.monotonic() - start < TIMEOUT_S


# ----------------------------------------------------------------------------- bad input

LONG = " ".join(["word"] * (MAX_SEQ_LEN + 20))
BAD_REQUESTS = [  # (method, path, body, status, param, code)
    ("POST", "/v1/completions", b'{"prompt": "hi", ', 400, None, None),                        # malformed JSON
    ("POST", "/v1/completions", b'["prompt"]', 400, None, None),                                # not an object
    ("POST", "/v1/completions", {"prompt": 3}, 400, "prompt", None),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", None),       # a batch: n prompts
    ("POST", "/v1/completions", {"prompt": [1, 50257]}, 400, "prompt", None),       # not a token id
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", None),
    ("POST", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": 7}, 400, "stop", None),
    ("POST", "/v1/completions", {"prompt": "hi", "seed": True}, 400, "seed", None),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]}, 400, "messages", None),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", None),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("POST", "/v1/completions", {"prompt": "hi", "top_k": -1}, 400, "top_k", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", None),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "response_format": {"type": "json_object"}}, 400, "response_format", None),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("GET", "/v1/models/gpt-4o", None, 404, "model", "model_not_found"),
    ("POST", "/v1/embeddings", {"input": "hi"}, 404, None, "not_found"),
    ("GET", "/nowhere", None, 404, None, "not_found"),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (serve.MAX_BODY_BYTES + 1) + b'"}', 413, None,
     "request_too_large"),
    ("POST", "/v1/completions", {"prompt": LONG, "max_tokens": 5}, 413, "prompt", "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": "hi there friend", "max_tokens": MAX_SEQ_LEN}, 413, "prompt", "context_length_exceeded"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 413, "messages",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("method, path, body, status, param, code", BAD_REQUESTS,
                         ids=[f"{i}-{r[3]}-{r[4] or r[5] or 'body'}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_their_status_and_an_openai_error(server, method, path, body, status, param, code):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    got, reply = raw_request(server, method, path, data)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    # ... and the server still answers a good request.
    got, reply = raw_request(server, "POST", "/v1/completions", json.dumps({"prompt": "ok", "max_tokens": 2}).encode())
    assert got == 200 and reply["usage"]["completion_tokens"] >= 1


def test_openai_client_sees_a_bad_request_error(server, client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=server.model_name, prompt="hi", top_p=3)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_a_failing_generation_answers_500_and_the_server_goes_on(server, monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(server.engine.decoder, "prefill_rows", broken)
    for stream in (False, True):
        body = json.dumps({"prompt": "hi", "max_tokens": 3, "stream": stream}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT_S)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        if stream:  # the status was sent before the failure: the error arrives as an event
            assert response.status == 200 and "simulated" in json.loads(text.split("data: ")[1])["error"]["message"]
        else:
            assert response.status == 500 and "simulated" in json.loads(text)["error"]["message"]
    monkeypatch.undo()
    status, reply = raw_request(server, "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 3}')
    assert status == 200 and reply["usage"]["completion_tokens"] == 3


def test_health_says_loading_then_ok_and_a_full_queue_answers_503(checkpoint):
    server = start_server(checkpoint, 1, attach=False)
    try:
        assert raw_request(server, "GET", "/health") == (503, {"status": "loading"})
        status, reply = raw_request(server, "POST", "/v1/completions", b'{"prompt": "hi"}')
        assert status == 503 and reply["error"]["code"] == "loading"
        attach_model(server, checkpoint, max_batch=1, max_queue=1)
        assert raw_request(server, "GET", "/health") == (200, {"status": "ok"})
        models = raw_request(server, "GET", "/v1/models")[1]
        assert [m["id"] for m in models["data"]] == [checkpoint.name]

        # One long request in the only slot, one waiting in the queue of 1: the third is refused.
        long = json.dumps({"prompt": "a", "max_tokens": MAX_SEQ_LEN - 2, "temperature": 0}).encode()
        first = open_request(server, "/v1/completions", long)
        wait_until(lambda: server.engine.busy() == 1, "the first request to take the slot")
        second = open_request(server, "/v1/completions", long)
        wait_until(lambda: server.engine.waiting.qsize() == 1, "the second request to queue")
        status, reply = raw_request(server, "POST", "/v1/completions", long)
        assert status == 503 and reply["error"]["code"] == "queue_full"
        # Both clients give up without reading a byte: the running job and the waiting one end.
        first.close()
        second.close()
        wait_until(lambda: len(server.engine.done) == 2, "both abandoned requests to end")
        assert [j.finish for j in server.engine.done] == ["cancelled", "cancelled"]
        assert server.engine.busy() == 0 and server.engine.waiting.qsize() == 0
        assert raw_request(server, "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 3}')[0] == 200
    finally:
        stop_server(server)


# ----------------------------------------------------------------------------- the CLI


def test_cli_serves_until_ctrl_c(checkpoint):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "optimus.py"), "serve", "--ckpt", str(checkpoint),
                             "--port", "0", "--impl", "ref", "--max_batch", "2"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120  # a cold start imports torch on a busy machine
        while not any(line.startswith("ready:") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stderr.readline())
        assert lines[0].startswith("listening on http://127.0.0.1:")
        port = int(re.search(r"127\.0\.0\.1:(\d+)", lines[0]).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.parametrize("args, needle", [(["--max_batch", "0"], "--max_batch"), (["--port", "70000"], "--port"),
                                          (["--port", "x"], "--port expects an integer"), (["--hots", "a"], "--hots")])
def test_cli_rejects_bad_flags_in_one_line(checkpoint, capsys, args, needle):
    assert optimus.main(["serve", "--ckpt", str(checkpoint), *args]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and needle in errors[0], errors


# ----------------------------------------------------------------------------- the page

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), "/usr/bin/chromedriver"


@pytest.mark.skipif(not (CHROMIUM and Path(CHROMEDRIVER).exists()),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_page_streams_an_answer_in_a_headless_browser(server, client, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT_S)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, TIMEOUT_S)
        wait.until(lambda d: server.model_name in d.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max_tokens", "24")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        question = "What is a transformer?"
        driver.find_element(By.ID, "prompt").send_keys(question)
        driver.find_element(By.ID, "send").click()
        answer = "return document.querySelector('.assistant')"
        wait.until(lambda d: d.execute_script(answer + " && document.querySelector('.assistant').dataset.done"))
        text = driver.execute_script(answer + ".textContent")
        chunks = int(driver.execute_script(answer + ".dataset.chunks"))
        expected = client.chat.completions.create(model=server.model_name, max_tokens=24, temperature=0,
                                                  messages=[{"role": "user", "content": question}])
        assert text == expected.choices[0].message.content and text
        assert chunks > 1  # the answer arrived piece by piece
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == question

        # A long answer, stopped by the button: the server cancels it and frees its slot.
        box = driver.find_element(By.ID, "max_tokens")
        box.clear()
        box.send_keys(str(MAX_SEQ_LEN - 100))
        driver.find_element(By.ID, "prompt").send_keys("Tell me more.")
        driver.find_element(By.ID, "send").click()
        last = "const a = document.querySelectorAll('.assistant'); return a.length == 2 && a[1]"
        WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.02).until(
            lambda d: d.execute_script(last + " && Number(a[1].dataset.chunks) >= 2"))
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: "(stopped)" in d.find_element(By.ID, "log").text)
        wait_until(lambda: server.engine.busy() == 0, "the stopped answer's slot to be freed")
        assert server.engine.done[-1].finish == "cancelled"
    finally:
        driver.quit()


def test_engine_freezes_what_survives_its_start(enc):
    """A request's garbage collections scan only objects newer than the engine (as the CLI's
    answer_decoder): the objects alive at its start are in the frozen generation."""
    import gc
    gc.unfreeze()
    model_cfg, _ = optimus.make_configs("tiny", impl="ref")
    model = optimus.Transformer(model_cfg).eval()
    assert gc.get_freeze_count() == 0
    engine = serve.Engine(model, enc, 1)
    try:
        assert gc.get_freeze_count() > 1000  # torch's and the model's objects, at least
    finally:
        engine.stop()
