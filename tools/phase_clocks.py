"""Where the batch-1 decoding step's time goes inside its persistent kernels: decode_tail's and the
cluster sampler's phase clocks (csrc/phase_clocks.h), from replays of a Decoder's sampling graph.

Builds the extension with OPTIMUS_PHASE_CLOCKS=1 into its own TORCH_EXTENSIONS_DIR (a subfolder
`phase_clocks` of the usual one, so the ordinary build is kept), runs the default model (bf16,
random weights, a 16-token prompt, temperature 0.8, top-p 0.9) for a few warm steps, then prints
each kernel's lines for --steps replays: per launch, blocks 0 and last of decode_tail (8 a step)
and ranks 0 and last of the sampler's cluster, as cycles between points, then the median over
the replays and layers in microseconds at the SM clock nvidia-smi reports.

    python3 tools/phase_clocks.py [--steps 8]
"""
import argparse
import ctypes
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

os.environ["OPTIMUS_PHASE_CLOCKS"] = "1"
_base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
if _base.name != "phase_clocks":  # the child process below inherits the parent's folder as it is
    os.environ["TORCH_EXTENSIONS_DIR"] = str(_base / "phase_clocks")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optimus  # noqa: E402

# The intervals each kernel prints, in order (csrc/decode_tail.cu, csrc/sample.cu).
POINTS = {
    "decode_tail": ["issue weight copies", "pdl wait", "stage y", "wait wo", "C: wo", "barrier 0",
                    "stage+norm x1", "wait gate-up", "D: gate-up", "barrier 1", "stage h", "wait down",
                    "E: down", "barrier 2", "F: next qkv"],
    "sample": ["pdl wait", "load + block max", "max barrier", "top-p digit 1", "top-p digit 2",
               "race in block", "race barrier"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("phase_clocks needs a CUDA GPU")
    dev = torch.device("cuda")
    optimus.load_extension()
    cfg, _ = optimus.make_configs("base", impl="ext")
    torch.manual_seed(0)
    model = optimus.Transformer(cfg).to(dev).to(torch.bfloat16).eval()
    decoder = optimus.Decoder(model, 1)
    gen = torch.Generator(dev).manual_seed(0)
    padded = torch.full((1, optimus.PREFILL_BUCKET), optimus.EOT_ID, dtype=torch.long)
    padded[0, :16] = torch.randint(0, optimus.EOT_ID, (16,))
    lengths = torch.tensor([16], device=dev)
    logits = decoder.prefill(padded.to(dev), lengths)
    token = optimus.sample_next(logits, 0.8, 0.9, 0, gen, impl="auto")
    decoder.begin(token, lengths, torch.zeros(1, dtype=torch.bool, device=dev), logits.shape[1])
    for _ in range(32):  # the capture and warm steps (their lines are printed too, then dropped)
        decoder.sample_step(0.8, 0.9, 0, gen, None)
    libc = ctypes.CDLL(None)
    torch.cuda.synchronize()
    libc.fflush(None)  # the kernels' lines so far, before the marker (C's stdout is buffered apart)
    print("=== measured replays", flush=True)
    for _ in range(args.steps):
        decoder.sample_step(0.8, 0.9, 0, gen, None)
        torch.cuda.synchronize()
    libc.fflush(None)
    clock = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True).stdout.split()
    print("=== end", clock[0] if clock else "1980", flush=True)


def summarize(lines: list[str], mhz: float) -> None:
    rows: dict[tuple[str, str], list[list[int]]] = {}
    for line in lines:
        m = re.match(r"(decode_tail|sample) (\d+) (\d+): (.*)", line)
        if m:
            kernel, block, n = m.group(1), int(m.group(2)), int(m.group(3))
            which = "first" if block == 0 else "last"
            rows.setdefault((kernel, which), []).append(list(map(int, m.group(4).split()))[: n - 1])
    for (kernel, which), samples in sorted(rows.items()):
        names = POINTS[kernel]
        width = max(map(len, samples))
        meds = [statistics.median(s[i] for s in samples if len(s) > i) / mhz for i in range(width)]
        print(f"{kernel} ({which} block, {len(samples)} launches), us at {mhz:.0f} MHz, total {sum(meds):.2f}:")
        for name, us in zip(names, meds):
            print(f"  {name:22s} {us:7.2f}")


if __name__ == "__main__":
    if os.environ.get("PHASE_CLOCKS_CHILD") == "1":
        main()
    else:  # the kernels' printf goes to the process's stdout: run in a child, read it, summarise
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:]], capture_output=True, text=True,
                             env={**os.environ, "PHASE_CLOCKS_CHILD": "1"})
        text = out.stdout
        sys.stderr.write(out.stderr[-3000:] if out.returncode else "")
        measured, _, tail = text.split("=== measured replays", 1)[-1].partition("=== end")
        measured = measured.splitlines()
        mhz = float(tail.split()[0]) if tail.split() else 1980.0  # the SM clock just after the replays
        for line in measured[:40]:
            print(line)
        summarize(measured, mhz)
        sys.exit(out.returncode)
