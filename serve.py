"""The HTTP server behind `python optimus.py serve`: the OpenAI API, continuous batching, a chat page.

    python optimus.py serve [--ckpt PATH] [--host 127.0.0.1] [--port 8000] [--max_batch N] [--device D]

Three parts, top to bottom:
- requests: JSON bodies -> `Job`s (validated, prompts rendered and tokenized), errors in OpenAI's
  shape (`ApiError`), stop strings held back across token boundaries (`StopText`);
- `Engine`: one thread owns the model's `Decoder` with `max_batch` rows (slots). Each turn of its
  loop drops cancelled jobs, prefills waiting jobs into free slots (one row each, through
  `Decoder.prefill_rows`), then queues one decode step for every slot, sampling each busy row with
  its own job's settings, and only then hands out the tokens of the step queued the turn before
  (the GPU runs one step ahead of the host's text work). A job leaves its slot as soon as it ends;
  jobs beyond the slots wait in a bounded queue. A row's numbers never depend on the other rows, so an answer equals the same
  request's answer alone (greedy: token for token; seeded: each job draws from its own generator);
- HTTP: `http.server`'s ThreadingHTTPServer, one thread per connection, which reads the job's
  events and writes JSON or server-sent events. A handler notices a client that went away (the
  socket reads end-of-file) and cancels its job, which frees the slot at the engine's next turn.
The chat page is one static file, serve_page.html, served at `/`.
"""
from __future__ import annotations

import collections
import functools
import gc
import json
import math
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import typing
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

import data_prep
import optimus

MAX_BODY_BYTES = 1 << 20   # a request body larger than this is refused (413), its bytes thrown away
DRAIN_LIMIT_BYTES = 64 << 20  # ...up to this many; past it the connection is simply closed
MAX_QUEUE = 256            # jobs waiting for a slot; one more gets 503
DEFAULT_MAX_TOKENS = 256   # when a request names none (at most half of max_seq_len)
MAX_STOPS = 4              # stop strings per request, as OpenAI allows
POLL_S = 0.05              # how often a waiting handler checks that its client is still there
# A streaming handler sends at most one chunk per hold: STREAM_HOLD_PER_CLIENT_S for each stream
# open at the time, up to STREAM_HOLD_MAX_S (the first chunk goes at once). Each chunk costs a wake-up,
# a JSON encoding and a write under the one GIL that the engine's loop needs too: 32 clients each
# sent one chunk per token held the engine to ~300 steps/s (H200, 2026-12-02), a third of the
# decoder's own rate. One client still gets a chunk per token or two.
STREAM_HOLD_PER_CLIENT_S = 0.0005
STREAM_HOLD_MAX_S = 0.02
PAGE_NAME = "serve_page.html"
# Beside this file in a checkout (or `pip install -e .`); under sys.prefix after `pip install .`
# (setup.py's data_files), since a top-level module has no package directory to carry it.
PAGE_PATHS = (Path(__file__).resolve().parent / PAGE_NAME, Path(sys.prefix) / "share" / "optimus-prime" / PAGE_NAME)


# ----------------------------------------------------------------------------- requests


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False, low_open: bool = False):
    """body[name] checked for type and range (bools are not numbers here), or `default` when absent/null."""
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    if not (low < value if low_open else low <= value) or value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"'{name}' must be in {bounds}, got {value}", name)
    return value


