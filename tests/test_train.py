"""The trainer on CPU: it learns, resumes bit for bit, and never keeps a broken checkpoint."""
import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_prep
import optimus
from conftest import ROOT, requires_cuda

SHAKESPEARE = ROOT / "texts" / "tinyshakespeare.txt"  # shipped with the repo


def write_dolly(path, n_records=240):
    """A Dolly-format JSONL whose responses are real English (Shakespeare speeches)."""
    speeches = [s.strip() for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()]
    with open(path, "w") as f:
        for i in range(n_records):
            speech = speeches[i % len(speeches)]
            record = {"instruction": f"Recite speech {i}.", "context": "", "response": speech,
                      "category": "creative_writing"}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data_prep.prepare(str(write_dolly(root / "dolly.jsonl")), str(root / "tokens"), dataset_size=0)
    return root / "tokens"


def configs(tmp_path, data_dir, **overrides):
    values = dict(impl="ref", data_dir=str(data_dir), checkpoint_dir=str(tmp_path / "ckpt"),
                  tensorboard_dir=str(tmp_path / "runs"), run_name="test", max_length=32, batch_size=4,
                  num_workers=0, device="cpu", log_interval=1, eval_interval=5, eval_batches=2)
    values.update(overrides)
    return optimus.make_configs("tiny", **values)


def metrics(tmp_path, run="test"):
    lines = (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_tiny_run_lowers_the_loss_and_records_itself(tmp_path, data_dir):
    model_cfg, train_cfg = configs(tmp_path, data_dir, max_steps=40, eval_interval=20)
    summary = optimus.train(model_cfg, train_cfg)
    rows = metrics(tmp_path)
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    val_losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(train_losses) == 40 and len(val_losses) == 2
    assert train_losses[0] > math.log(50257) - 1           # starts near uniform
    assert np.mean(train_losses[-5:]) < train_losses[0] - 2  # and learns
    assert val_losses[-1] < train_losses[0] - 2
    assert summary["step"] == 40 and (tmp_path / "ckpt" / "latest.pt").is_file()
    record = json.loads((tmp_path / "runs" / "test" / "config.json").read_text())
    assert record["torch"] == torch.__version__ and record["device"] == "cpu"
    assert record["model_config"]["dim"] == model_cfg.dim and record["data"]["format"] == "dolly"


def test_checkpoint_loads_with_weights_only(tmp_path, data_dir):
    model_cfg, train_cfg = configs(tmp_path, data_dir, max_steps=5)
    optimus.train(model_cfg, train_cfg)
    for name in ("latest.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "ckpt" / name, weights_only=True)
        assert ckpt["format_version"] == optimus.CHECKPOINT_VERSION and ckpt["step"] == 5
        assert ckpt["model_config"]["dim"] == model_cfg.dim
        assert ckpt["template"] == data_prep.DOLLY_TEMPLATE
        assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    model, ckpt = optimus.load_checkpoint(tmp_path / "ckpt")  # a directory: its best.pt
    assert ckpt["best_val_loss"] == pytest.approx(metrics(tmp_path)[-1]["val_loss"])


def stop_after(trainer, last_step):
    """Press Ctrl-C (the handler's way) during step `last_step`."""
    step = trainer.train_step

    def wrapped(batches):
        if trainer.step + 1 == last_step:
            trainer.request_stop()
        return step(batches)
    trainer.train_step = wrapped


def test_tensorboard_gets_what_metrics_jsonl_gets(tmp_path, data_dir):
    events = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                 reason="tensorboard is not installed (pip install -e '.[test]' installs it)")
    optimus.train(*configs(tmp_path, data_dir, max_steps=6, eval_interval=3))
    board = events.EventAccumulator(str(tmp_path / "runs" / "test"))
    board.Reload()
    rows = metrics(tmp_path)
    assert set(board.Tags()["scalars"]) == {key for row in rows for key in row} - {"step"}
    for key in board.Tags()["scalars"]:
        logged = [(row["step"], row[key]) for row in rows if key in row]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars(key)] == logged, key


