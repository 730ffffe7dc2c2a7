"""The batch-1 decoding step under settings read from environment variables, alternated in one
process: bench.bench_decode's generation (default model, bf16, random weights, 16-token prompt,
256 new tokens, temperature 0.8, top-p 0.9), one fresh Decoder (and CUDA graph) per setting and
round, so a setting read at capture time applies. tokens/s and ms per token, median.

    python tools/bench_decode_ab.py --settings "OPTIMUS_DECODE_TAIL=1;OPTIMUS_DECODE_TAIL=0" [--rounds 2]
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import optimus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, help="';'-separated settings, each ','-separated KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    dev = torch.device("cuda")
    cfg, _ = optimus.make_configs("base", impl="ext")
    torch.manual_seed(0)
    model = optimus.Transformer(cfg).to(dev).to(torch.bfloat16).eval()
    prompts = torch.randint(0, optimus.EOT_ID, (args.batch, 16)).tolist()
    new_tokens = 256
    settings = [dict(kv.split("=", 1) for kv in s.split(",") if kv) for s in args.settings.split(";")]
    for r in range(args.rounds):
        for env in settings:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            decoder = optimus.Decoder(model, args.batch)
            seconds = bench.answer_seconds(model, decoder, prompts, new_tokens, dev)
            print(f"round {r} {','.join(f'{k}={v}' for k, v in env.items()) or 'defaults':60s} "
                  f"{args.batch * new_tokens / seconds:8,.0f} tokens/s  {seconds / new_tokens * 1e3:.4f} ms/token",
                  flush=True)
            del decoder
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


if __name__ == "__main__":
    main()
