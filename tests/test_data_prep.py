"""data_prep.py: formats, splits, token files, idempotence, bad input, CLI and download errors.

Expected texts and tokens are computed here independently: prompts from literal strings, ids with
tiktoken directly, never with data_prep's own helpers.
"""
import hashlib
import io
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import data_prep
from data_prep import DataError, prepare

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "texts" / "tinyshakespeare.txt"  # shipped with the repo
EOT = 50256
ENC = tiktoken.get_encoding("gpt2")


def dolly_record(i: int, context: str = "") -> dict:
    """A Dolly-shaped record whose response carries a unique marker."""
    return {"instruction": f"Tell me fact number {i}.", "context": context,
            "response": f"Fact {i} is marker{i:04d}.", "category": "open_qa"}


def expected_text(record: dict) -> str:
    """The training text of a record, written out by hand from the documented template."""
    if record["context"]:
        return (f"### Instruction:\n{record['instruction']}\n\n### Context:\n{record['context']}\n\n"
                f"### Response:\n{record['response']}")
    return f"### Instruction:\n{record['instruction']}\n\n### Response:\n{record['response']}"


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row: dicts as JSON, strings verbatim (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_bin(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2")


def examples(tokens: np.ndarray) -> list[tuple[int, ...]]:
    """Split a token file at <|endoftext|>; every example must end with it."""
    assert len(tokens) and tokens[-1] == EOT
    cuts = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tuple(tokens[s:e].tolist()) for s, e in zip(starts, cuts)]


def markers(out: Path, split: str) -> list[str]:
    """The record markers found in a split's decoded text, in file order."""
    return re.findall(r"marker\d{4}", ENC.decode(read_bin(out / f"{split}.bin").tolist()))


def test_prompt_format_matches_the_documented_template():
    t = data_prep.DOLLY_TEMPLATE
    assert data_prep.format_prompt(t, "Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert (data_prep.format_prompt(t, " Say hi.\n", "A greeting.")
            == "### Instruction:\nSay hi.\n\n### Context:\nA greeting.\n\n### Response:\n")
    assert data_prep.format_prompt(t, "Say hi.", "  \n") == data_prep.format_prompt(t, "Say hi.")
    record = {"instruction": "Q {x}?", "context": "", "response": " A {y}. \n"}
    assert data_prep.format_record(t, record) == "### Instruction:\nQ {x}?\n\n### Response:\nA {y}."


def test_dolly_split_tokens_and_meta(tmp_path):
    records = [dolly_record(i, context=f"Context {i}." if i % 3 == 0 else "") for i in range(10)]
    records[4]["response"] += " A literal <|endoftext|> stays text."
    src = write_jsonl(tmp_path / "dolly.jsonl", records)
    out = tmp_path / "out"
    meta = prepare(str(src), str(out), dataset_size=0, train_val_split=0.9, seed=3)

    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["format"] == "dolly" and meta["tokenizer"] == "gpt2"
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == EOT
    assert meta["template"] == {
        "name": "dolly-v1",
        "prompt": "### Instruction:\n{instruction}\n\n### Response:\n",
        "prompt_with_context": "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"}
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["settings"] == {"dataset_size": 0, "train_val_split": 0.9, "seed": 3}

    train, val = read_bin(out / "train.bin"), read_bin(out / "val.bin")
    counts = meta["counts"]
    assert (counts["tokens_train"], counts["tokens_val"]) == (len(train), len(val))
    assert (counts["records_train"], counts["records_val"], counts["records_skipped"]) == (9, 1, 0)
    train_ex, val_ex = examples(train), examples(val)
    assert (len(train_ex), len(val_ex)) == (9, 1)

    # Every example is exactly one record's formatted text, each record appears exactly once.
    expected = Counter(tuple(ENC.encode_ordinary(expected_text(r))) for r in records)
    assert Counter(train_ex + val_ex) == expected
    train_m, val_m = markers(out, "train"), markers(out, "val")
    assert not set(train_m) & set(val_m)
    assert sorted(train_m + val_m) == [f"marker{i:04d}" for i in range(10)]


def test_second_run_does_nothing_and_changed_settings_rewrite(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [dolly_record(i) for i in range(20)])
    out = tmp_path / "out"
    prepare(str(src), str(out), dataset_size=0, train_val_split=0.5, seed=1)
    files = [out / n for n in ("train.bin", "val.bin", "meta.json")]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    capsys.readouterr()

    again = prepare(str(src), str(out), dataset_size=0, train_val_split=0.5, seed=1)
    assert "up to date" in capsys.readouterr().out
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before
    assert again["settings"]["seed"] == 1

    val_seed1 = set(markers(out, "val"))
    meta = prepare(str(src), str(out), dataset_size=0, train_val_split=0.5, seed=2)
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["settings"]["seed"] == 2 == meta["settings"]["seed"]
    assert set(markers(out, "val")) != val_seed1
    assert len(markers(out, "val")) == 10


def test_the_seed_determines_the_split(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [dolly_record(i) for i in range(20)])
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        prepare(str(src), str(tmp_path / name), dataset_size=0, train_val_split=0.7, seed=seed)
    same = [(tmp_path / d / "val.bin").read_bytes() for d in ("a", "b")]
    assert same[0] == same[1]
    assert set(markers(tmp_path / "a", "val")) != set(markers(tmp_path / "c", "val"))
    assert len(markers(tmp_path / "c", "train")) == 14


def test_dataset_size_selects_that_many_records(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [dolly_record(i) for i in range(30)])
    meta = prepare(str(src), str(tmp_path / "out"), dataset_size=12, train_val_split=0.75, seed=0)
    train_m, val_m = markers(tmp_path / "out", "train"), markers(tmp_path / "out", "val")
    assert (len(train_m), len(val_m)) == (9, 3)
    assert len(set(train_m + val_m)) == 12
    assert (meta["counts"]["records_train"], meta["counts"]["records_val"]) == (9, 3)
    assert meta["counts"]["records_usable"] == 30


def test_bad_lines_are_skipped_and_reported_with_line_numbers(tmp_path, capsys):
    bad_instruction = dolly_record(5)
    bad_instruction["instruction"] = 42
    no_response = dolly_record(4)
    del no_response["response"]
    rows = [dolly_record(1), '{"instruction": "broken', dolly_record(2), no_response, bad_instruction,
            "", dolly_record(3)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    meta = prepare(str(src), str(tmp_path / "out"), dataset_size=0, seed=0)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "line 2 (malformed JSON" in err and "line 4 (missing 'response')" in err
    assert "line 5 ('instruction' is not a string)" in err and "line 6" not in err
    assert meta["counts"]["records_skipped"] == 3
    assert meta["counts"]["records_train"] + meta["counts"]["records_val"] == 3
    found = markers(tmp_path / "out", "train") + markers(tmp_path / "out", "val")
    assert sorted(found) == ["marker0001", "marker0002", "marker0003"]


def test_many_skips_are_named_then_counted(tmp_path, capsys):
    rows = [dolly_record(0), dolly_record(1)] + ["not json"] * 8
    prepare(str(write_jsonl(tmp_path / "d.jsonl", rows)), str(tmp_path / "out"), dataset_size=0)
    err = capsys.readouterr().err
    assert "line 3 (" in err and "line 7 (" in err and "line 8 (" not in err and "and 3 more" in err


@pytest.mark.parametrize("content", ["", "\n\n", "{not json}\n[1, 2]\n",
                                     json.dumps(dolly_record(0)) + "\n"])
def test_too_few_usable_records_is_an_error(tmp_path, content):
    src = tmp_path / "d.jsonl"
    src.write_text(content)
    with pytest.raises(DataError, match="at least 2") as info:
        prepare(str(src), str(tmp_path / "out"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_invalid_settings_and_missing_meta_are_errors(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [dolly_record(i) for i in range(4)])
    for kwargs in ({"train_val_split": 1.0}, {"train_val_split": 0.0}, {"dataset_size": 1}, {"dataset_size": -3}):
        with pytest.raises(DataError):
            prepare(str(src), str(tmp_path / "out"), **kwargs)
    with pytest.raises(DataError, match="does not exist"):
        prepare(str(tmp_path / "missing.jsonl"), str(tmp_path / "out"))
    with pytest.raises(DataError, match="data_prep.py"):
        data_prep.load_meta(tmp_path / "out")


def test_plain_text_is_one_document_cut_at_the_split(tmp_path):
    text = SHAKESPEARE.read_text()[:20000]
    src = tmp_path / "shakespeare.txt"
    src.write_text(text)
    meta = prepare(str(src), str(tmp_path / "out"), train_val_split=0.8)
    ids = ENC.encode_ordinary(text)
    cut = round(len(ids) * 0.8)
    train, val = read_bin(tmp_path / "out" / "train.bin"), read_bin(tmp_path / "out" / "val.bin")
    assert train.tolist() == ids[:cut] + [EOT] and val.tolist() == ids[cut:] + [EOT]
    assert ENC.decode_bytes(train[:-1].tolist()) + ENC.decode_bytes(val[:-1].tolist()) == text.encode()
    assert meta["format"] == "text" and meta["template"] is None
    assert (meta["counts"]["tokens_train"], meta["counts"]["tokens_val"]) == (cut + 1, len(ids) - cut + 1)


def test_generic_text_jsonl(tmp_path):
    texts = [f"Document {i}: {'words ' * i}marker{i:04d}." for i in range(6)]
    rows = [{"text": t, "source": "test"} for t in texts]
    meta = prepare(str(write_jsonl(tmp_path / "t.jsonl", rows)), str(tmp_path / "out"), dataset_size=0,
                   train_val_split=0.5)
    assert meta["format"] == "jsonl-text" and meta["template"] is None
    got = examples(read_bin(tmp_path / "out" / "train.bin")) + examples(read_bin(tmp_path / "out" / "val.bin"))
    assert Counter(got) == Counter(tuple(ENC.encode_ordinary(t)) for t in texts)
    assert (meta["counts"]["records_train"], meta["counts"]["records_val"]) == (3, 3)


def test_jsonl_content_is_detected_without_the_extension(tmp_path):
    src = write_jsonl(tmp_path / "records.data", [dolly_record(i) for i in range(3)])
    assert prepare(str(src), str(tmp_path / "out"), dataset_size=0)["format"] == "dolly"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data_prep.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_files_and_reports_errors_in_one_line(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [dolly_record(i) for i in range(5)])
    ok = run_cli("--input", str(src), "--out_dir", str(tmp_path / "out"), "--dataset_size", "0")
    assert ok.returncode == 0, ok.stderr
    assert "train 4 records" in ok.stdout and "val 1 records" in ok.stdout
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["counts"]["records_val"] == 1

    for args, names in ((["--input", str(tmp_path / "nope.jsonl"), "--out_dir", str(tmp_path / "o2")], "nope.jsonl"),
                        (["--dataset_size", "many"], "--dataset_size")):
        bad = run_cli(*args)
        assert bad.returncode == 2
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
        assert bad.stderr.startswith("error: ") and names in bad.stderr


def test_failed_download_says_how_to_pass_a_local_file(tmp_path, monkeypatch, capsys):
    def no_network(url, timeout=None):
        raise urllib.error.URLError("no network here")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    out = tmp_path / "data" / "dolly"
    assert data_prep.main(["--out_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input" in err and "no network here" in err
    assert "huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl" in err
    assert not list(tmp_path.rglob("*.jsonl*"))


def test_download_is_saved_once_and_reused(tmp_path, monkeypatch):
    body = "".join(json.dumps(dolly_record(i)) + "\n" for i in range(4)).encode()
    calls = []

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": str(len(body))}

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse(body)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    out = tmp_path / "data" / "dolly"
    meta = prepare(None, str(out), dataset_size=0, dataset_name="someone/my-set")
    saved = tmp_path / "data" / "my-set.jsonl"
    assert calls == ["https://huggingface.co/datasets/someone/my-set/resolve/main/my-set.jsonl"]
    assert saved.read_bytes() == body and meta["source"]["url"] == calls[0]
    prepare("", str(tmp_path / "data" / "other"), dataset_size=0, dataset_name="someone/my-set")
    assert len(calls) == 1


def test_shipped_text_is_the_documented_tinyshakespeare():
    """The repo carries its own copy (the tests and the README's offline line need no ../shared)."""
    documented = re.search(r"sha256 of `tinyshakespeare.txt`: `([0-9a-f]{64})`",
                           (ROOT / "texts" / "README.md").read_text()).group(1)
    assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest() == documented
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "texts/tinyshakespeare.txt"], cwd=ROOT,
                             capture_output=True, text=True)
    assert tracked.returncode == 0, "texts/tinyshakespeare.txt is not committed (is it ignored?)"


def test_offline_without_tiktoken_files_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(name):
        raise OSError("Failed to resolve 'openaipublic.blob.core.windows.net'")  # what requests raises
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    src = write_jsonl(tmp_path / "d.jsonl", [dolly_record(i) for i in range(3)])
    assert data_prep.main(["--input", str(src), "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "TIKTOKEN_CACHE_DIR is not set" in err
    assert "set TIKTOKEN_CACHE_DIR" in err
