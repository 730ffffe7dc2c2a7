"""The kernels of one training step of the default model (T 512, bf16 autocast, compiled), by
time: the trainer's own step, as bench.py --only train runs it, on random tokens.

    python tools/train_kernels.py [--batch 64] [--checkpointing false] [--top 30]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import optimus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--checkpointing", default="false")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    dev = torch.device("cuda")
    steps = 4
    with tempfile.TemporaryDirectory() as tmp:
        data = bench.random_token_dir(Path(tmp), 4_000_000)
        model_cfg, train_cfg = optimus.make_configs(
            "base", impl="auto", compile="true", device="cuda", data_dir=str(data), num_workers=2,
            checkpoint_dir=str(Path(tmp) / "ckpt"), tensorboard_dir=str(Path(tmp) / "runs"), max_steps=1000,
            eval_batches=1, batch_size=args.batch, checkpointing=args.checkpointing == "true")
        trainer = optimus.Trainer(model_cfg, train_cfg)
        batches = iter(optimus.train_loader(trainer.windows, 0, 1000, 2, pin=True))
        for _ in range(3):
            trainer.train_step(batches)
        kernels = sorted(bench.profiled_kernels(lambda i: trainer.train_step(batches), dev, steps), key=lambda k: -k[1])
        total = sum(us for _, us, _ in kernels) / steps
        print(f"batch {args.batch}: {total / 1e3:.2f} ms of kernels per step, "
              f"{sum(n for _, _, n in kernels) / steps:.0f} launches")
        for name, us, n in kernels[: args.top]:
            print(f"  {us / steps / 1e3:7.3f} ms {n / steps:5.1f}x  [{bench.train_part(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
