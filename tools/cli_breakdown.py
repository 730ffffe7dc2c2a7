"""Where `optimus.py sample`'s time goes, answer by answer, against the bench's measure at the same prompt.

Loads a checkpoint the way cmd_sample does (load_checkpoint, ready_to_generate, answer_decoder:
the warm-up on CUDA, the frozen garbage collector), with the CLI's default sampling settings, a prompt of PROMPT_TOKENS tokens
(" word" repeated, --raw), the text written to /dev/null as the CLI's goes to a pipe. Then:

1. the process's first answer under torch.profiler (CPU and CUDA activity): its longest host calls
   before the first token, and the device's idle gaps (between kernels and copies) over the answer;
2. --answers answers timed as the CLI times them, with host timestamps: tokenising, the prefill's
   host enqueue and device time (CUDA events), the first token; per step the host's own time (from
   one step's launch to the next, less the time it sat waiting in HostCopy.wait), its waits, and
   the device's time from one step's start to the next (CUDA events: kernels plus any idling);
   every answer also lists Python's garbage collections of generations 1 and 2 inside it;
3. the host alone: the same answer loop with the model's step replaced by a fixed logits row
   (prefill and step cost nothing, sampling and everything after it run), so its tokens/s is the
   host's ceiling: the real step hides the host's work only when that is above the bench's rate;
4. the bench's measure (bench.seconds_per_call over generate(eot_id=None), nothing read per token,
   as bench_decode times it) at this prompt's length and at the bench's 16 tokens, and at this
   prompt with an answer's end-of-text checks and read_behind but no text (what those cost).
A summary line per part comes last. CPU runs (tiny checkpoints) check the script, not the speed.

    python3 tools/cli_breakdown.py --ckpt /tmp/ck [--prompt_tokens 100] [--answers 3] [--device cuda]
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import optimus  # noqa: E402

GAP_US = 20  # a device idle gap worth listing


def settings_for(model: optimus.Transformer, new_tokens: int | None) -> dict:
    """The CLI's defaults (SAMPLE_FLAGS), as cmd_sample builds its settings."""
    settings = {k: optimus.SAMPLE_FLAGS[k][1] for k in ("temperature", "top_p", "top_k")}
    settings["raw"] = True
    settings["max_new_tokens"] = new_tokens or optimus.default_max_new_tokens(model.cfg.max_seq_len)
    return settings


class Collections:
    """Python's garbage collections (generation, seconds) while installed, through gc.callbacks."""

    def __init__(self):
        self.done, self.begin = [], None
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.begin = time.perf_counter()
        elif self.begin is not None:
            self.done.append((info["generation"], time.perf_counter() - self.begin))

    def take(self) -> str:
        """The collections since the last take, beyond the cheap generation-0 ones."""
        big = [(g, s) for g, s in self.done if g > 0]
        self.done = []
        return (f"  garbage collections of generations 1-2: {len(big)}"
                + (f", {sum(s for _, s in big) * 1e3:.2f} ms together, the longest {max(s for _, s in big) * 1e3:.2f}"
                   f" ms (generation {max(big, key=lambda x: x[1])[0]})" if big else ""))