@pytest.mark.parametrize("impl, policy", [("ref", "full"), ("ext", "full"), ("ref", "selective")])
def test_resume_continues_bit_for_bit(tmp_path, data_dir, impl, policy):
    common = dict(max_steps=12, checkpoint_interval=100, learning_rate=1e-3, impl=impl, checkpoint_policy=policy)
    optimus.train(*configs(tmp_path / "a", data_dir, **common))
    straight = torch.load(tmp_path / "a" / "ckpt" / "latest.pt", weights_only=True)

    trainer = optimus.Trainer(*configs(tmp_path / "b", data_dir, **common))
    stop_after(trainer, 5)
    assert trainer.fit()["step"] == 5
    interrupted = torch.load(tmp_path / "b" / "ckpt" / "latest.pt", weights_only=True)
    assert interrupted["step"] == 5
    assert optimus.train(*configs(tmp_path / "b", data_dir, resume=True, **common))["step"] == 12
    resumed = torch.load(tmp_path / "b" / "ckpt" / "latest.pt", weights_only=True)

    assert resumed["step"] == straight["step"] == 12
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # The loss curve continues as if the run had never stopped.
    curve_a = [r["train_loss"] for r in metrics(tmp_path / "a") if "train_loss" in r]
    curve_b = [r["train_loss"] for r in metrics(tmp_path / "b") if "train_loss" in r]
    assert curve_a == curve_b


def test_a_checkpoint_from_before_checkpoint_policy_resumes_with_either_policy(tmp_path, data_dir):
    """Checkpoints written before the field existed have no checkpoint_policy: they load, resume
    and start new runs (with the field's default), and a run may resume with another policy (it
    picks what the backward recomputes, not the math)."""
    common = dict(max_steps=6, checkpoint_interval=3, eval_interval=3)
    optimus.train(*configs(tmp_path, data_dir, max_steps=3, checkpoint_interval=3))
    path = tmp_path / "ckpt" / "latest.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_config"]["checkpoint_policy"]
    torch.save(ckpt, path)
    model, _ = optimus.load_checkpoint(path)
    assert model.cfg.checkpoint_policy == optimus.ModelConfig().checkpoint_policy == "selective"
    assert optimus.train(*configs(tmp_path, data_dir, resume=True, checkpoint_policy="full", **common))["step"] == 6
    resumed = torch.load(path, weights_only=True)
    assert resumed["model_config"]["checkpoint_policy"] == "full"
    model_cfg, _ = configs(tmp_path / "new", data_dir, init_from=str(path), checkpoint_policy="full", checkpointing=False)
    assert model_cfg.checkpoint_policy == "full" and not model_cfg.checkpointing


def test_fused_loss_training_follows_the_reference_path(tmp_path, data_dir):
    """impl=ext (the fused linear + cross-entropy, and the extension's other kernels) against
    impl=ref (F.cross_entropy on the full logits): same seed, 30 steps, every step's loss."""
    curves = {}
    for impl in ("ref", "ext"):
        optimus.train(*configs(tmp_path / impl, data_dir, impl=impl, max_steps=30, eval_interval=15))
        curves[impl] = [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in metrics(tmp_path / impl)]
    assert len([row for row in curves["ref"] if row[1] is not None]) == 30
    assert [row[0] for row in curves["ext"]] == [row[0] for row in curves["ref"]]
    for (step, train_a, val_a), (_, train_b, val_b) in zip(curves["ref"], curves["ext"]):
        for a, b in ((train_a, train_b), (val_a, val_b)):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4), (step, a, b)
    assert curves["ext"][-1][2] < curves["ext"][0][1] - 2  # and it learned


def test_clip_folded_into_fused_adamw_equals_clip_grad_norm(tmp_path, data_dir):
    """The fused AdamW step that divides by the clip factor (CUDA's path) against clip_grad_norm_
    followed by the foreach step (the CPU path), here both on the CPU, with a clip low enough to
    act at every step (a run without the clip ends elsewhere)."""
    params = {}
    for name, fused, clip in (("foreach", False, 0.05), ("fused", True, 0.05), ("unclipped", False, 0.0)):
        trainer = optimus.Trainer(*configs(tmp_path / name, data_dir, max_steps=4, gradient_clip_val=clip))
        if fused:
            groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                      for g in trainer.optimizer.param_groups]
            trainer.optimizer = torch.optim.AdamW(groups, fused=True)
        batches = iter(optimus.train_loader(trainer.windows, 0, 4, 0, pin=False))
        for _ in range(4):
            trainer.train_step(batches)
            trainer.step += 1
        params[name] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.testing.assert_close(params["fused"], params["foreach"], rtol=1e-5, atol=1e-6)
    assert (params["unclipped"] - params["foreach"]).abs().max() > 1e-3


