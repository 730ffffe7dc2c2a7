"""Nothing a user or a file can do ends in a traceback, a hang, a silent wrong answer or lost data.

The fuzz test drives the command line only through `optimus.main(argv)` and `data_prep.main(argv)`
(plus a few subprocesses), so it holds for any CLI that keeps the contract: exit 0 with a valid
result, or a non-zero exit with exactly one `error:` line on stderr; never a traceback or a hang;
no file outside the run's own directory changes. The named tests below are the crafted
checkpoints and broken data directories that once crashed or loaded wrong bytes.

A larger run, outside pytest: python tests/test_fuzz.py --runs 400 --seed 1
"""
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT  # first: run as a script, this puts the checkout's optimus on sys.path
import data_prep
import optimus

RUNS = int(os.environ.get("OPTIMUS_FUZZ_RUNS", "40"))  # CI-sized; the README's larger run uses 400
SEED = int(os.environ.get("OPTIMUS_FUZZ_SEED", "0"))
RUN_TIMEOUT_S = 120  # a run that takes longer counts as a hang

WORDS = "the king of a good man and my lord what is this that you will not say to me".split()


def write_dolly(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Say line {i}.", "context": "",
                                "response": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    return path


def tiny(root: Path, **overrides):
    """Tiny configs writing under `root`, on the CPU reference kernels (no extension build)."""
    values = dict(impl="ref", device="cpu", data_dir=str(root / "tokens"), checkpoint_dir=str(root / "ckpt"),
                  tensorboard_dir=str(root / "runs"), run_name="r", max_length=32, batch_size=4, num_workers=0,
                  log_interval=1, eval_interval=2, eval_batches=1, compile="false", max_steps=2)
    values.update(overrides)
    return optimus.make_configs("tiny", **values)


def make_world(root: Path) -> Path:
    """Read-only inputs every case shares: token files, a trained checkpoint, input files."""
    write_dolly(root / "dolly.jsonl")
    data_prep.prepare(str(root / "dolly.jsonl"), str(root / "tokens"), dataset_size=0)
    optimus.train(*tiny(root, max_steps=3))
    (root / "plain.txt").write_text(" ".join(WORDS * 40))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": " ".join(WORDS[i:])}) + "\n" for i in range(8)))
    (root / "deep.jsonl").write_text("[" * 200_000 + "\n" + (root / "dolly.jsonl").read_text())
    (root / "empty.jsonl").write_text("")
    (root / "garbage.pt").write_bytes(os.urandom(4000))
    (root / "emptydir").mkdir()
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


# ----------------------------------------------------------------------------- running a command line


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def run_inprocess(argv: list[str], cwd: Path) -> tuple[int, str, str, str | None]:
    """(exit code, stdout, stderr, the exception that escaped or None) of one command line."""
    entry = data_prep.main if argv[:1] == ["data_prep"] else optimus.main
    args = argv[1:] if argv[:1] == ["data_prep"] else argv
    out, err, escaped = io.StringIO(), io.StringIO(), None
    old_cwd, old_stdin = os.getcwd(), sys.stdin
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(RUN_TIMEOUT_S)
    try:
        os.chdir(cwd)
        sys.stdin = io.StringIO("")  # sample without --prompt reads to end of input
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry(args)
            except SystemExit as exc:  # argparse's way out
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Hang:
        code, escaped = -1, "hang"
    except BaseException as exc:  # the contract is broken: keep what escaped
        code, escaped = -1, f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
        sys.stdin = old_stdin
    return code or 0, out.getvalue(), err.getvalue(), escaped


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if any(k in p.name for k in (".tmp", ".old", ".part"))]


# ----------------------------------------------------------------------------- random command lines
# Per flag: values that must work, values that must be refused, values that may do either.