class Probe:
    """Host timestamps (and CUDA events) around a decoder's prefill and steps and HostCopy's waits."""

    def __init__(self, decoder: optimus.Decoder, enc):
        self.cuda = decoder.tokens.device.type == "cuda"
        self.decoder, self.enc = decoder, enc
        self.prefill, self.step, self.encode = decoder.prefill, decoder.step, enc.encode_ordinary
        self.wait = optimus.HostCopy.wait
        self.reset()

    def reset(self) -> None:
        self.steps, self.step_events, self.waits, self.marks = [], [], [], {}

    def event(self):
        if not self.cuda:
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def install(self) -> None:
        probe = self

        def prefill(tokens, lengths):
            probe.marks["prefill_called"] = time.perf_counter()
            probe.marks["prefill_events"] = [probe.event()]
            out = probe.prefill(tokens, lengths)
            probe.marks["prefill_events"].append(probe.event())
            probe.marks["prefill_queued"] = time.perf_counter()
            return out

        def step(tokens, pos):
            probe.steps.append(time.perf_counter())
            probe.step_events.append(probe.event())
            return probe.step(tokens, pos)

        def encode(text):
            out = probe.encode(text)
            probe.marks["encoded"] = time.perf_counter()
            return out

        def wait(copy):
            begin = time.perf_counter()
            out = probe.wait(copy)
            probe.waits.append((begin, time.perf_counter() - begin))
            return out
        self.decoder.prefill, self.decoder.step, self.enc.encode_ordinary = prefill, step, encode
        optimus.HostCopy.wait = wait

    def uninstall(self) -> None:
        self.decoder.prefill, self.decoder.step, self.enc.encode_ordinary = self.prefill, self.step, self.encode
        optimus.HostCopy.wait = self.wait

    def report(self, start: float, first: float) -> list[str]:
        if self.cuda:
            torch.cuda.synchronize()  # every event has passed
        m, ms = self.marks, lambda t: (t - start) * 1e3
        lines = [f"  first token {first * 1e3:.2f} ms = tokenised {ms(m['encoded']):.2f}, prefill called "
                 f"{ms(m['prefill_called']):.2f}, queued {ms(m['prefill_queued']):.2f}"
                 + (f" (device {m['prefill_events'][0].elapsed_time(m['prefill_events'][1]):.2f} ms)" if self.cuda else "")
                 + f", then {first * 1e3 - ms(m['prefill_queued']):.2f} ms to the first token on the host"]
        if len(self.steps) > 2:
            own, waited = [], []
            for a, b in zip(self.steps, self.steps[1:]):
                w = sum(d for t, d in self.waits if a <= t < b)
                own.append((b - a - w) * 1e6)
                waited.append(w * 1e6)
            q = statistics.quantiles(own, n=10)
            lines.append(f"  host per step: own {statistics.median(own):.0f} us (p10 {q[0]:.0f}, p90 {q[-1]:.0f}, "
                         f"max {max(own):.0f}), waiting {statistics.median(waited):.0f} us median, "
                         f"{sum(waited) / 1e3:.1f} ms in all over {len(own)} steps")
        if self.cuda and len(self.step_events) > 2:
            gpu = [a.elapsed_time(b) * 1e3 for a, b in zip(self.step_events, self.step_events[1:])]
            q = statistics.quantiles(gpu, n=10)
            lines.append(f"  device per step (start to start): {statistics.median(gpu):.0f} us median (p10 {q[0]:.0f}, "
                         f"p90 {q[-1]:.0f}, max {max(gpu):.0f})")
        return lines


