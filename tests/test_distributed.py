"""Several processes (torchrun, gloo on CPU) train like one process with the same global batch."""
import json
import subprocess
import sys

import pytest
import torch

import optimus
from conftest import ROOT
from test_train import write_dolly

COMMON = ["train", "--preset", "tiny", "--device", "cpu", "--max_steps", "6",
          "--max_length", "32", "--batch_size", "4", "--log_interval", "1", "--eval_interval", "3",
          "--eval_batches", "2", "--learning_rate", "3e-3"]


def curve(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in rows for key in ("train_loss", "val_loss") if key in r]


@pytest.mark.parametrize("impl", ["ref", "ext"])  # ext: the fused loss's gradients reach DDP's hooks too
def test_two_ranks_match_one_process(tmp_path, impl):
    data = tmp_path / "tokens"
    source = write_dolly(tmp_path / "dolly.jsonl", 120)
    runs = {
        "single": [sys.executable, str(ROOT / "optimus.py")],
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "optimus.py")],
    }
    for name, launcher in runs.items():  # the first run also prepares the data
        result = subprocess.run(
            [*launcher, *COMMON, "--impl", impl, "--data_input", str(source), "--data_dir", str(data),
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


def test_two_ranks_resume_bit_for_bit(tmp_path):
    """A torchrun job stopped at step 3 and resumed to step 6 ends where an unbroken one does.

    A constant learning rate (no warmup, min_lr_ratio 1) lets the first leg end at step 3 with
    --max_steps 3 on the same schedule as the unbroken run."""
    source = write_dolly(tmp_path / "dolly.jsonl", 120)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "optimus.py"), *COMMON, "--impl", "ref", "--data_input", str(source), "--data_dir", str(tmp_path / "tokens"),
                "--warmup_steps", "0", "--min_lr_ratio", "1", "--tensorboard_dir", str(tmp_path / "runs")]
    legs = {"straight": [["--max_steps", "6"]], "resumed": [["--max_steps", "3"], ["--max_steps", "6", "--resume"]]}
    for name, runs in legs.items():
        for extra in runs:
            result = subprocess.run([*torchrun, "--checkpoint_dir", str(tmp_path / name), "--run_name", name, *extra],
                                    capture_output=True, text=True, timeout=600, cwd=tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    straight = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "latest.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # One metrics file per run name: the resumed leg appended to the first leg's curve.
    assert curve(tmp_path / "runs" / "straight") == curve(tmp_path / "runs" / "resumed")