def _stops(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return stops


# Parameters that would change what an answer means; refused rather than silently ignored.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "response_format": (None, {"type": "text"})}


@dataclass
class Job:
    """One request in flight: what to generate, and the queue its text comes back on.

    Events: ("text", str) pieces, then ("end", finish_reason) or ("error", message)."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)  # set with the last event
    finish: str | None = None      # stop | length | cancelled | error, set by the engine
    completion_tokens: int = 0     # tokens generated, an end-of-text token included

    def end(self, event: tuple[str, str]) -> None:
        """Queue the last event, ("end", reason) or ("error", message), and wake a handler that
        is holding text back (Handler.events)."""
        self.events.put(event)
        self.ended.set()


def render_chat(enc, template: dict | None, messages: list[dict], budget: int) -> list[int]:
    """Chat messages -> prompt token ids, at most `budget` of them, as the checkpoint was trained.

    With an instruction template (Dolly's): every earlier user turn and the assistant's reply to it
    form one complete record (prompt + reply + <|endoftext|>), exactly as training saw records one
    after another; the last user turn is a prompt ending in the response header; the system
    messages, joined by blank lines, are the last turn's `### Context:` section. When the records
    do not fit, the oldest are dropped; the last turn must fit alone. Without a template (a model
    trained on plain text) the contents are joined by blank lines and continued as raw text."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message (after any system messages) must be a user message", "messages")
    if template is None:
        ids = enc.encode_ordinary("\n\n".join(m["content"] for m in messages))
        return ids if len(ids) <= budget else []
    records, pending = [], None  # earlier exchanges, each a token list
    for m in turns[:-1]:
        if m["role"] == "user":
            if pending is not None:  # a user turn with no reply: a record with an empty response
                records.append(enc.encode_ordinary(data_prep.format_prompt(template, pending)) + [optimus.EOT_ID])
            pending = m["content"]
        else:
            prompt = data_prep.format_prompt(template, pending) if pending is not None else ""
            records.append(enc.encode_ordinary(prompt + m["content"].strip()) + [optimus.EOT_ID])
            pending = None
    if pending is not None:
        records.append(enc.encode_ordinary(data_prep.format_prompt(template, pending)) + [optimus.EOT_ID])
    ids = enc.encode_ordinary(data_prep.format_prompt(template, turns[-1]["content"], system))
    while records and len(ids) + sum(map(len, records)) > budget:
        records.pop(0)
    ids = [t for r in records for t in r] + ids
    return ids if len(ids) <= budget else []


def _messages(value) -> list[dict]:
    """OpenAI chat messages, checked; content parts of type text are joined into one string."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string (or a list of text parts)", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse_job(body: dict, chat: bool, enc, template: dict | None, max_seq_len: int) -> tuple[Job, dict]:
    """A request body -> (Job, response options {stream, include_usage}); ApiError when it is bad."""
    for name, allowed in UNSUPPORTED.items():
        if body.get(name, None) not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    if body.get("n") is not None and (isinstance(body["n"], bool) or body["n"] != 1):
        raise ApiError(400, "'n' must be 1: this server returns one choice per request", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    job = Job(prompt=[], max_tokens=0,
              temperature=_number(body, "temperature", 1.0, 0, 2),
              top_p=_number(body, "top_p", 1.0, 0, 1, low_open=True),
              top_k=_number(body, "top_k", 0, 0, 1 << 31, integer=True),
              seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True),
              stop=_stops(body.get("stop")))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    job.max_tokens = _number(body, name, min(DEFAULT_MAX_TOKENS, max_seq_len // 2), 1, max_seq_len, integer=True)
    # Prompt + answer fit in the cache: the last new token is never fed back, hence the + 1.
    budget = max_seq_len + 1 - job.max_tokens
    if chat:
        job.prompt = render_chat(enc, template, _messages(body.get("messages")), budget)
        param = "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            # An empty prompt starts a new document: the model's own <|endoftext|> separator.
            job.prompt = enc.encode_ordinary(prompt) or [optimus.EOT_ID]
        elif (isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < enc.n_vocab for t in prompt)):
            job.prompt = list(prompt)  # token ids, as OpenAI's API also takes them
        else:
            raise ApiError(400, f"'prompt' must be one string or one list of token ids in [0, {enc.n_vocab})", "prompt")
        param = "prompt"
        if len(job.prompt) > budget:
            job.prompt = []
    if not job.prompt:
        raise ApiError(413, f"the prompt does not fit: prompt tokens plus max_tokens ({job.max_tokens}) must "
                            f"be at most max_seq_len + 1 = {max_seq_len + 1}; shorten it or lower max_tokens",
                       param, "context_length_exceeded")
    return job, {"stream": stream, "include_usage": options.get("include_usage", False)}


class StopText:
    """Text in, text out without any stop string: a tail that could still grow into a stop string
    is held back until the next piece shows whether it does, so none leaks across tokens."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was hit: then nothing more is to be sent)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = 0  # the longest tail that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# ----------------------------------------------------------------------------- engine


@dataclass
class Slot:
    """A decoder row serving one job (the row's next token and position live on the device)."""
    job: Job
    text: optimus.TextStream
    stop: StopText
    generator: torch.Generator | None


@dataclass
class Launch:
    """One decode step queued on the device, read by the host one turn later: the (2, B) host
    buffer its tokens land in (row 0: the tokens it was fed, copied only for rows admitted just
    before it; row 1: the tokens it sampled), the event that says they landed, and the slots it
    served (a slot no longer in its row when the step is read has ended: its tokens are dropped)."""
    host: torch.Tensor
    event: torch.cuda.Event | None
    slots: list[tuple[int, Slot]]
    fresh: set[int]


class QueueFull(Exception):
    pass


class Engine:
    """Continuous batching over one `Decoder`: see the module docstring. All model work happens on
    this engine's thread; other threads only `submit` jobs and read their events.

    The step is pipelined: each row's next token and position stay in device buffers that the
    step itself updates (the sampled token written back, the position advanced), and the host
    reads a step's tokens only after it queued the next step, so the GPU computes step N+1 while
    Python turns step N's tokens into text. A row whose job ended meanwhile has run one step too
    many: that step wrote only its own cache row, past its answer (a next prefill rewrites the row
    from position 0, and decoding writes each position before it reads it), and its token is dropped."""

    def __init__(self, model: optimus.Transformer, enc, max_batch: int, max_queue: int = MAX_QUEUE,
                 compile: bool = False):
        self.model, self.enc, self.max_batch = model, enc, max_batch
        self.device = model.tok_emb.weight.device
        # As generate() samples: a model on the references never builds the extension for sampling.
        self.sample_impl = "auto" if model.kernels(self.device, False) == "ext" else "ref"
        self.decoder = optimus.Decoder(model, max_batch, compile=compile)
        if self.device.type == "cuda":  # load every kernel before the first request is timed
            self.decoder.warm_up()
            # generate()'s graph of the step with its sampling: the engine samples each group of
            # rows outside the step's graph (its rows have settings of their own), so it goes.
            self.decoder.sampling_graphs.clear()
        # As the CLI does (optimus.answer_decoder): what torch and the model leave is frozen, so a
        # garbage collection during a request scans only newer objects, not all ~320,000 of them
        # (a full one took 370-400 ms on the development machine's CPU).
        gc.collect()
        gc.freeze()
        self.waiting: queue.Queue[Job] = queue.Queue(max_queue)
        self.slots: list[Slot | None] = [None] * max_batch
        # Each row's next token and its position, on the device; a free row keeps stepping (the
        # step has a static shape) at a position held inside the cache, writing its own row only.
        self.tokens = torch.full((max_batch,), optimus.EOT_ID, dtype=torch.long, device=self.device)  # (B,)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)                       # (B,)
        cuda = self.device.type == "cuda"
        self.hosts = [torch.empty(2, max_batch, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self.pending: Launch | None = None  # the step queued last turn, not read yet
        self.fresh: set[int] = set()        # rows admitted since the last step was queued
        self.groups: list | None = None  # sampling groups (see _groups), None: to rebuild
        self.done: collections.deque[Job] = collections.deque(maxlen=256)  # recent jobs, newest last
        self.peak_busy = 0  # most slots busy at once (tests and the bench read it)
        self.steps = 0      # decode steps queued (the bench reports steps/s from it)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="optimus-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when max_queue jobs are already waiting."""
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def busy(self) -> int:
        return sum(s is not None for s in self.slots)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        while not self.waiting.empty():
            self.waiting.get_nowait().end(("error", "the server is shutting down"))
        for row, slot in enumerate(self.slots):
            if slot is not None:
                self._finish(row, "error", message="the server is shutting down")

    def _loop(self) -> None:
        if self.device.type == "cuda":  # a new thread starts on cuda:0, whatever --device said
            torch.cuda.set_device(self.device)
        while not self.stopping.is_set():
            try:
                self._turn()
            except Exception:  # e.g. out of memory: the jobs in the batch fail, the server goes on
                traceback.print_exc()
                message = traceback.format_exc(limit=1).strip().splitlines()[-1]
                self.pending, self.fresh = None, set()
                for row, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(row, "error", message=message)

    def _turn(self) -> None:
        """One turn of the loop: drop cancelled jobs, admit waiting ones, queue one decode step for
        all rows, then hand out the tokens of the step queued last turn."""
        for row, slot in enumerate(self.slots):
            if slot is not None and slot.job.cancelled.is_set():
                self._finish(row, "cancelled")
        self._admit()
        busy = [(row, slot) for row, slot in enumerate(self.slots) if slot is not None]
        launch = self._launch(busy) if busy else None
        if self.pending is not None:
            self._read(self.pending)
        self.pending = launch

    def _launch(self, busy: list[tuple[int, Slot]]) -> Launch:
        """Queue one decode step for every row; nothing here waits for the device."""
        self.peak_busy = max(self.peak_busy, len(busy))
        host = self.hosts[self.steps % 2]  # the other buffer is the pending step's, read after this
        if self.fresh:  # their first tokens (sampled from the prefill) are still unread
            host[0].copy_(self.tokens, non_blocking=True)
        logits = self.decoder.step(self.tokens, self.pos)                                         # (B, V)
        for index, sample in self._groups():
            chosen = sample(logits if index is None else logits.index_select(0, index))
            if index is None:
                self.tokens.copy_(chosen)
            else:
                self.tokens.index_copy_(0, index, chosen)
        self.pos.add_(1).clamp_(max=self.model.cfg.max_seq_len - 1)
        host[1].copy_(self.tokens, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.steps += 1
        launch = Launch(host, event, busy, self.fresh)
        self.fresh = set()
        return launch

    def _read(self, launch: Launch) -> None:
        """Hand a queued step's tokens to the jobs it served that are still running."""
        if launch.event is not None:
            launch.event.synchronize()
        fed = launch.host[0].tolist() if launch.fresh else None
        sampled = launch.host[1].tolist()
        for row, slot in launch.slots:
            if row in launch.fresh and self.slots[row] is slot:
                self._advance(row, fed[row])
            if self.slots[row] is slot:
                self._advance(row, sampled[row])

    def _groups(self) -> list[tuple[torch.Tensor | None, typing.Callable[[torch.Tensor], torch.Tensor]]]:
        """The busy rows grouped for sampling, as (device row index, or None for all rows, a
        function (n, V) logits -> (n,) tokens), rebuilt only when a job joins or leaves: greedy
        rows share one argmax; unseeded rows share one sample_next call when their settings are
        equal, else one sample_rows call with each row's own; a seeded row draws from its own
        generator alone, so its draws do not depend on its neighbours."""
        if self.groups is None:
            greedy, seeded, unseeded = [], [], []
            for row, s in enumerate(self.slots):
                if s is not None:
                    (greedy if s.job.temperature == 0 else seeded if s.generator else unseeded).append(row)
            samplers = []
            if greedy:
                samplers.append((greedy, lambda logits: logits.argmax(-1), True))
            if unseeded:
                jobs = [self.slots[row].job for row in unseeded]
                if len({(j.temperature, j.top_p, j.top_k) for j in jobs}) == 1:
                    samplers.append((unseeded, functools.partial(optimus.sample_next, temperature=jobs[0].temperature,
                                                                 top_p=jobs[0].top_p, top_k=jobs[0].top_k,
                                                                 impl=self.sample_impl), True))
                else:
                    def settings(name, dtype):
                        return torch.tensor([getattr(j, name) for j in jobs], dtype=dtype, device=self.device)
                    samplers.append((unseeded, functools.partial(
                        optimus.sample_rows, temperature=settings("temperature", torch.float32),
                        top_p=settings("top_p", torch.float32), top_k=settings("top_k", torch.long)), False))
            for row in seeded:
                j = self.slots[row].job
                samplers.append(([row], functools.partial(optimus.sample_next, temperature=j.temperature, top_p=j.top_p,
                                                          top_k=j.top_k, generator=self.slots[row].generator,
                                                          impl=self.sample_impl), False))
            # A lone group with one setting samples every row, free ones too (their tokens are
            # never read): no gather of its logits, no scatter of its tokens. Not a seeded row (its
            # draws must not depend on the batch) nor per-row settings (they line up with rows).
            whole = len(samplers) == 1 and samplers[0][2]
            self.groups = [(None if whole else torch.tensor(rows, device=self.device), fn) for rows, fn, _ in samplers]
        return self.groups

    def _admit(self) -> None:
        """Prefill waiting jobs into free slots; when nothing runs, wait a little for one."""
        for row in range(self.max_batch):
            if self.slots[row] is not None:
                continue
            try:
                idle = self.pending is None and all(s is None for s in self.slots)
                job = self.waiting.get(timeout=POLL_S) if idle else self.waiting.get_nowait()
            except queue.Empty:
                return
            if job.cancelled.is_set():
                job.finish = "cancelled"
                self.done.append(job)
                continue
            generator = None
            if job.seed is not None and job.temperature > 0:
                generator = torch.Generator(self.device).manual_seed(job.seed)
            slot = self.slots[row] = Slot(job, optimus.TextStream(self.enc), StopText(job.stop), generator)
            self.groups = None
            try:
                # Padded to a multiple of PREFILL_BUCKET, as generate() does: few distinct shapes.
                width = min(-(-len(job.prompt) // optimus.PREFILL_BUCKET) * optimus.PREFILL_BUCKET,
                            self.model.cfg.max_seq_len)
                tokens = torch.full((1, width), optimus.EOT_ID, dtype=torch.long)
                tokens[0, : len(job.prompt)] = torch.tensor(job.prompt)
                logits = self.decoder.prefill_rows([row], tokens.to(self.device), torch.tensor([len(job.prompt)]))
                self.tokens[row: row + 1] = optimus.sample_next(logits, job.temperature, job.top_p, job.top_k,
                                                                slot.generator, impl=self.sample_impl)
                self.pos[row] = len(job.prompt)
            except Exception:  # a prefill that fails (a long prompt out of memory) fails its job only
                self._finish(row, "error", message=traceback.format_exc(limit=1).strip().splitlines()[-1])
                continue
            self.fresh.add(row)

    def _advance(self, row: int, token: int) -> None:
        """Hand a row's new token to its job: text out, and the job ends or goes on."""
        slot = self.slots[row]
        job = slot.job
        job.completion_tokens += 1
        if token == optimus.EOT_ID:
            return self._finish(row, "stop", tail=True)
        text, hit = slot.stop.push(slot.text.push(token))
        if text:
            job.events.put(("text", text))
        if hit:
            return self._finish(row, "stop")
        if job.completion_tokens == job.max_tokens:
            return self._finish(row, "length", tail=True)

    def _finish(self, row: int, reason: str, tail: bool = False, message: str = "") -> None:
        """End a row's job (sending any held-back text when `tail`) and free the row."""
        slot, self.slots[row] = self.slots[row], None
        self.groups = None
        job = slot.job
        if tail:  # no stop string was hit: what was held back is answer text after all
            text, hit = slot.stop.push(slot.text.flush())
            text += "" if hit else slot.stop.flush()
            if text:
                job.events.put(("text", text))
        job.finish = reason
        job.end(("error", message) if reason == "error" else ("end", reason))
        self.done.append(job)


# ----------------------------------------------------------------------------- HTTP


class ClientGone(Exception):
    pass


class Server(ThreadingHTTPServer):
    """The HTTP server; `engine` is None while the model loads (then /health and the API say 503)."""
    daemon_threads = True
    request_queue_size = 128  # listen backlog: socketserver's 5 reset connections when 32 clients connect at once

    def __init__(self, address: tuple[str, int], log_requests: bool = True):
        super().__init__(address, Handler)
        self.engine: Engine | None = None
        self.model_name, self.template, self.enc, self.max_seq_len = "", None, None, 0
        self.created = int(time.time())
        self.log_requests = log_requests
        self.open_streams: set[int] = set()  # ids of the jobs whose handler is sending their events

    def attach(self, engine: Engine, model_name: str, template: dict | None) -> None:
        """The model is loaded: from now on requests are served."""
        self.model_name, self.template, self.enc = model_name, template, engine.enc
        self.max_seq_len = engine.model.cfg.max_seq_len
        self.engine = engine

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def find_page() -> Path:
    for path in PAGE_PATHS:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{PAGE_NAME} not found in {' or '.join(map(str, PAGE_PATHS))}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON answers; event streams close the connection
    server: Server

    def log_message(self, format: str, *args) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)

    # --- responses

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: dict) -> None:
        self.send_body(status, json.dumps(obj).encode(), "application/json")

    def client_gone(self) -> bool:
        """True once the client closed its end (the socket is readable and reads end-of-file)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # --- routes

    def do_GET(self) -> None:
        route = urlsplit(self.path).path
        try:
            if route in ("/", "/index.html"):
                self.send_body(200, find_page().read_bytes(), "text/html; charset=utf-8")
            elif route == "/health":
                ready = self.server.engine is not None
                self.send_json(200 if ready else 503, {"status": "ok" if ready else "loading"})
            elif route == "/v1/models":
                self.require_engine()
                self.send_json(200, {"object": "list", "data": [self.model_card()]})
            elif route.startswith("/v1/models/"):
                self.require_engine()
                self.check_model(route.removeprefix("/v1/models/"))
                self.send_json(200, self.model_card())
            else:
                raise ApiError(404, f"no route GET {route}: see /v1/models, /v1/chat/completions, "
                                    f"/v1/completions, /health", code="not_found")
        except ApiError as exc:
            self.send_json(exc.status, exc.body())

    def do_POST(self) -> None:
        route = urlsplit(self.path).path
        job = None
        try:
            if route not in ("/v1/chat/completions", "/v1/completions"):
                self.close_connection = True  # the body stays unread
                raise ApiError(404, f"no route POST {route}: use /v1/chat/completions or /v1/completions",
                               code="not_found")
            body = self.read_json()
            engine = self.require_engine()
            if body.get("model") is not None:
                self.check_model(body["model"])
            chat = route == "/v1/chat/completions"
            job, options = parse_job(body, chat, self.server.enc, self.server.template, self.server.max_seq_len)
            try:
                engine.submit(job)
            except QueueFull:
                raise ApiError(503, "the server is busy (its queue is full): retry later", None, "queue_full",
                               "server_error") from None
            if options["stream"]:
                self.stream(job, chat, options["include_usage"])
            else:
                self.answer(job, chat)
        except ApiError as exc:
            self.send_json(exc.status, exc.body())
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug must not take the server down: this request gets a 500
            traceback.print_exc()
            self.close_connection = True
            with_error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")
            try:
                self.send_json(500, with_error.body())
            except OSError:
                pass
        finally:
            if job is not None:
                job.cancelled.set()  # a no-op once the job ended; frees the slot if it is still running

    def require_engine(self) -> Engine:
        if self.server.engine is None:
            raise ApiError(503, "the model is still loading: retry when /health says ok", None, "loading",
                           "server_error")
        return self.server.engine

    def check_model(self, name) -> None:
        if name != self.server.model_name:
            raise ApiError(404, f"model {json.dumps(name)} is not served here; this server serves "
                                f"{json.dumps(self.server.model_name)} (see /v1/models)", "model", "model_not_found")

    def model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "optimus", "max_seq_len": self.server.max_seq_len}

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ApiError(400, "the request needs a Content-Length header (chunked bodies are not supported)")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            # Read what was sent before answering: closing a socket with unread data resets the
            # connection, and the client would see that instead of this error.
            left = int(length)
            while 0 < left <= DRAIN_LIMIT_BYTES and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            raise ApiError(413, f"the request body is {int(length):,} bytes; at most {MAX_BODY_BYTES:,} are accepted",
                           code="request_too_large")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def events(self, job: Job):
        """The job's events as they come; raises ClientGone (and cancels the job) when the client left.
        Text is merged into one event per hold (see STREAM_HOLD_PER_CLIENT_S), and what is already
        waiting always: a handler that fell behind catches up with one chunk and one write instead
        of one per token. The end of the answer is never held."""
        streams = self.server.open_streams
        streams.add(id(job))
        try:
            pending, sent = None, -math.inf  # when the last text went out
            while True:
                try:
                    event = pending or job.events.get(timeout=POLL_S)
                except queue.Empty:
                    event = None
                pending = None
                if event is not None and event[0] == "text":
                    hold = min(STREAM_HOLD_MAX_S, STREAM_HOLD_PER_CLIENT_S * len(streams))
                    wait = sent + hold - time.monotonic()
                    if wait > 0:  # text that comes meanwhile waits in the queue: no wake-up per token
                        job.ended.wait(wait)  # only the end cuts the hold short
                    while True:  # what came meanwhile, merged
                        try:
                            following = job.events.get_nowait()
                        except queue.Empty:
                            break
                        if following[0] != "text":
                            pending = following
                            break
                        event = ("text", event[1] + following[1])
                if self.client_gone():
                    job.cancelled.set()
                    raise ClientGone()
                if event is not None:
                    yield event
                    if event[0] != "text":
                        return
                    sent = time.monotonic()
        finally:
            streams.discard(id(job))

    def usage(self, job: Job) -> dict:
        n, m = len(job.prompt), job.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def answer(self, job: Job, chat: bool) -> None:
        pieces, end = [], None
        for kind, value in self.events(job):
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise ApiError(500, f"generation failed: {value}", kind="server_error")
            else:
                end = value
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": end}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": end})
        self.send_json(200, {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                             "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.server.model_name,
                             "choices": [choice], "usage": self.usage(job)})

    def stream(self, job: Job, chat: bool, include_usage: bool) -> None:
        """Server-sent events: one chunk per piece of text, a chunk with finish_reason, the usage
        chunk when asked, then `data: [DONE]`; the connection closes after it."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_name}

        def send(choices: list, **extra) -> None:
            chunk = {**head, "choices": choices, **({"usage": None} if include_usage else {}), **extra}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        def choice(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if chat:
            send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        for kind, value in self.events(job):
            if kind == "text":
                send([choice(value, None)])
            elif kind == "error":
                error = ApiError(500, f"generation failed: {value}", kind="server_error")
                self.wfile.write(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
                return
            else:
                send([choice(None, value)])
        if include_usage:
            send([], usage=self.usage(job))
        self.wfile.write(b"data: [DONE]\n\n")


# ----------------------------------------------------------------------------- command


def run(ckpt: str, host: str, port: int, max_batch: int, max_queue: int, device: str, impl: str,
        compile: bool) -> int:
    """`optimus.py serve`: listen at once (/health says 503), load the model, serve until Ctrl-C."""
    path = optimus.find_checkpoint(ckpt)
    try:
        server = Server((host, port))
    except OSError as exc:
        raise optimus.UserError(f"cannot listen on {host}:{port} ({exc.strerror}): "
                                f"pick another --port or --host") from None
    thread = threading.Thread(target=server.serve_forever, name="optimus-http", daemon=True)
    thread.start()
    # Ctrl-C (SIGINT) stops the server even when its parent started it with SIGINT ignored (a
    # shell's background job), as the trainer's own handler does: Python would then never raise
    # KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine = None
    try:
        print(f"listening on {server.url} (loading {path}; /health says 503 until ready)", file=sys.stderr, flush=True)
        model, ckpt_dict, rt = optimus.inference_model(str(path), device, impl)
        if compile:
            print("compiling the decoding step (tens of seconds on a GPU)...", file=sys.stderr, flush=True)
        engine = Engine(model, optimus.load_tokenizer(), max_batch, max_queue, compile=compile)
        server.attach(engine, path.name, ckpt_dict.get("template"))
        print(f"ready: the chat page at {server.url}/ and the OpenAI API at {server.url}/v1 "
              f"(model {path.name!r}, {model.num_params() / 1e6:.1f}M parameters, {rt.device}, "
              f"{max_batch} slots); Ctrl-C stops", file=sys.stderr, flush=True)
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.shutdown()
        server.server_close()
        if engine is not None:
            engine.stop()
    return 0
