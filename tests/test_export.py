"""Export to the Hugging Face Llama format: transformers alone loads it and computes what we compute."""
import json
import os
import subprocess
import sys

import pytest
import tiktoken
import tiktoken.load
import torch

import optimus
from conftest import ROOT
from optimus import HF_FILES, cmd_export, export_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything must load from the exported directory

CLI = [sys.executable, str(ROOT / "optimus.py")]

# GPT-2's original tokenizer files, as tiktoken reads them (from TIKTOKEN_CACHE_DIR, offline).
GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def needs_transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (extra `test`)")


def tiny_checkpoint(path, seed=0, **overrides):
    """A tiny model with weights far from init (norm gains away from 1, larger matrices, so that a
    greedy continuation does not collapse onto one repeated token), saved as a checkpoint."""
    torch.manual_seed(seed)
    model_cfg, train_cfg = optimus.make_configs("tiny", impl="ref", **overrides)
    model = optimus.Transformer(model_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    optimus.save_checkpoint(path, model, train_cfg, step=1, best_val_loss=1.0, template=None)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request, tmp_path_factory):
    """(our model, its export directory), with the head tied to the embedding and not."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_checkpoint(root / "model.pt", tie_embeddings=request.param)
    return model, export_hf(root / "model.pt", root / "hf")


def greedy(model, prompt, steps):
    """Our greedy continuation the slow, obvious way: a full forward pass per token, stop at EOT."""
    seq = prompt
    for _ in range(steps):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if nxt.item() == optimus.EOT_ID:
            break
    return seq


def test_transformers_computes_our_logits_and_greedy_text(exported):
    transformers = needs_transformers()
    model, out = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    cfg = model.cfg
    assert hf.dtype == torch.float32  # from config.json: no dtype argument (its name changed in 4.56)
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == cfg.tie_embeddings

    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len))  # every rotary position
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
        assert theirs.shape == ours.shape == (3, cfg.max_seq_len, cfg.vocab_size)
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

        prompt = tokens[:1, :45]
        expected = greedy(model, prompt, steps=20)
        got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                          do_sample=False, temperature=None, top_p=None, top_k=None)  # greedy, not the defaults
    assert len(set(expected[0, 45:].tolist())) > 5  # a real continuation, not one token repeated
    assert got.tolist() == expected.tolist()


def test_config_files_and_weights(exported):
    from safetensors.torch import load_file

    model, out = exported
    cfg = model.cfg
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_FILES)
    config = json.loads((out / "config.json").read_text())
    assert cfg.padded_vocab_size == 50304 and config["vocab_size"] == cfg.vocab_size == 50257
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        cfg.dim, cfg.hidden_dim, cfg.depth)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    weights = load_file(out / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (50257, cfg.dim)
    assert ("lm_head.weight" in weights) == (not cfg.tie_embeddings)
    assert all(w.dtype == torch.float32 for w in weights.values())
    n_ours = sum(p.numel() for p in model.parameters()) - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.dim * (
        1 if cfg.tie_embeddings else 2)
    assert sum(w.numel() for w in weights.values()) == n_ours  # every weight, padding rows left out

    generation = json.loads((out / "generation_config.json").read_text())
    for name in ("temperature", "top_p", "top_k"):
        assert generation[name] == optimus.SAMPLE_FLAGS[name][1]
    # sample's default answer length for this model: 256, or half of max_seq_len when that is less.
    assert generation["max_new_tokens"] == min(256, cfg.max_seq_len // 2)
    assert generation["do_sample"] is True and generation["eos_token_id"] == optimus.EOT_ID


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦙🚀, Ελληνικά, русский.",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\nif __name__ == '__main__':\n    f(42)\n",
    "   leading spaces, trailing spaces   \n\n\n  \t mixed  \r\n whitespace     runs \u00a0\u3000 ",
    "it's, they're, we'll, I'd, you've, 12345 67.89 $%^&*()",
]


@pytest.mark.parametrize("exported", [True], ids=["tied"], indirect=True)  # one tokenizer for both
@pytest.mark.parametrize("fast_file", [True, False], ids=["tokenizer.json", "vocab+merges"])
def test_tokenizer_matches_tiktoken(exported, tmp_path, fast_file):
    transformers = needs_transformers()
    _, out = exported
    if not fast_file:  # only vocab.json and merges.txt: transformers builds the BPE from those
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            (tmp_path / name).write_bytes((out / name).read_bytes())
        out = tmp_path
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tiktoken.get_encoding("gpt2")
    assert (tok.bos_token_id, tok.eos_token_id) == (optimus.EOT_ID, optimus.EOT_ID)
    for text in TEXTS:
        ids = enc.encode(text)
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    eot = "answer<|endoftext|>next"
    assert tok(eot)["input_ids"] == enc.encode(eot, allowed_special="all")


@pytest.mark.parametrize("exported", [True], ids=["tied"], indirect=True)
def test_vocab_and_merges_are_gpt2s_originals(exported):
    """The slow tokenizer's files are GPT-2's encoder.json and vocab.bpe, written unchanged."""
    _, out = exported
    original_vocab = json.loads(tiktoken.load.read_file_cached(GPT2_FILES + "encoder.json"))
    original_merges = tiktoken.load.read_file_cached(GPT2_FILES + "vocab.bpe").decode()
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == original_vocab
    assert (out / "merges.txt").read_text(encoding="utf-8") == original_merges
    assert len(original_vocab) == 50257 and original_merges.count("\n") == 50001


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "a.pt", seed=1)
    tiny_checkpoint(tmp_path / "b.pt", seed=2, tie_embeddings=False)
    out = export_hf(tmp_path / "a.pt", tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(optimus.UserError, match="exists and is not empty: pass --force"):
        export_hf(tmp_path / "b.pt", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def crash(model):  # fails after the config and tokenizer files are written
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(sys.modules[export_hf.__module__], "hf_state_dict", crash)
        with pytest.raises(OSError, match="disk full"):
            export_hf(tmp_path / "b.pt", out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "hf"]  # no half-written dir

    result = subprocess.run([*CLI, "export", "--ckpt", str(tmp_path / "b.pt"), "--out", str(out), "--force"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "hf"]  # no staging dirs left


def test_user_errors(tmp_path):
    tiny_checkpoint(tmp_path / "model.pt")
    with pytest.raises(optimus.UserError, match="does not exist"):
        export_hf(tmp_path / "missing.pt", tmp_path / "hf")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(optimus.UserError, match="not from an export"):
        export_hf(tmp_path / "model.pt", tmp_path / "notes", force=True)
    with pytest.raises(optimus.UserError, match="holds the checkpoint"):
        export_hf(tmp_path / "model.pt", tmp_path, force=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "notes"]


def test_missing_safetensors_is_one_line(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "model.pt")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import fail
    with pytest.raises(optimus.UserError, match=r'pip install -e "\.\[hf\]"'):
        export_hf(tmp_path / "model.pt", tmp_path / "hf")


def test_cli_needs_out(tmp_path):
    tiny_checkpoint(tmp_path / "model.pt")
    with pytest.raises(optimus.UserError, match="export needs --out DIR"):
        cmd_export(["--ckpt", str(tmp_path / "model.pt")])


def test_a_full_disk_during_export_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(optimus, "export_hf", full)
    assert optimus.main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write the export") and "No space left" in err[0]