def test_a_new_run_says_it_replaces_an_earlier_runs_checkpoints(tmp_path, data_dir, capsys):
    optimus.train(*configs(tmp_path, data_dir, max_steps=2))
    assert "of an earlier run" not in capsys.readouterr().out  # nothing there yet
    optimus.Trainer(*configs(tmp_path, data_dir, max_steps=4, run_name="second"))
    notes = [line for line in capsys.readouterr().out.splitlines() if "of an earlier run" in line]
    assert len(notes) == 1 and "latest.pt and best.pt" in notes[0] and "--resume" in notes[0]
    optimus.Trainer(*configs(tmp_path, data_dir, max_steps=4, resume=True, run_name="test"))
    assert "of an earlier run" not in capsys.readouterr().out  # resuming continues it: no note


def test_resume_refuses_a_different_data_order(tmp_path, data_dir):
    optimus.train(*configs(tmp_path, data_dir, max_steps=2))
    with pytest.raises(optimus.UserError, match="batch_size"):
        optimus.Trainer(*configs(tmp_path, data_dir, max_steps=4, resume=True, batch_size=8))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    model_cfg, train_cfg = configs(tmp_path, data_dir, max_steps=10, checkpoint_interval=2, eval_interval=100)
    trainer = optimus.Trainer(model_cfg, train_cfg)
    loss = trainer.loss

    def poisoned(forward, inputs, targets, reduction="mean"):
        value = loss(forward, inputs, targets, reduction)
        return value * float("nan") if trainer.step >= 4 and trainer.model.training else value
    monkeypatch.setattr(trainer, "loss", poisoned)
    with pytest.raises(optimus.UserError, match="non-finite"):
        trainer.fit()
    kept = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    assert kept["step"] == 4
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_lr_schedule_warmup_then_cosine():
    cfg = optimus.TrainingConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert optimus.lr_at(0, cfg, total) == pytest.approx(0.1)
    assert optimus.lr_at(9, cfg, total) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 110):
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert optimus.lr_at(step, cfg, total) == pytest.approx(expected)


def test_windows_are_deterministic_and_disjoint_across_ranks(tmp_path):
    tokens = np.arange(1000, dtype="<u2")
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    whole = optimus.TrainWindows(path, max_length=10, batch_size=8, micro_batch=2, seed=1)
    assert whole.num_windows == 99 and whole.accum == 4
    window = lambda item: torch.cat([item[0], item[1][:, -1:]], dim=1)   # inputs + last target: the window
    global_batch = torch.cat([window(whole[3 * 4 + a]) for a in range(4)])  # step 3, all micro-steps
    ranks = [optimus.TrainWindows(path, 10, 8, 2, seed=1, rank=r, world=2) for r in range(2)]
    per_rank = [torch.cat([window(w[3 * 2 + a]) for a in range(2)]) for w in ranks]
    starts = lambda rows: sorted(int(r[0]) for r in rows)
    assert starts(torch.cat(per_rank)) == starts(global_batch)            # same global batch
    assert not set(starts(per_rank[0])) & set(starts(per_rank[1]))        # no shared rows
    for row in global_batch:                                              # windows of the stream
        assert int(row[0]) % 10 == 0 and torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 11))
    inputs, targets = whole[7]                                            # targets: the next tokens
    assert inputs.shape == targets.shape == (2, 10) and torch.equal(targets[:, :-1], inputs[:, 1:])
    first_epoch = torch.cat([window(whole[i]) for i in range(12 * 4)])    # 12 steps = 96 windows
    assert len(set(starts(first_epoch))) == 96                             # no window twice in an epoch
    assert all(torch.equal(a, b) for a, b in zip(whole[5], optimus.TrainWindows(path, 10, 8, 2, seed=1)[5]))


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "optimus.py"), *args], capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_cli_prepares_data_then_trains(tmp_path):
    source = write_dolly(tmp_path / "dolly.jsonl", 60)
    result = run_cli("train", "--preset", "tiny", "--impl", "ref", "--max_steps", "3", "--max_length", "32",
                     "--data_input", str(source), "--data_dir", str(tmp_path / "tokens"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "preparing them first" in result.stdout and "step 3/3" in result.stdout
    # The first step is reported as soon as it ends (log_interval is 5), with a rough estimate.
    assert "step 1/3 | loss " in result.stdout and "eta at most" in result.stdout
    assert result.stdout.index("step 1/3") < result.stdout.index("step 3/3")
    assert (tmp_path / "checkpoints" / "latest.pt").is_file()
    assert (tmp_path / "tokens" / "meta.json").is_file()

    again = run_cli("train", "--preset", "tiny", "--impl", "ref", "--resume", "--max_length", "64",
                    "--data_dir", str(tmp_path / "tokens"), cwd=tmp_path)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "max_length" in errors[0], again.stderr


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "optimus.py"), "train", "--preset", "tiny", "--impl", "ref",
         "--max_steps", "100000", "--max_length", "32", "--log_interval", "1", "--data_dir", str(data_dir)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("step 2/"):
                process.send_signal(signal.SIGINT)
                break
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped at step" in out
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] >= 2


