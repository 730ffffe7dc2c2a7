"""Where the batch-1 step's time goes around its kernels: the default model (bf16, random
weights) timed as generate() steps it (sample_step: the race's draw, one graph replay, the
token's copy out), with the sampler advancing the step and with the separate launches it
replaced (the end-of-text masks with and without eot, the copy of the tokens, the position's
increment, the embedding gather), as back-to-back replays of those graphs, and as graphs of the kernel chain
alone: from a static embedding row to the sampled token (no gather, no copies, no position
increment), the same without the attention kernels (a fixed attention output), and without the
LM head and the sampler. us per step, median of 5 runs of 100 steps, CUDA events.

    python tools/decode_glue.py
"""
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import optimus  # noqa: E402

STEPS = 100


def per_step_us(fn, reset=None) -> float:
    """fn's time per call, median of 5 runs of STEPS calls; reset() before each run (positions
    back to where they started: 100 steps from 140 stay inside the 512-slot cache)."""
    times = []
    for _ in range(5):
        if reset is not None:
            reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / STEPS)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    dev = torch.device("cuda")
    cfg, _ = optimus.make_configs("base", impl="ext")
    torch.manual_seed(0)
    model = optimus.Transformer(cfg).to(dev).to(torch.bfloat16).eval()
    dec = optimus.Decoder(model, 1)
    gen = torch.Generator(dev).manual_seed(0)
    token = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.full((1,), 140, dtype=torch.long, device=dev)
    dec.begin(token, pos, torch.zeros(1, dtype=torch.bool, device=dev), cfg.vocab_size)
    dec.race.exponential_(1, generator=gen)

    # The step as it was before the sampler advanced it (2026-12-03): the end-of-text masks, the
    # copy of the tokens, the position's increment and the embedding gather as launches of their own.
    old = optimus.Decoder(model, 1)
    old.x = None

    def old_sample_step(self, temperature, top_p, top_k, eot_id, impl):
        logits = self.forward_step()
        token = optimus.sample_with_race(logits, self.race, temperature, top_p, top_k, impl)
        if eot_id is not None:
            token = token.masked_fill(self.done, eot_id)
            self.done |= token == eot_id
        self.tokens.copy_(token[:, None])
        self.pos += 1
        return token
    old._sample_step = types.MethodType(old_sample_step, old)
    old.begin(token, pos, torch.zeros(1, dtype=torch.bool, device=dev), cfg.vocab_size)
    for eot in (None, optimus.EOT_ID):
        for name, d in (("sampler advances the step", dec), ("separate launches (before)", old)):
            def sample_step():
                d.sample_step(0.8, 0.9, 0, gen, eot)
            def reset():
                d.pos.fill_(140)
                d.done.zero_()
            reset()
            sample_step()
            us = per_step_us(sample_step, reset)
            graph, _ = d.sampling_graphs[(0.8, 0.9, 0, eot, "auto")]
            replay = per_step_us(graph.replay, reset)
            print(f"eot {str(eot):5s} {name:28s} generate's step {us:7.1f} us, its graph back to back {replay:7.1f} us",
                  flush=True)
    del old
    for c in dec.caches:
        c.status.zero_()

    # generate() as bench.bench_decode times it (a 16-token prompt, 256 new tokens, prefill and
    # all), the prefill through its graph and eager, alternated.
    prompts = torch.randint(0, optimus.EOT_ID, (1, 16)).tolist()
    graphs = dec.prefill_graphs
    for r in range(2):
        for name, pg in (("prefill graphs", graphs), ("eager prefill", None)):
            dec.prefill_graphs = pg
            seconds = bench.answer_seconds(model, dec, prompts, 256, dev)
            print(f"round {r} generate, {name:15s} {256 / seconds:8,.0f} tokens/s  {seconds * 1e3:.2f} ms an answer",
                  flush=True)
    dec.prefill_graphs = graphs
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    tokens = torch.zeros(1, 64, dtype=torch.long, device=dev)
    lengths = torch.tensor([16], device=dev)
    for name, pg in (("graph", graphs), ("eager", None)):
        dec.prefill_graphs = pg
        dec.prefill(tokens, lengths)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        for _ in range(20):
            dec.prefill(tokens, lengths)
        end.record()
        end.synchronize()
        print(f"prefill of width 64, {name}: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms wall, "
              f"{start.elapsed_time(end) / 20:.3f} ms on the device's clock", flush=True)
    dec.prefill_graphs = graphs
    dec.pos.fill_(190)

    x0 = model.tok_emb(dec.tokens[:, 0]).clone()
    y0 = torch.randn(1, cfg.num_heads * cfg.head_dim, device=dev).to(torch.bfloat16)
    dec.pos.fill_(190)
    blocks = list(model.blocks)

    def chain(attention: bool, head: bool):
        x = x0
        first = blocks[0]
        qkv = optimus.decode_linear(x, first.attn.wqkv, first.norm1.weight, None, first.norm1.eps, False, "ext")
        for i, (block, cache) in enumerate(zip(blocks, dec.caches)):
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if attention:
                x, qkv = block.decode_row(x, qkv, model.rope_cos, model.rope_sin, cache, dec.pos, nxt)
            else:
                a, m = block.attn, block.mlp
                x, qkv = optimus.decode_tail(y0, x, a.wo.weight, block.norm2.weight, m.wgu, m.down.weight,
                                             nxt.norm1.weight if nxt else None, nxt.attn.wqkv if nxt else None,
                                             block.norm2.eps, block.norm2.eps, "ext")
        if not head:
            return x
        logits = optimus.decode_linear(x, model.head.weight, model.norm.weight, None, model.norm.eps, False, "ext")
        return torch.ops.optimus.sample(logits[:, : cfg.vocab_size], dec.race, 0.8, 0, 0.9)

    for attention, head, name in ((True, True, "kernels alone: embedding row -> token"),
                                  (False, True, "  the same without the attention kernels"),
                                  (True, False, "  the same without the LM head and the sampler"),
                                  (False, False, "  without attention, head and sampler")):
        g, _ = dec._capture(lambda: chain(attention, head))  # the Decoder's own way of capturing
        print(f"{name:50s} {per_step_us(g.replay):7.1f} us", flush=True)


if __name__ == "__main__":
    main()
