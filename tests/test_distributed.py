"""Several processes (torchrun, gloo on CPU) train like one process with the same global batch."""
import json
import subprocess
import sys

import torch

import optimus
from conftest import ROOT
from test_train import write_dolly

COMMON = ["train", "--preset", "tiny", "--impl", "ref", "--device", "cpu", "--max_steps", "6",
          "--max_length", "32", "--batch_size", "4", "--log_interval", "1", "--eval_interval", "3",
          "--eval_batches", "2", "--learning_rate", "3e-3"]


def curve(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in rows for key in ("train_loss", "val_loss") if key in r]


def test_two_ranks_match_one_process(tmp_path):
    data = tmp_path / "tokens"
    source = write_dolly(tmp_path / "dolly.jsonl", 120)
    runs = {
        "single": [sys.executable, str(ROOT / "optimus.py")],
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "optimus.py")],
    }
    for name, launcher in runs.items():  # the first run also prepares the data
        result = subprocess.run(
            [*launcher, *COMMON, "--data_input", str(source), "--data_dir", str(data),
             "--checkpoint_dir", str(tmp_path / name), "--tensorboard_dir", str(tmp_path / "runs"),
             "--run_name", name], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "micro-batch" not in result.stdout  # the CPU takes the whole per-rank batch
    single, ddp = curve(tmp_path / "runs" / "single"), curve(tmp_path / "runs" / "ddp")
    assert [row[:2] for row in single] == [row[:2] for row in ddp] and len(single) == 8
    for (_, _, a), (_, _, b) in zip(single, ddp):
        assert abs(a - b) < 1e-4 * abs(a)
    assert single[-1][2] < single[0][2]  # it trained

    # The DDP checkpoint is the plain model: it loads in one process, equal to the single run.
    model_ddp, ckpt = optimus.load_checkpoint(tmp_path / "ddp" / "latest.pt")
    model_one, _ = optimus.load_checkpoint(tmp_path / "single" / "latest.pt")
    assert ckpt["step"] == 6 and all(not k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    for (name, a), b in zip(model_one.state_dict().items(), model_ddp.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