def train_flags(w: Path) -> dict:
    huge = str(10**13)
    return {
        "max_steps": (["1", "2", "3"], ["-5", "x", "1.5", "nan", str(2**70)], []),
        "dim": (["32", "48"], ["0", "-8", "12", huge], []),
        "depth": (["1", "3"], ["0", "-1", str(10**9)], []),
        "num_heads": (["2", "4"], ["0", "-4", "3"], []),
        "num_kv_heads": (["1", "2"], ["0", "3", "-2"], []),
        "vocab_size": (["50257", "50304"], ["0", "-1", "100", huge], []),
        "vocab_multiple": (["1", "128"], ["0", "-64"], []),
        "multiple_of": (["32", "256"], ["0", "-1"], []),
        "hidden_dim": (["0", "100"], ["-5", huge], []),
        "max_seq_len": (["64", "128"], ["1", "0", "16", huge], []),
        "rope_theta": (["500.0", "10000"], ["0", "-1", "nan", "inf"], []),
        "norm_eps": (["1e-6"], ["0", "-1e-5", "nan"], []),
        "tie_embeddings": (["true", "false", "0"], ["maybe"], []),
        "checkpointing": (["true", "false"], ["2"], []),
        "checkpoint_policy": (["full", "selective"], ["some", "", "FULL"], []),
        "batch_size": (["1", "2", "4"], ["0", "-1", str(10**9)], []),
        "max_length": (["16", "32"], ["1", "0", "-3", "200"], []),
        "learning_rate": (["1e-3", "0.003"], ["-1", "0", "nan", "inf"], []),
        "weight_decay": (["0", "0.1"], ["-0.1", "nan"], []),
        "num_epochs": (["1", "2"], ["0", "-1"], []),
        "gradient_clip_val": (["0", "1.0"], ["-1", "nan", "inf"], []),
        "num_workers": (["0"], ["-1", "100000"], ["1"]),
        "warmup_steps": (["0", "2"], ["-1"], []),
        "min_lr_ratio": (["0", "0.5", "1"], ["-0.1", "nan", "1.5"], []),
        "beta1": (["0", "0.5"], ["1", "-0.1", "1.5", "nan"], []),
        "beta2": (["0.99"], ["1.0", "2"], []),
        "micro_batch_size": (["0"], ["-1", "3"], []),
        "eval_interval": (["1", "2"], ["0", "-1"], []),
        "checkpoint_interval": (["1", "2"], ["0", "-1"], []),
        "log_interval": (["1", "2"], ["0", "-1"], []),
        "eval_batches": (["1", "2"], ["0", "-2"], []),
        "seed": (["0", "7", str(2**63 - 1)], ["-1", str(2**63), str(2**64), "x"], []),
        "compile": (["false"], ["maybe"], []),
        "cuda_graph": (["false", "auto"], ["maybe", "yes"], ["true", "reduce-overhead"]),  # refused on a CPU
        "device": (["cpu"], ["cpu:3", "cuda:99", "tpu", ""], []),
        "impl": (["ref"], ["bogus", ""], []),
        "run_name": (["r1", "fz"], ["../escape", "a/b", "..", "x" * 300], []),
        "checkpoint_dir": (["ck", "ck2/sub"], ["", "y" * 300, "afile/ck"], []),
        "tensorboard_dir": (["tb"], ["", "z/" + "z" * 300, "afile/tb"], []),
        "train_val_split": (["0.5", "0.9"], ["0", "1", "nan", "-0.5"], []),
        "dataset_size": (["0", "50"], ["1", "-1"], []),
        "resume": (["false"], ["maybe"], ["true"]),
        "preset": (["tiny"], ["huge", ""], []),
    }


def sample_flags(w: Path) -> dict:
    ckpt = w / "ckpt" / "latest.pt"
    return {
        "ckpt": ([str(ckpt), str(w / "ckpt")], [str(w / "missing.pt"), str(w / "garbage.pt"), str(w / "emptydir"),
                                                str(w / "dolly.jsonl"), "c" * 300, str(w / "garbage.pt" / "x")], []),
        "prompt": (["hi", "", " ", "é" * 50, "\x00", " ".join(WORDS * 30), "<|endoftext|>"], [], []),
        "raw": (["true", "false"], ["maybe"], []),
        "temperature": (["0", "0.8", "1.5"], ["-1", "nan", "x"], []),
        "top_p": (["0.5", "1"], ["0", "1.5", "nan"], []),
        "top_k": (["0", "5"], ["-1", "x"], []),
        "max_new_tokens": (["1", "8"], ["0", "-1", "128", "x"], []),
        "seed": (["0", "5"], ["x"], ["-1"]),
        "device": (["cpu"], ["cpu:3", "tpu"], []),
        "impl": (["ref"], ["bogus"], []),
    }


def export_flags(w: Path) -> dict:
    return {
        "ckpt": ([str(w / "ckpt")], [str(w / "missing.pt"), str(w / "garbage.pt")], []),
        "out": (["hf", "nested/hf"], ["", "userfiles", "afile", "afile/hf", "o" * 300], []),
        "force": (["true", "false"], ["maybe"], []),
    }


