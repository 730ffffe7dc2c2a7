"""Instruction tuning: the response mask, the response-only loss, --init_from and the eval command.

The expected masks are built here from the template written out by hand and from tiktoken directly,
never with data_prep's own helpers; expected losses come from the model's logits and F.cross_entropy.
"""
import json

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

import data_prep
import optimus
from test_train import configs as train_configs

ENC = tiktoken.get_encoding("gpt2")
EOT = 50256
TRICKY = "Quote the header ### Response:\nback to me."  # the template's marker inside an instruction


def records(n: int = 24) -> list[dict]:
    """Dolly records of a few shapes: with and without context, markers quoted in the prompt."""
    rows = []
    for i in range(n):
        context = f"Context {i} says ### Response:\nnot this." if i % 3 == 0 else ""
        instruction = TRICKY if i % 5 == 0 else f"Tell me fact {i}."
        rows.append({"instruction": instruction, "context": context,
                     "response": f"Fact {i} is that {'many ' * (i % 4)}marker{i:04d} holds.", "category": "qa"})
    return rows


def expected_pieces(record: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOT) from the documented template, written out here."""
    if record["context"]:
        prompt = (f"### Instruction:\n{record['instruction']}\n\n### Context:\n{record['context']}\n\n"
                  f"### Response:\n")
    else:
        prompt = f"### Instruction:\n{record['instruction']}\n\n### Response:\n"
    return ENC.encode_ordinary(prompt), ENC.encode_ordinary(record["response"]) + [EOT]


def expected_mask(tokens: np.ndarray, rows: list[dict]) -> np.ndarray:
    """The mask a token file must have: its records found by their ids, 1 on response + EOT."""
    by_ids = {}
    for r in rows:
        prompt, response = expected_pieces(r)
        by_ids[tuple(prompt + response)] = [0] * len(prompt) + [1] * len(response)
    mask, start = [], 0
    for end in np.flatnonzero(tokens == EOT):
        mask += by_ids[tuple(tokens[start: end + 1].tolist())]  # KeyError: not one record's exact ids
        start = end + 1
    assert start == len(tokens)
    return np.array(mask, dtype=bool)


@pytest.fixture(scope="module")
def dolly_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dolly")
    src = root / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records()))
    data_prep.prepare(str(src), str(root / "tokens"), dataset_size=0, train_val_split=0.75, seed=5)
    return root / "tokens"


def configs(tmp_path, data_dir, **overrides):
    """test_train's tiny CPU configs, with windows of 16 (the records are short) and validation every 3 steps."""
    return train_configs(tmp_path, data_dir, **{"max_length": 16, "eval_interval": 3, **overrides})


def test_mask_is_each_response_and_its_closing_eot(dolly_dir):
    meta = json.loads((dolly_dir / "meta.json").read_text())
    assert meta["version"] == 2 and meta["mask"] == "response"
    total = 0
    for split in ("train", "val"):
        tokens = np.fromfile(dolly_dir / f"{split}.bin", dtype="<u2")
        mask = np.fromfile(dolly_dir / f"{split}.mask", dtype="u1")
        assert mask.shape == tokens.shape and set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask.astype(bool), expected_mask(tokens, records()))
        assert meta["counts"][f"response_tokens_{split}"] == int(mask.sum())
        total += int(tokens.size)
    # The pieces' ids are those of the whole text: training sees exactly what the sampler feeds.
    for r in records():
        whole = ENC.encode_ordinary(data_prep.format_record(data_prep.DOLLY_TEMPLATE, r)) + [EOT]
        assert whole == sum(expected_pieces(r), [])
    assert total == meta["counts"]["tokens_train"] + meta["counts"]["tokens_val"]


def test_windows_that_cut_records_mask_both_sides(dolly_dir):
    length = 16
    path, mask_path = dolly_dir / "train.bin", dolly_dir / "train.mask"
    tokens = np.fromfile(path, dtype="<u2")
    counted = expected_mask(tokens, records())
    starts = {tuple(tokens[s: s + length].tolist()): s for s in range(0, len(tokens) - length, length)}
    windows = optimus.TrainWindows(path, length, batch_size=4, micro_batch=2, seed=3, mask_path=mask_path)
    kinds = set()
    for i in range(windows.num_windows):  # micro-batches of 2 windows: two epochs
        inputs, targets = windows[i]
        for x, y in zip(inputs.tolist(), targets.tolist()):
            s = starts[tuple(x)]
            want = [int(tokens[s + t + 1]) if counted[s + t + 1] else -100 for t in range(length)]
            assert y == want
            flags = counted[s + 1: s + length + 1]
            if flags[0] and not flags[-1]:
                kinds.add("starts in a response, ends in the next prompt")
            if not flags[0] and flags[-1]:
                kinds.add("starts in a prompt, ends in its response")
    assert len(kinds) == 2, kinds
    # all: every target counts (today's behaviour).
    inputs, targets = optimus.TrainWindows(path, length, 4, 2, seed=3)[0]
    assert torch.equal(targets[:, :-1], inputs[:, 1:]) and (targets != -100).all()


