"""Several processes (torchrun, gloo on CPU) train like one process with the same global batch."""
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimus
from conftest import ROOT
from test_train import write_dolly

COMMON = ["train", "--preset", "tiny", "--device", "cpu", "--max_steps", "6",
          "--max_length", "32", "--batch_size", "4", "--log_interval", "1", "--eval_interval", "3",
          "--eval_batches", "2", "--learning_rate", "3e-3"]


# A leg takes 8-20 s on a loaded 2-CPU machine. One hung in about eight full-suite runs, past this
# limit, with no trace of where; ~200 legs under load (2 busy loops, ranks on one CPU) did not
# hang again (2026-12-03).
LEG_TIMEOUT_S = 600
STACKS_TIMEOUT_S = 60  # for the stacks to arrive (faulthandler writes them in milliseconds)


def run_leg(command: list[str], cwd) -> subprocess.CompletedProcess:
    """subprocess.run(command), output captured. Past LEG_TIMEOUT_S it fails with the Python stacks
    of every thread of torchrun and its ranks: SIGABRT makes faulthandler write them to stderr."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"}) as proc:
        try:
            out, err = proc.communicate(timeout=LEG_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")  # the ranks: own sessions
            ranks = children.read_text().split() if children.exists() else []
            for pid in [*map(int, ranks), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=STACKS_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # another process holds the pipes: keep what came
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"hung past {LEG_TIMEOUT_S} s: {' '.join(command)}\n{out}\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


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
        result = run_leg(
            [*launcher, *COMMON, "--impl", impl, "--data_input", str(source), "--data_dir", str(data),
             "--checkpoint_dir", str(tmp_path / name), "--tensorboard_dir", str(tmp_path / "runs"),
             "--run_name", name], tmp_path)
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
            result = run_leg([*torchrun, "--checkpoint_dir", str(tmp_path / name), "--run_name", name, *extra],
                             tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    straight = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "latest.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # One metrics file per run name: the resumed leg appended to the first leg's curve.
    assert curve(tmp_path / "runs" / "straight") == curve(tmp_path / "runs" / "resumed")


def test_fsdp_matches_one_process_and_resumes_bit_for_bit(tmp_path):
    """FSDP2 over two gloo ranks: the losses and final weights of one process (float32 noise: the
    reduce-scatter sums in another order), an exact resume, and a checkpoint sample and export read."""
    source = write_dolly(tmp_path / "dolly.jsonl", 120)
    common = [*COMMON, "--data_input", str(source), "--data_dir", str(tmp_path / "tokens"),
              "--warmup_steps", "0", "--min_lr_ratio", "1", "--tensorboard_dir", str(tmp_path / "runs")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "optimus.py")]
    legs = {
        "single": [[sys.executable, str(ROOT / "optimus.py"), *common, "--max_steps", "6"]],
        "fsdp": [[*torchrun, *common, "--parallel", "fsdp", "--max_steps", "6"]],
        "resumed": [[*torchrun, *common, "--parallel", "fsdp", "--max_steps", "3"],
                    [*torchrun, *common, "--parallel", "fsdp", "--max_steps", "6", "--resume"]],
    }
    for name, runs in legs.items():
        for command in runs:
            result = run_leg([*command, "--checkpoint_dir", str(tmp_path / name), "--run_name", name], tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
    single, fsdp = curve(tmp_path / "runs" / "single"), curve(tmp_path / "runs" / "fsdp")
    assert [row[:2] for row in single] == [row[:2] for row in fsdp] and len(single) == 8
    for (_, _, a), (_, _, b) in zip(single, fsdp):
        assert abs(a - b) < 1e-4 * abs(a)

    one = torch.load(tmp_path / "single" / "latest.pt", weights_only=True)
    sharded = torch.load(tmp_path / "fsdp" / "latest.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "latest.pt", weights_only=True)
    assert one["model"].keys() == sharded["model"].keys()
    for name, tensor in one["model"].items():
        # AdamW divides by sqrt(v): in embedding rows whose gradients are nearly zero, the float32
        # noise of another summation order grows into steps of up to lr (3e-3); 1e-4 is 3% of that.
        torch.testing.assert_close(sharded["model"][name], tensor, rtol=1e-4, atol=1e-4, msg=name)
        assert torch.equal(sharded["model"][name], resumed["model"][name]), name
    # The optimizer state is in one process's layout (parameters by index), full size.
    assert one["optimizer"]["state"].keys() == sharded["optimizer"]["state"].keys()
    for i, state in one["optimizer"]["state"].items():
        assert sharded["optimizer"]["state"][i]["exp_avg"].shape == state["exp_avg"].shape
    assert curve(tmp_path / "runs" / "fsdp") == curve(tmp_path / "runs" / "resumed")

    # sample and export read it like any other checkpoint.
    result = subprocess.run([sys.executable, str(ROOT / "optimus.py"), "sample", "--ckpt", str(tmp_path / "fsdp"),
                             "--prompt", "Hello", "--max_new_tokens", "5", "--temperature", "0", "--device", "cpu",
                             "--impl", "ref"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = optimus.export_hf(tmp_path / "fsdp" / "latest.pt", tmp_path / "hf")
    assert (out / "model.safetensors").is_file()