@requires_cuda
def test_cuda_run_with_autocast_and_batch_finder(tmp_path, data_dir):
    model_cfg, train_cfg = configs(tmp_path, data_dir, device="cuda", impl="auto", max_steps=30,
                                   eval_interval=30, compile="false")
    summary = optimus.train(model_cfg, train_cfg)
    rows = metrics(tmp_path)
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert summary["micro_batch"] == 4  # a tiny model: the whole batch fits
    assert np.mean(train_losses[-5:]) < train_losses[0] - 2
    assert "mfu" in rows[-2] or "mfu" in rows[-1] or optimus.peak_flops(torch.device("cuda")) is None
    model, _ = optimus.load_checkpoint(tmp_path / "ckpt", "cuda")
    assert model.tok_emb.weight.dtype == torch.float32  # master weights stay float32 under autocast


def test_data_input_never_trains_on_another_sources_tokens(tmp_path, capsys):
    tokens = tmp_path / "data" / "dolly"
    first, other = write_dolly(tmp_path / "first.jsonl", 30), write_dolly(tmp_path / "mine.jsonl", 40)
    cfg = optimus.TrainingConfig(data_dir=str(tokens), data_input=str(first), dataset_size=0)
    assert optimus.ensure_token_files(cfg, optimus.DistEnv())["source"]["path"] == str(first)
    before = (tokens / "train.bin").read_bytes()
    cfg = optimus.TrainingConfig(data_dir=str(tokens), data_input=str(other), dataset_size=0)
    with pytest.raises(optimus.UserError) as info:
        optimus.ensure_token_files(cfg, optimus.DistEnv())
    message = str(info.value)
    assert str(first) in message and str(other) in message
    assert f"--data_dir {tmp_path / 'data' / 'mine'}" in message and f"delete {tokens}" in message
    assert (tokens / "train.bin").read_bytes() == before  # nothing was overwritten
    # The same source again is fine (prepare finds its tokens up to date).
    cfg = optimus.TrainingConfig(data_dir=str(tokens), data_input=str(first), dataset_size=0)
    assert optimus.ensure_token_files(cfg, optimus.DistEnv())["source"]["path"] == str(first)


def test_preparing_part_of_the_users_file_says_so(tmp_path, capsys):
    source = write_dolly(tmp_path / "mine.jsonl", 40)
    cfg = optimus.TrainingConfig(data_dir=str(tmp_path / "tokens"), data_input=str(source), dataset_size=25)
    meta = optimus.ensure_token_files(cfg, optimus.DistEnv())
    assert meta["counts"]["records_train"] + meta["counts"]["records_val"] == 25
    out = capsys.readouterr().out
    assert "note: training on 25 of the 40 records" in out and "--dataset_size 25; 0 takes them all" in out
    cfg = optimus.TrainingConfig(data_dir=str(tmp_path / "all"), data_input=str(source), dataset_size=0)
    optimus.ensure_token_files(cfg, optimus.DistEnv())
    assert "note: training on" not in capsys.readouterr().out