def data_prep_flags(w: Path) -> dict:
    return {
        "input": ([str(w / "dolly.jsonl"), str(w / "plain.txt"), str(w / "text.jsonl"), str(w / "deep.jsonl")],
                  [str(w / "missing.jsonl"), str(w / "emptydir"), "/dev/null", str(w / "empty.jsonl"), "i" * 300], []),
        "dataset_size": (["0", "10"], ["1", "-3", "x"], []),
        "train_val_split": (["0.5", "0.9"], ["0", "1", "nan", "x"], []),
        "seed": (["1", "-7"], ["x"], []),
    }


GARBAGE = [["bogus"], ["train", "oops"], ["train", "--no_such_field", "1"], ["sample", "--top_k"],
           ["export", "--=3"], ["train", "--dim"], ["sample", "-x"]]


def command_line(rng: random.Random, w: Path) -> tuple[list[str], str, dict]:
    """(argv, expectation 'ok' | 'error' | 'either', the flags' values) of one random command line."""
    command = rng.choice(["train", "train", "sample", "sample", "export", "data_prep", "garbage"])
    if command == "garbage":
        return list(rng.choice(GARBAGE)), "error", {}
    flags = {"train": train_flags, "sample": sample_flags, "export": export_flags, "data_prep": data_prep_flags}[command](w)
    base = {
        "train": {"preset": "tiny", "impl": "ref", "device": "cpu", "max_steps": "2", "max_length": "32",
                  "batch_size": "4", "eval_batches": "1", "eval_interval": "2", "log_interval": "1",
                  "num_workers": "0", "compile": "false", "data_dir": str(w / "tokens")},
        "sample": {"ckpt": str(w / "ckpt"), "prompt": "hi", "impl": "ref", "device": "cpu",
                   "max_new_tokens": "8", "seed": "1"},
        "export": {"ckpt": str(w / "ckpt"), "out": "hf"},
        "data_prep": {"input": str(w / "dolly.jsonl"), "out_dir": "out"},
    }[command]
    values, expect = dict(base), "ok"
    for name in rng.sample(sorted(flags), k=min(len(flags), rng.randint(1, 3))):
        good, bad, either = flags[name]
        kind = rng.choice(["good"] * 2 + ["bad"] * 2 + ["either"])
        pool = {"good": good, "bad": bad, "either": either}[kind] or good
        kind = kind if {"good": good, "bad": bad, "either": either}[kind] else "good"
        values[name] = rng.choice(pool)
        if kind == "bad":
            expect = "error"
        elif kind == "either" and expect == "ok":
            expect = "either"
    argv = [command]
    for name, value in values.items():
        argv += [f"--{name}={value}"] if rng.random() < 0.3 else [f"--{name}", value]
    return argv, expect, values