def profile_answer(run, cuda: bool) -> list[str]:
    """run() under torch.profiler: the longest host calls before the first token, device idle gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with torch.profiler.record_function("answer"):
            count, seconds, first = run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    mark = [e for e in events if e.name == "answer"]
    t0 = mark[0].time_range.start if mark else min(e.time_range.start for e in events)
    lines = [f"  profiled: {count} tokens, {count / seconds:.1f} tokens/s, first token {first * 1e3:.1f} ms "
             f"(the profiler's own cost included)"]
    before = [e for e in events if e.device_type == DeviceType.CPU and e.name != "answer"
              and e.time_range.start - t0 < first * 1e6]
    top = [e for e in before if e.cpu_parent is None or e.cpu_parent.name == "answer"]
    runtime = [e for e in before if e.name.startswith(("cuda", "cu"))]  # a kernel's first launch loads it here
    for title, chosen in (("ops", top), ("CUDA runtime calls", runtime)):
        chosen.sort(key=lambda e: -(e.time_range.end - e.time_range.start))
        lines.append(f"  longest host {title} before the first token (ms from the answer's start: duration ms), "
                     f"{len(chosen)} in all:")
        for e in chosen[:6]:
            lines.append(f"    {(e.time_range.start - t0) / 1e3:8.2f}: {(e.time_range.end - e.time_range.start) / 1e3:7.3f}  "
                         f"{e.name[:90]}")
    device = sorted((e.time_range.start, e.time_range.end) for e in events
                    if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if device:
        busy, gaps, end = 0.0, [], device[0][0]
        for a, b in device:
            if a > end:
                gaps.append((a - end, end))
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        span = end - device[0][0]
        big = sorted((g for g in gaps if g[0] >= GAP_US), reverse=True)
        lines.append(f"  device: busy {busy / 1e3:.2f} of {span / 1e3:.2f} ms from its first kernel to its last "
                     f"({busy / max(span, 1e-9):.0%}); {len(big)} idle gaps >= {GAP_US} us, "
                     f"{sum(g for g, _ in big) / 1e3:.2f} ms together; largest (us at ms): "
                     + ", ".join(f"{g:.0f} at {(t - t0) / 1e3:.1f}" for g, t in big[:6]))
    return lines


def bench_seconds(model, decoder, prompt: list[int], new_tokens: int, settings: dict, device,
                  answer_path: bool = False) -> float:
    """bench_decode's measure of one generation: generate() with nothing read per token, the last
    token on the host, bench.seconds_per_call's median. answer_path: with the end-of-text masks
    and stop checks and each token read through read_behind, as an answer (the end-of-text id a
    padded vocabulary row, never sampled, so every run makes all its tokens), but no text."""
    generator = torch.Generator(device).manual_seed(0)
    eot = model.cfg.vocab_size if answer_path else None

    def run(i: int) -> None:
        steps = optimus.generate(model, [prompt], new_tokens, settings["temperature"], settings["top_p"],
                                 settings["top_k"], generator, eot_id=eot, decoder=decoder)
        for token in (optimus.read_behind(steps) if answer_path else steps):
            pass
        token.cpu()
    return bench.seconds_per_call(run, device, bench.STEP_BUDGETS[device.type])


def host_alone(model, decoder, enc, text: str, settings: dict, sink) -> tuple[int, float, float]:
    """One answer with the prefill and the step replaced by a fixed logits row: the host's work alone."""
    V = model.cfg.vocab_size
    logits = torch.randn(1, V, device=decoder.tokens.device).to(model.tok_emb.weight.dtype)
    logits[:, optimus.EOT_ID] = -1e4  # it never ends early
    saved = decoder.prefill, decoder.step
    decoder.prefill = lambda tokens, lengths: logits
    decoder.step = lambda tokens, pos: logits
    try:
        return optimus.answer(model, decoder, enc, text, settings, None, torch.Generator(decoder.tokens.device), sink)
    finally:
        decoder.prefill, decoder.step = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt_tokens", type=int, default=100)
    parser.add_argument("--new_tokens", type=int, default=None, help="default: the CLI's")
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("--no_gc_freeze", action="store_true",
                        help="warm up without answer_decoder's gc.freeze(), then only the first answer and one more")
    args = parser.parse_args()

    enc = optimus.load_tokenizer()
    rt = optimus.resolve_runtime(args.device)
    model, _ = optimus.load_checkpoint(args.ckpt, rt.device)
    model = optimus.ready_to_generate(model, rt, "auto")
    settings = settings_for(model, args.new_tokens)
    cuda = rt.device.type == "cuda"
    if args.no_gc_freeze:
        decoder = optimus.Decoder(model, 1)
        if cuda:
            decoder.warm_up(settings["temperature"], settings["top_p"], settings["top_k"])
    else:
        decoder = optimus.answer_decoder(model, settings)
    text = "word" + " word" * (args.prompt_tokens - 1)
    prompt = enc.encode_ordinary(text)
    print(f"device {rt.device}, {model.num_params() / 1e6:.1f}M parameters, prompt {len(prompt)} tokens, "
          f"settings {settings}")
    sink = open("/dev/null", "w")
    generator = torch.Generator(rt.device).manual_seed(1)
    summary = []

    collections = Collections()

    def answer():
        return optimus.answer(model, decoder, enc, text, settings, None, generator, sink)

    print("-- answer 1 (the process's first), profiled")
    try:
        for line in profile_answer(answer, cuda):
            print(line)
    except Exception as exc:  # the breakdown is a diagnostic: report and carry on
        print(f"  profile failed: {type(exc).__name__}: {exc}")
    print(collections.take())
    if args.no_gc_freeze:
        count, seconds, first = answer()
        print(f"-- answer 2: {count} tokens, {count / seconds:.1f} tokens/s, first token after {first * 1e3:.1f} ms")
        print(collections.take())
        return 0

    probe = Probe(decoder, enc)
    rates = []
    for n in range(args.answers):
        probe.reset()
        probe.install()
        try:
            start = time.perf_counter()
            count, seconds, first = answer()
        finally:
            probe.uninstall()
        rates.append((count / seconds, first))
        print(f"-- answer {n + 2}: {count} tokens, {count / seconds:.1f} tokens/s, first token after "
              f"{first * 1e3:.1f} ms (timestamps on, one CUDA event a step)")
        for line in probe.report(start, first):
            print(line)
        print(collections.take())
    for n in range(args.answers):
        count, seconds, first = answer()
        rates.append((count / seconds, first))
        print(f"-- answer {n + 2 + args.answers}, no timestamps: {count} tokens, {count / seconds:.1f} tokens/s, "
              f"first token after {first * 1e3:.1f} ms")
        print(collections.take())

    count, seconds, _ = host_alone(model, decoder, enc, text, settings, sink)
    print(f"-- host alone (fixed logits, no model): {count} tokens, {count / seconds:.0f} tokens/s, "
          f"{seconds / count * 1e6:.0f} us a token")
    summary.append(f"host alone: {seconds / count * 1e6:.0f} us a token ({count / seconds:.0f} tokens/s ceiling)")

    new = settings["max_new_tokens"]
    bench_rates = {}
    for length in (len(prompt), 16):
        seconds = bench_seconds(model, decoder, prompt[:length], new, settings, rt.device)
        bench_rates[length] = new / seconds
        print(f"-- bench measure, {length}-token prompt, {new} new tokens: {new / seconds:.1f} tokens/s "
              f"({seconds / new * 1e3:.3f} ms a token, prefill included)")
    if model.cfg.padded_vocab_size > model.cfg.vocab_size:
        seconds = bench_seconds(model, decoder, prompt, new, settings, rt.device, answer_path=True)
        print(f"-- the same, {len(prompt)}-token prompt, with the end-of-text checks and read_behind: "
              f"{new / seconds:.1f} tokens/s ({seconds / new * 1e3:.3f} ms a token)")
        summary.append(f"bench measure with an answer's end-of-text checks and read_behind (no text): "
                       f"{new / seconds:.0f} tokens/s")
    plain = [r for r, _ in rates[args.answers:]] or [r for r, _ in rates]
    firsts = [f for _, f in rates[args.answers:]] or [f for _, f in rates]
    ref = bench_rates[len(prompt)]
    summary.append(f"in-process answers without timestamps: {' / '.join(f'{r:.0f}' for r in plain)} tokens/s, "
                   f"first token {' / '.join(f'{f * 1e3:.1f}' for f in firsts)} ms")
    summary.append(f"bench measure: {ref:.0f} tokens/s at the {len(prompt)}-token prompt, {bench_rates[16]:.0f} at 16; "
                   f"answers at {min(plain) / ref:.0%}-{max(plain) / ref:.0%} of the former (target >= 90%), "
                   f"first token <= 15 ms: {max(firsts) * 1e3 <= 15}")
    print("== breakdown summary")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