def test_failed_download_names_trains_flag(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def no_network(url, timeout=None):
        raise urllib.error.URLError("no network here")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cfg = optimus.TrainingConfig(data_dir=str(tmp_path / "data" / "dolly"))
    with pytest.raises(optimus.UserError, match="pass it with --data_input FILE"):
        optimus.ensure_token_files(cfg, optimus.DistEnv())


def test_a_model_too_big_for_the_cpu_is_announced():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    note = optimus.slow_device_note(141_700_000, cpu)  # the base model (README: 141.7M parameters)
    assert note.startswith("note: 141.7M parameters on a CPU") and "GPU" in note and "--preset tiny" in note
    assert optimus.slow_device_note(141_700_000, cuda) is None
    tiny_cfg, _ = optimus.make_configs("tiny")
    assert optimus.slow_device_note(optimus.Transformer(tiny_cfg).num_params(), cpu) is None


def test_more_workers_than_cpus_are_lowered_with_one_note(monkeypatch, capsys):
    monkeypatch.setattr(optimus.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert optimus.loader_workers(4) == 2
    assert capsys.readouterr().out == "note: num_workers 4 is more than the 2 CPUs here: using 2\n"
    assert (optimus.loader_workers(2), optimus.loader_workers(0), optimus.loader_workers(4, say=False)) == (2, 0, 2)
    assert capsys.readouterr().out == ""


def test_extension_optimizer_step_equals_clip_grad_norm_then_adamw(tmp_path, data_dir):
    """The trainer's adamw_step (impl ext) against its torch path (clip_grad_norm_, then
    torch.optim.AdamW) on the same model and batches, with a clip that acts at every step; its
    state is torch's AdamW state, so the checkpoint resumes with the other path."""
    params, trainers = {}, {}
    for name in ("ext", "ref"):
        trainer = optimus.Trainer(*configs(tmp_path / name, data_dir, impl="ext", max_steps=4, gradient_clip_val=0.05,
                                           learning_rate=1e-3, checkpoint_interval=4, eval_interval=4))
        assert trainer.step_impl == "ext"
        trainer.step_impl = name
        batches = iter(optimus.train_loader(trainer.windows, 0, 4, 0, pin=False))
        for _ in range(4):
            trainer.train_step(batches)
            trainer.step += 1
        params[name] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        trainers[name] = trainer
    torch.testing.assert_close(params["ext"], params["ref"], rtol=1e-5, atol=1e-6)
    states = [trainers[name].optimizer.state_dict()["state"] for name in ("ext", "ref")]
    assert states[0].keys() == states[1].keys()
    for a, b in zip(states[0].values(), states[1].values()):
        assert float(a["step"]) == float(b["step"]) == 4
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    trainers["ext"].save("latest.pt")
    common = dict(impl="ref", max_steps=6, gradient_clip_val=0.05, learning_rate=1e-3)
    assert optimus.train(*configs(tmp_path / "ext", data_dir, resume=True, **common))["step"] == 6

@requires_cuda
def test_cuda_fused_loss_training_follows_the_reference_path(tmp_path, data_dir):
    """On the GPU, under bf16 autocast: both paths round their matmuls to bf16 in different places
    (the fused path rounds the logits' gradient, the reference its float32 copy), so the curves
    agree to bf16 noise, not to 1e-4."""
    curves = {}
    for impl in ("ref", "ext"):
        optimus.train(*configs(tmp_path / impl, data_dir, device="cuda", impl=impl, compile="false",
                               max_steps=30, eval_interval=30))
        curves[impl] = [r["train_loss"] for r in metrics(tmp_path / impl) if "train_loss" in r]
    assert len(curves["ref"]) == len(curves["ext"]) == 30
    for step, (a, b) in enumerate(zip(curves["ref"], curves["ext"])):
        assert abs(a - b) < 2e-2 * a, (step, a, b)
    assert curves["ext"][-1] < curves["ext"][0] - 2


def test_a_missing_meta_json_is_named_not_called_no_token_files(tmp_path, capsys):
    source = write_dolly(tmp_path / "mine.jsonl", 30)
    cfg = optimus.TrainingConfig(data_dir=str(tmp_path / "tokens"), data_input=str(source), dataset_size=0)
    optimus.ensure_token_files(cfg, optimus.DistEnv())
    assert "no token files in" in capsys.readouterr().out
    (tmp_path / "tokens" / "meta.json").unlink()
    meta = optimus.ensure_token_files(cfg, optimus.DistEnv())
    out = capsys.readouterr().out
    assert f"meta.json missing in {tmp_path / 'tokens'}" in out and "no token files" not in out
    assert meta["source"]["path"] == str(source)


def test_cuda_graph_is_checked_like_the_other_fields(tmp_path, data_dir):
    with pytest.raises(optimus.UserError, match="cuda_graph must be auto, true, false or reduce-overhead"):
        configs(tmp_path, data_dir, cuda_graph="yes")
    for wanted in ("true", "reduce-overhead"):  # the CPU never takes a graph path: one clear error
        with pytest.raises(optimus.UserError, match=f"--cuda_graph {wanted} needs CUDA.*--cuda_graph auto"):
            optimus.Trainer(*configs(tmp_path, data_dir, cuda_graph=wanted))
    trainer = optimus.Trainer(*configs(tmp_path, data_dir, cuda_graph="auto"))
    assert trainer.graph_mode == "off" and not trainer.optimizer.defaults["capturable"]


def graph_configs(tmp_path, data_dir, **overrides):
    """Tiny CUDA runs that accumulate two micro-batches with checkpointing on (the preset's)."""
    values = dict(device="cuda", impl="auto", compile="false", batch_size=4, micro_batch_size=2,
                  learning_rate=1e-3, eval_interval=100, checkpoint_interval=100)
    return configs(tmp_path, data_dir, **{**values, **overrides})


@requires_cuda
def test_cuda_graph_training_follows_the_eager_path(tmp_path, data_dir):
    """The whole step replayed from a CUDA graph against the eager step: same seed, 10 steps.
    capturable AdamW computes its bias corrections on the device (the eager one on the host), so
    the curves agree to bf16 noise, not bit for bit."""
    curves = {}
    for graph in ("false", "true"):
        optimus.train(*graph_configs(tmp_path / graph, data_dir, cuda_graph=graph, max_steps=10))
        curves[graph] = [r["train_loss"] for r in metrics(tmp_path / graph) if "train_loss" in r]
    assert len(curves["true"]) == len(curves["false"]) == 10
    assert len(set(curves["true"])) == 10  # a loss per step, not one tensor read ten times
    for step, (a, b) in enumerate(zip(curves["false"], curves["true"])):
        assert abs(a - b) < 2e-2 * a, (step, a, b)
    model, _ = optimus.load_checkpoint(tmp_path / "true" / "ckpt", "cuda")
    ckpt = torch.load(tmp_path / "true" / "ckpt" / "latest.pt", weights_only=True)
    assert all(type(g["lr"]) is float and not g["capturable"] for g in ckpt["optimizer"]["param_groups"])
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 10


@requires_cuda
def test_cuda_selective_checkpointing_follows_full_checkpointing(tmp_path, data_dir):
    """checkpoint_policy selective, eager and compiled, each with the whole step in a CUDA graph,
    against eager full checkpointing without a graph: same seed, 10 steps, losses within bf16 noise."""
    curves = {}
    for name, fields in (("eager-full", dict(checkpoint_policy="full", cuda_graph="false")),
                         ("graph-selective", dict(checkpoint_policy="selective", cuda_graph="true")),
                         ("compiled-graph-selective", dict(checkpoint_policy="selective", cuda_graph="true",
                                                           compile="true"))):
        optimus.train(*graph_configs(tmp_path / name, data_dir, max_steps=10, **fields))
        curves[name] = [r["train_loss"] for r in metrics(tmp_path / name) if "train_loss" in r]
    assert all(len(curve) == 10 for curve in curves.values())
    for name in ("graph-selective", "compiled-graph-selective"):
        for step, (a, b) in enumerate(zip(curves["eager-full"], curves[name])):
            assert abs(a - b) < 2e-2 * a, (name, step, a, b)


@requires_cuda
def test_cuda_graph_auto_captures_small_compiled_steps_only(tmp_path, data_dir, monkeypatch):
    def mode(**overrides):  # graph_configs: batch 4 x max_length 32
        return optimus.Trainer(*graph_configs(tmp_path, data_dir, cuda_graph="auto", **overrides)).graph_mode
    monkeypatch.setattr(optimus, "GRAPH_AUTO_MAX_TOKENS", 4 * 32)
    assert mode(compile="true") == "step"
    assert mode(compile="false") == "off"  # measured compiled only
    monkeypatch.setattr(optimus, "GRAPH_AUTO_MAX_TOKENS", 4 * 32 - 1)
    assert mode(compile="true") == "off"


@requires_cuda
def test_cuda_graph_resume_continues_bit_for_bit(tmp_path, data_dir):
    """Deterministic kernels (flash attention's backward adds atomically otherwise): a run stopped
    at step 4 and resumed with the graph ends where the straight graph run ends."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        common = dict(cuda_graph="true", max_steps=8)
        optimus.train(*graph_configs(tmp_path / "a", data_dir, **common))
        trainer = optimus.Trainer(*graph_configs(tmp_path / "b", data_dir, **common))
        stop_after(trainer, 4)
        assert trainer.fit()["step"] == 4
        assert optimus.train(*graph_configs(tmp_path / "b", data_dir, resume=True, **common))["step"] == 8
    finally:
        torch.use_deterministic_algorithms(False)
    straight, resumed = (torch.load(tmp_path / r / "ckpt" / "latest.pt", weights_only=True) for r in "ab")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    curve_a = [r["train_loss"] for r in metrics(tmp_path / "a") if "train_loss" in r]
    curve_b = [r["train_loss"] for r in metrics(tmp_path / "b") if "train_loss" in r]
    assert curve_a == curve_b