def valid_result(argv: list[str], values: dict, cwd: Path, err: str) -> str | None:
    """Why an exit-0 run's result is wrong, or None."""
    command = argv[0]
    if command == "train":
        _, ckpt = optimus.load_checkpoint(cwd / values.get("checkpoint_dir", "checkpoints") / "latest.pt")
        steps = int(values["max_steps"])
        return None if ckpt["step"] == steps else f"latest.pt at step {ckpt['step']}, not {steps}"
    if command == "sample":
        return None if "tokens/s" in err else "no answer statistics on stderr"
    if command == "export":
        out_dirs = [p for p in cwd.rglob("config.json")]
        return None if out_dirs and all((out_dirs[0].parent / n).is_file() for n in optimus.HF_FILES) else "no export"
    if command == "data_prep":
        meta = data_prep.load_meta(cwd / "out")
        sizes = [(cwd / "out" / f"{s}.bin").stat().st_size // 2 for s in ("train", "val")]
        return None if sizes == [meta["counts"]["tokens_train"], meta["counts"]["tokens_val"]] else "sizes differ"
    return None


def fuzz(runs: int, seed: int, world: Path, scratch: Path) -> dict:
    """Run `runs` random command lines; returns the counts and the failures (at most 10 kept)."""
    rng = random.Random(seed)
    counts = dict(runs=0, exit_0=0, errors=0, tracebacks=0, hangs=0, invalid_accepted=0, valid_refused=0,
                  bad_results=0, multi_line_errors=0, files_changed=0, leftovers=0)
    failures = []
    for i in range(runs):
        argv, expect, values = command_line(rng, world)
        cwd = scratch / f"run{i}"
        cwd.mkdir(parents=True)
        (cwd / "userfiles").mkdir()
        (cwd / "userfiles" / "notes.txt").write_text("keep me")
        (cwd / "afile").write_text("keep me too")
        before = snapshot(world)
        code, out, err, escaped = run_inprocess(argv, cwd)
        counts["runs"] += 1
        problems = []
        if escaped == "hang":
            counts["hangs"] += 1
            problems.append("hang")
        elif escaped is not None or "Traceback" in err:
            counts["tracebacks"] += 1
            problems.append(f"traceback: {escaped or err[-300:]}")
        elif code == 0:
            counts["exit_0"] += 1
            if expect == "error":
                counts["invalid_accepted"] += 1
                problems.append("an invalid value was accepted")
            else:
                try:
                    why = valid_result(argv, values, cwd, err)
                except Exception as exc:  # the result does not even load
                    why = f"{type(exc).__name__}: {exc}"
                if why:
                    counts["bad_results"] += 1
                    problems.append(f"bad result: {why}")
        else:
            counts["errors"] += 1
            error_lines = [line for line in err.splitlines() if line.startswith("error:")]
            if len(error_lines) != 1:
                counts["multi_line_errors"] += 1
                problems.append(f"{len(error_lines)} error lines: {err[-300:]}")
            if expect == "ok":
                counts["valid_refused"] += 1
                problems.append(f"valid line refused: {error_lines[:1]}")
        if snapshot(world) != before or (cwd / "userfiles" / "notes.txt").read_text() != "keep me" \
                or (cwd / "afile").read_text() != "keep me too":
            counts["files_changed"] += 1
            problems.append("a file outside the run's outputs changed")
        if leftovers(cwd):
            counts["leftovers"] += 1
            problems.append(f"temporary files left: {leftovers(cwd)}")
        if problems and len(failures) < 10:
            failures.append((argv, problems))
        shutil.rmtree(cwd, ignore_errors=True)
    return {"counts": counts, "failures": failures}


def test_random_command_lines_keep_the_contract(world, tmp_path):
    result = fuzz(RUNS, SEED, world, tmp_path)
    counts = result["counts"]
    assert counts["exit_0"] > 0 and counts["errors"] > 0, counts  # both sides were exercised
    assert counts["runs"] == counts["exit_0"] + counts["errors"] + counts["tracebacks"] + counts["hangs"]
    broken = {k: v for k, v in counts.items() if k not in ("runs", "exit_0", "errors") and v}
    assert not broken, (broken, result["failures"])


def run_cli(*args, cwd, timeout=RUN_TIMEOUT_S):
    return subprocess.run([sys.executable, str(ROOT / "optimus.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def one_error(result, needle: str) -> str:
    """The single `error:` line of a failed subprocess, checked to hold `needle`."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    return errors[0]


@pytest.mark.parametrize("args, needle", [
    (["train", "--preset", "tiny", "--max_steps", "-5"], "max_steps"),
    (["train", "--preset", "tiny", "--num_heads", "0"], "num_heads"),
    (["train", "--preset", "tiny", "--seed", str(2**64)], "seed"),
    (["sample", "--ckpt", "CKPT", "--device", "cpu:3", "--prompt", "hi"], "cpu:3"),
])
def test_subprocess_errors_are_one_line(world, tmp_path, args, needle):
    args = [str(world / "ckpt") if a == "CKPT" else a for a in args]
    one_error(run_cli(*args, cwd=tmp_path), needle)
    assert list(tmp_path.iterdir()) == []  # a refused run writes nothing


def test_sample_seed_beyond_64_bits_is_one_line(world, tmp_path):
    code, _, err, escaped = run_inprocess(["sample", "--ckpt", str(world / "ckpt"), "--prompt", "hi", "--impl", "ref",
                                           "--max_new_tokens", "8", "--seed", str(2**64)], tmp_path)
    assert escaped is None and code == 2 and err.count("error:") == 1, (escaped, err)


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("field, value", [
    ("max_steps", -5), ("dim", 0), ("depth", -1), ("vocab_multiple", -64), ("weight_decay", -0.1),
    ("min_lr_ratio", -0.5), ("min_lr_ratio", float("nan")), ("gradient_clip_val", float("nan")),
    ("num_heads", 0), ("multiple_of", 0), ("learning_rate", -1e-3), ("beta1", 1.0), ("beta2", -0.1),
    ("num_workers", -1), ("seed", -1), ("seed", 2**63), ("eval_batches", 0), ("max_seq_len", 1),
    ("dim", "64"), ("checkpointing", 1), ("checkpoint_policy", "blocks"), ("rope_theta", float("inf")), ("run_name", "../x"),
    ("checkpoint_dir", "c" * 300), ("data_dir", ""),
])
def test_each_bad_config_value_is_refused_with_its_name(field, value):
    with pytest.raises(optimus.UserError, match=f"{field} must be"):
        optimus.make_configs("tiny", **{field: value})


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    with pytest.raises(optimus.UserError, match="GiB.*lower --dim"):
        optimus.Transformer(optimus.ModelConfig(dim=2**20, num_heads=2**10, num_kv_heads=2**10))


def test_batch_larger_than_the_data_is_refused_not_looped(world, tmp_path):
    with pytest.raises(optimus.UserError, match="batch_size 1000000000 is more than the"):
        optimus.Trainer(*tiny(tmp_path, data_dir=str(world / "tokens"), batch_size=10**9))
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- crafted checkpoints


def flip_bytes_inside(path: Path, member_suffix: str, count: int = 64) -> None:
    """Overwrite `count` bytes in the middle of a zip member's data, leaving the zip itself intact."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if i.filename.endswith(member_suffix) or "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2
        f.seek(start)
        f.write(bytes(255 - b for b in f.read(count)[::-1]) or b"\xff" * count)


def test_flipped_bytes_are_caught_by_sample_export_resume_and_load(world, tmp_path):
    shutil.copytree(world / "ckpt", tmp_path / "ckpt")
    bad = tmp_path / "ckpt" / "latest.pt"
    flip_bytes_inside(bad, "/data/0")
    with pytest.raises(optimus.UserError, match="corrupt.*CRC"):
        optimus.load_checkpoint(bad)
    with pytest.raises(optimus.UserError, match="corrupt.*CRC"):
        optimus.Trainer(*tiny(tmp_path, data_dir=str(world / "tokens"), resume=True, max_steps=5))
    for argv in (["sample", "--ckpt", str(bad), "--prompt", "hi", "--impl", "ref"],
                 ["export", "--ckpt", str(bad), "--out", str(tmp_path / "hf")]):
        code, _, err, escaped = run_inprocess(argv, tmp_path)
        assert escaped is None and code == 2 and err.count("error:") == 1 and "CRC" in err, err
    assert not (tmp_path / "hf").exists()


def crafted(world: Path, path: Path, change) -> Path:
    """The world's checkpoint dict, changed by `change(ckpt)`, saved (valid zip) to `path`."""
    ckpt = torch.load(world / "ckpt" / "latest.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


LOAD_CASES = {
    "no model": (lambda c: c.pop("model"), "no 'model'"),
    "no model_config": (lambda c: c.pop("model_config"), "no 'model_config'"),
    "format_version '1'": (lambda c: c.update(format_version="1"), "format_version '1'"),
    "num_heads 0": (lambda c: c["model_config"].update(num_heads=0), "num_heads must be"),
    "multiple_of 0": (lambda c: c["model_config"].update(multiple_of=0), "multiple_of must be"),
    "dim as text": (lambda c: c["model_config"].update(dim="64"), "dim must be an integer"),
    "huge dim": (lambda c: c["model_config"].update(dim=2**40), "GiB"),
    "unknown field": (lambda c: c["model_config"].update(colour="red"), "colour"),
    "wrong shapes": (lambda c: c["model_config"].update(dim=32), "does not match"),
    "a list": (lambda c: (c.clear(), c.update(format_version=1, model=[], model_config={})), "no 'model'"),
    "NaN weights": (lambda c: c["model"]["norm.weight"].fill_(float("nan")), "non-finite"),
    "bad template": (lambda c: c.update(template={"prompt": "{question}", "prompt_with_context": "{x"}),
                     "template"),
    "template a string": (lambda c: c.update(template="### {instruction}"), "template"),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_crafted_checkpoints_end_in_one_line(world, tmp_path, case):
    change, needle = LOAD_CASES[case]
    path = crafted(world, tmp_path / "crafted.pt", change)
    with pytest.raises(optimus.UserError, match=needle):
        optimus.load_checkpoint(path)
    code, _, err, escaped = run_inprocess(["sample", "--ckpt", str(path), "--prompt", "hi", "--impl", "ref"], tmp_path)
    assert escaped is None and code == 2 and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_with_a_small_vocabulary_is_refused_by_sample(world, tmp_path):
    torch.manual_seed(0)
    model_cfg, train_cfg = optimus.make_configs("tiny", vocab_size=300)
    path = tmp_path / "small.pt"
    optimus.save_checkpoint(path, optimus.Transformer(model_cfg), train_cfg, step=1, best_val_loss=1.0, template=None)
    code, _, err, escaped = run_inprocess(["sample", "--ckpt", str(path), "--prompt", "hi", "--impl", "ref"], tmp_path)
    assert escaped is None and code == 2 and "vocab_size 300" in err, err


RESUME_CASES = {
    "no rng": (lambda c: c.pop("rng"), "no valid rng"),
    "no optimizer": (lambda c: c.pop("optimizer"), "no valid optimizer"),
    "no step": (lambda c: c.pop("step"), "no valid step"),
    "no training_config": (lambda c: c.pop("training_config"), "no valid training_config"),
    "no best_val_loss": (lambda c: c.update(best_val_loss="low"), "no valid best_val_loss"),
    "rng of floats": (lambda c: c["rng"].update(cpu=torch.zeros(3)), "no valid rng"),
    "rng cut short": (lambda c: c["rng"].update(cpu=c["rng"]["cpu"][:10]), "rng state"),
    "optimizer of another model": (lambda c: c["optimizer"].update(param_groups=[]), "optimizer state"),
    "moments of other shapes": (lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3, 3)),
                                "optimizer state"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_from_a_checkpoint_missing_pieces_names_them(world, tmp_path, case):
    change, needle = RESUME_CASES[case]
    (tmp_path / "ckpt").mkdir()
    crafted(world, tmp_path / "ckpt" / "latest.pt", change)
    with pytest.raises(optimus.UserError, match=needle):
        optimus.Trainer(*tiny(tmp_path, data_dir=str(world / "tokens"), resume=True, max_steps=6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written


# ----------------------------------------------------------------------------- broken data directories


def broken_data(world: Path, root: Path, change) -> Path:
    data = root / "tokens"
    shutil.copytree(world / "tokens", data)
    change(data)
    return data


def edit_meta(data: Path, edit) -> None:
    meta = json.loads((data / "meta.json").read_text())
    edit(meta)
    (data / "meta.json").write_text(json.dumps(meta))


def set_token(data: Path, position: int, value: int) -> None:
    tokens = np.fromfile(data / "train.bin", dtype="<u2")
    tokens[position] = value
    tokens.tofile(data / "train.bin")


DATA_CASES = {
    "odd size": (lambda d: open(d / "train.bin", "ab").write(b"\x01"), "train.bin is .* an odd size"),
    "empty val": (lambda d: (d / "val.bin").write_bytes(b""), "val.bin is empty"),
    "cut short": (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-200]),
                  "train.bin holds .* tokens but .*meta.json counts"),
    "id above the vocabulary": (lambda d: set_token(d, 77, 50300), "token id 50300 at position 77"),
    "no vocab_size": (lambda d: edit_meta(d, lambda m: m.pop("vocab_size")), "meta.json has no positive integer vocab_size"),
    "vocab_size text": (lambda d: edit_meta(d, lambda m: m.update(vocab_size="50257")), "vocab_size"),
    "no counts": (lambda d: edit_meta(d, lambda m: m.pop("counts")), "counts.tokens_train"),
    "other dtype": (lambda d: edit_meta(d, lambda m: m.update(dtype="uint32")), "uint32"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_broken_data_directories_are_refused_before_step_1(world, tmp_path, case):
    change, needle = DATA_CASES[case]
    data = broken_data(world, tmp_path, change)
    before = snapshot(data)
    code, _, err, escaped = run_inprocess(
        ["train", "--preset", "tiny", "--impl", "ref", "--device", "cpu", "--max_length", "32", "--batch_size", "4",
         "--max_steps", "2", "--data_dir", str(data)], tmp_path)
    assert escaped is None and code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and __import__("re").search(needle, errors[0]), err
    assert not (tmp_path / "checkpoints").exists() and snapshot(data) == before


# ----------------------------------------------------------------------------- resume bookkeeping


def test_resume_names_the_differing_model_fields_and_the_flags(world, tmp_path):
    shutil.copytree(world / "ckpt", tmp_path / "ckpt")
    model_cfg, train_cfg = optimus.make_configs("base", impl="ref", device="cpu", data_dir=str(world / "tokens"),
                                                checkpoint_dir=str(tmp_path / "ckpt"), resume=True, max_length=32,
                                                batch_size=4, dim=32, depth=1, num_heads=2, num_kv_heads=1)
    with pytest.raises(optimus.UserError) as info:
        optimus.Trainer(model_cfg, train_cfg)
    message = str(info.value)
    assert "dim 64" in message and "dim 32" in message and "depth 2" in message
    assert "resume with --preset tiny" in message


def test_a_finished_run_is_not_restarted_and_keeps_best(world, tmp_path):
    shutil.copytree(world / "ckpt", tmp_path / "ckpt")
    before = snapshot(tmp_path / "ckpt")
    for steps, needle in ((0, "is a finished run .step 3 of 3.: pass --max_steps N with N > 3"),
                          (2, "--max_steps 2 is not beyond the step 3"), (3, "not beyond")):
        with pytest.raises(optimus.UserError, match=needle):
            optimus.Trainer(*tiny(tmp_path, data_dir=str(world / "tokens"), resume=True, max_steps=steps))
    assert snapshot(tmp_path / "ckpt") == before


def test_resume_accepts_the_data_dir_spelled_another_way(world, tmp_path, monkeypatch):
    shutil.copytree(world / "ckpt", tmp_path / "ckpt")
    monkeypatch.chdir(world)
    trainer = optimus.Trainer(*tiny(tmp_path, data_dir="tokens/../tokens", resume=True, max_steps=4,
                                    run_name="other"))
    assert trainer.step == 3 and trainer.total_steps == 4


def test_resume_logs_each_step_once_in_metrics_and_tensorboard(world, tmp_path):
    events = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                 reason="tensorboard is not installed (the `test` extra installs it)")
    root = tmp_path
    shutil.copytree(world / "tokens", root / "tokens")
    optimus.train(*tiny(root, max_steps=4, eval_interval=100))
    ckpt = torch.load(root / "ckpt" / "latest.pt", weights_only=True)
    run_dir = root / "runs" / "r"
    optimus.train(*tiny(root, max_steps=6, eval_interval=100, resume=True))
    # As if the run had been killed after step 6 with its last checkpoint at step 4: resuming
    # from there runs steps 5 and 6 again, and each must be logged once.
    ckpt["total_steps"] = 6
    torch.save(ckpt, root / "ckpt" / "latest.pt")
    optimus.train(*tiny(root, max_steps=6, eval_interval=100, resume=True))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if "val_loss" in r] == [4, 6]
    board = events.EventAccumulator(str(run_dir))
    board.Reload()
    assert [e.step for e in board.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6]


def test_a_new_run_never_appends_to_another_runs_logs(world, tmp_path):
    shutil.copytree(world / "tokens", tmp_path / "tokens")
    optimus.train(*tiny(tmp_path, checkpoint_dir=str(tmp_path / "a")))
    before = (tmp_path / "runs" / "r" / "metrics.jsonl").read_text()
    with pytest.raises(optimus.UserError, match="already holds a run's metrics.jsonl: pass another --run_name"):
        optimus.Trainer(*tiny(tmp_path, checkpoint_dir=str(tmp_path / "b")))
    assert (tmp_path / "runs" / "r" / "metrics.jsonl").read_text() == before
    # Timestamped names: a second run started in the same second gets a suffix, not the same directory.
    stamp = optimus.Trainer(*tiny(tmp_path, checkpoint_dir=str(tmp_path / "c"), run_name="")).run_name
    (tmp_path / "runs" / stamp / "metrics.jsonl").write_text("")
    again = optimus.Trainer(*tiny(tmp_path, checkpoint_dir=str(tmp_path / "d"), run_name="")).run_name
    assert again != stamp and not (tmp_path / "runs" / again / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- crash leftovers


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(world, tmp_path, capsys):
    host = __import__("socket").gethostname()
    ckpt_dir, data = tmp_path / "ckpt", tmp_path / "tokens"
    shutil.copytree(world / "ckpt", ckpt_dir)
    shutil.copytree(world / "tokens", data)
    dead, alive = dead_pid(), os.getpid()
    stale = [ckpt_dir / f".latest.pt.tmp{dead}@{host}", ckpt_dir / f".best.pt.tmp{dead}",
             data / f".train.bin.tmp{dead}@{host}"]
    kept = [ckpt_dir / f".latest.pt.tmp{alive}@{host}", ckpt_dir / f".latest.pt.tmp{dead}@another-host",
            ckpt_dir / "notes.tmp1"]
    for path in stale + kept:
        path.write_bytes(b"x" * 1000)
    optimus.Trainer(*tiny(tmp_path, data_dir=str(world / "tokens"), resume=True, max_steps=5))
    data_prep.prepare(str(world / "dolly.jsonl"), str(data), dataset_size=0)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert capsys.readouterr().err.count("which is gone") == 3


def test_a_run_killed_mid_training_resumes_with_no_leftovers_and_one_log_line_per_step(world, tmp_path):
    args = ["train", "--preset", "tiny", "--impl", "ref", "--device", "cpu", "--max_length", "16", "--batch_size",
            "2", "--log_interval", "1", "--eval_interval", "100", "--checkpoint_interval", "2", "--max_steps", "6",
            "--data_dir", str(world / "tokens"), "--run_name", "k"]
    process = subprocess.Popen([sys.executable, str(ROOT / "optimus.py"), *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("step 3/"):  # latest.pt holds step 2; step 3 is logged
                process.kill()
                break
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        process.kill()
    result = run_cli(*args, "--resume", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == []
    lines = [json.loads(line) for line in (tmp_path / "runs" / "k" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_loss" in r] == list(range(1, 7))
    assert torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["step"] == 6


def test_a_killed_export_leaves_nothing_the_next_one_keeps(world, tmp_path):
    dead = dead_pid()
    host = __import__("socket").gethostname()
    staging, old = tmp_path / f".hf.tmp{dead}@{host}", tmp_path / f".hf.old{dead}@{host}"
    for d in (staging, old):
        d.mkdir()
        (d / "config.json").write_text("{}")
    optimus.export_hf(world / "ckpt", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ----------------------------------------------------------------------------- export --force


def test_export_force_never_deletes_a_users_directory_named_like_an_export_file(world, tmp_path):
    out = tmp_path / "hf"
    optimus.export_hf(world / "ckpt", out)
    (out / "vocab.json").unlink()
    (out / "vocab.json").mkdir()
    (out / "vocab.json" / "mine.txt").write_text("my words")
    with pytest.raises(optimus.UserError, match="vocab.json is not a file an export wrote"):
        optimus.export_hf(world / "ckpt", out, force=True)
    assert (out / "vocab.json" / "mine.txt").read_text() == "my words"


def test_export_through_a_symlinked_out_replaces_the_target_and_keeps_the_link(world, tmp_path):
    target, link = tmp_path / "real", tmp_path / "link"
    optimus.export_hf(world / "ckpt", target)
    link.symlink_to(target)
    optimus.export_hf(world / "ckpt", link, force=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == sorted(optimus.HF_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no stale link or staging


# ----------------------------------------------------------------------------- prompts and data_prep


def test_an_empty_prompt_starts_from_end_of_text(world):
    model, _ = optimus.load_checkpoint(world / "ckpt")
    tokens = list(optimus.generate(model, [[], [5, 6]], max_new_tokens=3, temperature=0))
    assert len(tokens) == 3 and tokens[0].shape == (2,)
    alone = list(optimus.generate(model, [[optimus.EOT_ID]], max_new_tokens=3, temperature=0))
    assert [int(t[0]) for t in tokens] == [int(t[0]) for t in alone]


def test_more_tokens_than_max_seq_len_is_a_clear_error(world):
    model, _ = optimus.load_checkpoint(world / "ckpt")
    with pytest.raises(ValueError, match="129 tokens are more than the model's max_seq_len 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_a_deeply_nested_json_line_is_skipped_and_counted(world, tmp_path, capsys):
    meta = data_prep.prepare(str(world / "deep.jsonl"), str(tmp_path / "out"), dataset_size=0)
    assert meta["counts"]["records_skipped"] == 1 and meta["counts"]["records_usable"] == 40
    assert "line 1 (malformed JSON: nested too deeply)" in capsys.readouterr().err


@pytest.mark.parametrize("path, needle", [("/dev/null", "is not a regular file"), ("DIR", "is a directory"),
                                          ("MISSING", "does not exist")])
def test_data_prep_input_messages_say_what_the_path_is(tmp_path, path, needle):
    path = {"DIR": str(tmp_path), "MISSING": str(tmp_path / "nope.jsonl")}.get(path, path)
    with pytest.raises(data_prep.DataError, match=needle):
        data_prep.prepare(path, str(tmp_path / "out"))


if __name__ == "__main__":  # the larger run: python tests/test_fuzz.py --runs 400 --seed 1
    import argparse
    import tempfile
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        root.mkdir()
        result = fuzz(args.runs, args.seed, make_world(root), Path(tmp) / "scratch")
    print(json.dumps(result["counts"], indent=2))
    for argv, problems in result["failures"]:
        print(argv, problems)