def hand_loss(model, inputs, next_tokens, counted):
    """Masked mean of F.cross_entropy over the model's logits: counted (B, T) bool."""
    with torch.no_grad():
        per_token = F.cross_entropy(model(inputs).flatten(0, 1), next_tokens.flatten(), reduction="none")
    return float(per_token[counted.flatten()].mean()), per_token.view(inputs.shape)


def window_counted(tokens, counted, starts, length):
    nxt = torch.tensor(np.stack([tokens[s + 1: s + length + 1] for s in starts]).astype(np.int64))
    return nxt, torch.tensor(np.stack([counted[s + 1: s + length + 1] for s in starts]))


def test_response_loss_is_the_masked_mean_over_the_global_batch(tmp_path, dolly_dir):
    trainer = optimus.Trainer(*configs(tmp_path, dolly_dir, micro_batch_size=1, batch_size=4))
    assert trainer.loss_on == "response" and trainer.windows.accum == 4
    val_tokens = np.fromfile(dolly_dir / "val.bin", dtype="<u2")
    n = trainer.val[0].shape[0]
    nxt, counted = window_counted(val_tokens, expected_mask(val_tokens, records()), [16 * i for i in range(n)], 16)
    want, _ = hand_loss(trainer.model, trainer.val[0], nxt, counted)
    assert trainer.evaluate() == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        assert float(trainer.loss(trainer.model, *trainer.val)) == pytest.approx(want, rel=1e-5)

    # A step's loss: the mean over all counted targets of its micro-batches, not a mean of means.
    micro = [trainer.windows[i] for i in range(4)]
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    with torch.no_grad():
        per_token = F.cross_entropy(trainer.model(x).flatten(0, 1), y.flatten().clamp(min=0), reduction="none")
    keep = (y != -100).flatten()
    pooled = float(per_token[keep].mean())
    means = [float(per_token.view(y.shape)[i][y[i] != -100].mean()) for i in range(4) if (y[i] != -100).any()]
    assert abs(np.mean(means) - pooled) > 1e-3  # the two differ on this batch: the check can fail
    assert float(trainer.train_step(iter(micro))) == pytest.approx(pooled, rel=1e-5)

    # Windows with no counted target add nothing, and never NaN.
    nothing = [(m[0], torch.full_like(m[1], -100)) for m in micro]
    assert float(trainer.train_step(iter(nothing))) == 0.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_loss_on_defaults_by_data_kind_and_old_dirs_get_one_message(tmp_path, dolly_dir):
    text = tmp_path / "play.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks? " * 40)
    data_prep.prepare(str(text), str(tmp_path / "text"))
    plain = optimus.Trainer(*configs(tmp_path / "a", tmp_path / "text"))
    assert plain.loss_on == "all" and (plain.val[1] != -100).all()
    with pytest.raises(optimus.UserError, match="loss_on all"):
        optimus.Trainer(*configs(tmp_path / "b", tmp_path / "text", loss_on="response"))

    old = tmp_path / "old"  # what data_prep wrote before masks: version 1, no mask files
    old.mkdir()
    for name in ("train.bin", "val.bin"):
        (old / name).write_bytes((dolly_dir / name).read_bytes())
    meta = json.loads((dolly_dir / "meta.json").read_text())
    del meta["mask"]
    (old / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(optimus.UserError) as info:
        optimus.Trainer(*configs(tmp_path / "c", old))
    message = str(info.value)
    assert "\n" not in message and "version 1" in message
    assert f"data_prep.py --input {meta['source']['path']} --out_dir {old}" in message and "--loss_on all" in message
    assert optimus.Trainer(*configs(tmp_path / "d", old, loss_on="all")).loss_on == "all"


def test_init_from_starts_from_the_weights_with_a_fresh_optimizer(tmp_path, dolly_dir):
    optimus.train(*configs(tmp_path / "pre", dolly_dir, dim=32, max_steps=2))
    ckpt_path = tmp_path / "pre" / "ckpt" / "latest.pt"
    saved = torch.load(ckpt_path, weights_only=True)
    assert saved["optimizer"]["state"]  # the pretraining had optimizer state: it must not carry over

    model_cfg, train_cfg = configs(tmp_path / "ft", dolly_dir, init_from=str(ckpt_path))
    assert model_cfg.dim == 32  # the checkpoint's model, not the tiny preset's dim 64
    trainer = optimus.Trainer(model_cfg, train_cfg)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    assert trainer.step == 0 and trainer.best_val == float("inf") and not trainer.optimizer.state
    assert trainer.total_steps > 0 and optimus.lr_at(0, train_cfg, trainer.total_steps) < train_cfg.learning_rate

    with pytest.raises(optimus.UserError, match=r"dim 64 \(checkpoint: 32\)"):
        configs(tmp_path / "x", dolly_dir, init_from=str(ckpt_path), dim=64)
    with pytest.raises(optimus.UserError, match="num_kv_heads"):
        optimus.Trainer(optimus.ModelConfig(dim=32, depth=2, num_heads=4, num_kv_heads=4, max_seq_len=128, impl="ref"),
                        train_cfg)
    same = configs(tmp_path / "y", dolly_dir, init_from=str(ckpt_path), dim=32, checkpointing=False)[0]
    assert same.dim == 32 and not same.checkpointing  # agreeing and kernel/memory flags are fine


def test_resume_of_a_fine_tuning_run_is_bit_identical(tmp_path, dolly_dir):
    optimus.train(*configs(tmp_path / "pre", dolly_dir, max_steps=2))
    common = dict(init_from=str(tmp_path / "pre" / "ckpt"), max_steps=6, checkpoint_interval=100,
                  warmup_steps=0, min_lr_ratio=1.0)
    optimus.train(*configs(tmp_path / "a", dolly_dir, **common))
    straight = torch.load(tmp_path / "a" / "ckpt" / "latest.pt", weights_only=True)

    first = optimus.Trainer(*configs(tmp_path / "b", dolly_dir, **{**common, "max_steps": 3}))
    assert first.fit()["step"] == 3
    assert optimus.train(*configs(tmp_path / "b", dolly_dir, resume=True, **common))["step"] == 6
    resumed = torch.load(tmp_path / "b" / "ckpt" / "latest.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def greedy(model, ids, n):
    """Greedy continuation by full forward passes (no KV cache), stopping at EOT."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == EOT:
                break
            out.append(nxt)
    return ENC.decode(out)


def test_eval_loss_is_the_mean_of_per_token_losses(tmp_path, dolly_dir, capsys):
    model_cfg, train_cfg = configs(tmp_path, dolly_dir)
    torch.manual_seed(0)
    model = optimus.Transformer(model_cfg).eval()
    ckpt = tmp_path / "model.pt"
    optimus.save_checkpoint(ckpt, model, train_cfg, step=7, best_val_loss=1.0, template=data_prep.DOLLY_TEMPLATE)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me fact 3.\n" + json.dumps({"instruction": "Why?", "context": "Because."}) + "\n")
    report_path = tmp_path / "report.json"
    argv = ["eval", "--ckpt", str(ckpt), "--data_dir", str(dolly_dir), "--max_length", "10", "--device", "cpu",
            "--impl", "ref", "--json", str(report_path), "--prompts", str(prompts), "--max_new_tokens", "6"]
    assert optimus.main(argv) == 0
    report = json.loads(report_path.read_text())
    assert "response tokens" in capsys.readouterr().out

    tokens = np.fromfile(dolly_dir / "val.bin", dtype="<u2")
    counted = expected_mask(tokens, records())
    losses, flags = [], []
    for s in range(0, len(tokens) - 1, 10):  # every target once; the last window is shorter
        window = torch.tensor(tokens[s: s + 11].astype(np.int64))
        with torch.no_grad():
            logits = model(window[None, :-1])[0]
        losses += F.cross_entropy(logits, window[1:], reduction="none").tolist()
        flags += counted[s + 1: s + 11].tolist()
    losses, flags = np.array(losses), np.array(flags)
    assert report["tokens"] == len(tokens) and report["targets_all"] == len(tokens) - 1 == len(losses)
    assert report["loss_all"] == pytest.approx(losses.mean(), rel=1e-5)
    assert report["targets_response"] == flags.sum()
    assert report["loss_response"] == pytest.approx(losses[flags].mean(), rel=1e-5)
    assert report["perplexity_response"] == pytest.approx(np.exp(losses[flags].mean()), rel=1e-5)
    assert report["step"] == 7

    want = [("### Instruction:\nTell me fact 3.\n\n### Response:\n"),
            ("### Instruction:\nWhy?\n\n### Context:\nBecause.\n\n### Response:\n")]
    assert [a["prompt"] for a in report["answers"]] == want
    for item in report["answers"]:
        assert item["answer"] == greedy(model, ENC.encode_ordinary(item["prompt"]), 6)

    # --input: a JSONL file is prepared on the fly and all of its records are scored.
    src = tmp_path / "more.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records(6)))
    assert optimus.main(["eval", "--ckpt", str(ckpt), "--input", str(src), "--device", "cpu", "--impl", "ref",
                         "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    pieces = [expected_pieces(r) for r in records(6)]
    assert report["tokens"] == sum(len(p) + len(r) for p, r in pieces)
    assert report["targets_response"] == sum(len(r) for _, r in pieces) and report["format"] == "dolly"


def test_eval_and_init_from_errors_are_one_line(tmp_path, dolly_dir, capsys):
    assert optimus.main(["eval", "--ckpt", str(tmp_path / "none.pt")]) == 2
    assert optimus.main(["eval", "--data_dir", "a", "--input", "b"]) == 2
    assert optimus.main(["train", "--preset", "tiny", "--resume", "--loss_on", "some"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "none.pt" in err[0] and "not both" in err[1] and "loss_on" in err[2]
