"""Data preparation: Dolly-15k JSONL (or your own text) -> GPT-2 token files for optimus.py.

    python data_prep.py [--input FILE] [--out_dir data/dolly] [--dataset_size N]
                        [--train_val_split 0.9] [--seed S] [--dataset_name OWNER/NAME]

Without --input it downloads `<name>.jsonl` of the Hugging Face dataset `--dataset_name` (default
databricks/databricks-dolly-15k) into the folder above out_dir (data/databricks-dolly-15k.jsonl)
and reuses that file on later runs. optimus.py's trainer calls `prepare` itself when its data_dir
holds no token files.

Input formats, decided in this order:
  1. a `.txt` file is plain text: one document;
  2. a `.jsonl`, `.json` or `.ndjson` file, or any file whose first non-blank character is `{`, is
     JSON Lines (one object per line; blank lines are ignored). The first line holding a JSON object
     with an "instruction" key makes it Dolly, one with a "text" key a generic text JSONL:
     - Dolly: each record needs non-empty strings "instruction" and "response", and may have a
       string "context" (blank: the prompt has no context section). Other keys, like Dolly's
       "category", are ignored;
     - text: each record needs a non-empty string "text", used as it is;
  3. anything else is plain text.

Template: a Dolly record becomes `format_record(DOLLY_TEMPLATE, record)`, e.g.

    ### Instruction:
    {instruction}

    ### Context:            (these two lines and the blank line after them
    {context}                only when the record has a context)

    ### Response:
    {response}<|endoftext|>

with instruction, context and response stripped of surrounding whitespace. The sampler formats a
user's prompt with the same `format_prompt`, so the model sees at inference exactly what it was
trained on. meta.json stores the template; a checkpoint carries it on.

Examples and splits: every example is its text encoded with `encode_ordinary` (so a literal
"<|endoftext|>" in user text stays plain text) followed by the id <|endoftext|> (50256). JSONL
records are shuffled with `--seed`, the first `--dataset_size` are kept (0: all), and they are split
by record: the first `round(n * train_val_split)` go to train, the rest to val, with at least one
record in each, so no record is in both and the split depends only on the input, size, split and
seed. A plain-text document is tokenised whole and its token stream is cut at `train_val_split`
(dataset_size and seed do not apply); each part ends with <|endoftext|> and counts as one record.

Bad records: a line that is not UTF-8, not JSON or not an object, or a record with a missing,
non-string or blank required field, is skipped: training on the rest is more useful than stopping
at line 9,000 of 15,000. Skips are counted in meta.json and reported on stderr with their line
numbers (the first few, then a count). An input with fewer than two usable records (or a text
shorter than two tokens) is an error.

Response mask (Dolly only): train.mask and val.mask hold one uint8 per token of train.bin and
val.bin: 1 on each response token and on the record's closing <|endoftext|>, 0 on its prompt (the
instruction, context and headers). The trainer's `--loss_on response` counts a next-token target
only where the mask is 1. The mask is made here, from the pieces, rather than found at load time
by searching the tokens for "### Response:": the prompt and the response are tokenised separately
(the same ids as tokenising the whole text: the prompt ends in a newline and the stripped response
starts with a non-space, a place GPT-2's pre-tokeniser always splits), so the boundary is exact even
when an instruction or context quotes the template's headers, and a window that starts in the middle
of a record needs no look-back. meta.json's "mask" is "response" when the mask files exist, else None.

Output in out_dir: train.bin and val.bin (little-endian uint16 GPT-2 ids), for Dolly train.mask and
val.mask, and meta.json (tokenizer, vocab size, format, template, mask, source path and sha256,
settings, counts). Each is written to a temporary file and renamed; meta.json is removed first and
written last, so it marks a complete output. A run whose input sha256 and settings match the
existing meta.json does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
from itertools import chain
from pathlib import Path

import numpy as np
import tiktoken

TOKENIZER = "gpt2"
VOCAB_SIZE = 50257
EOT_ID = 50256  # <|endoftext|>: ends every example
TOKEN_DTYPE = np.dtype("<u2")  # little-endian uint16 holds every GPT-2 id (all < 65536)
MASK_DTYPE = np.dtype("u1")  # one byte per token: 1 where the token counts with --loss_on response
# Bump when the files' layout changes: outputs of another version are rewritten. 2: response masks.
META_VERSION = 2
MAX_REPORTED_SKIPS = 5  # skipped lines named one by one before the rest are only counted
DOWNLOAD_CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

DOLLY_TEMPLATE: dict = {
    "name": "dolly-v1",
    "prompt": "### Instruction:\n{instruction}\n\n### Response:\n",
    "prompt_with_context": "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n",
}

# Per JSONL format: fields every record needs as non-blank strings, fields that must be strings if present.
REQUIRED_FIELDS = {"dolly": ("instruction", "response"), "jsonl-text": ("text",)}
OPTIONAL_FIELDS = {"dolly": ("context",), "jsonl-text": ()}


class DataError(Exception):
    """An error the user can fix (bad input, setting or download); its message is one line."""


# ----------------------------------------------------------------------------- template


def format_prompt(template: dict, instruction: str, context: str = "") -> str:
    """The text the model continues: instruction (and context, when not blank), then the response header."""
    instruction, context = instruction.strip(), context.strip()
    if context:
        return template["prompt_with_context"].format(instruction=instruction, context=context)
    return template["prompt"].format(instruction=instruction)


def format_record(template: dict, record: dict) -> str:
    """A Dolly record as training text: its prompt directly followed by its response (no EOT)."""
    return format_prompt(template, record["instruction"], record.get("context", "")) + record["response"].strip()


# ----------------------------------------------------------------------------- tokenizer


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding. Its files come from tiktoken's cache or a download; offline
    without the cache, one DataError says what to set instead of a network library's traceback."""
    try:
        return tiktoken.get_encoding(TOKENIZER)
    except (OSError, ValueError) as exc:  # requests' errors are OSErrors; ValueError: a bad cached file
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise DataError(f"cannot load tiktoken's {TOKENIZER} files ({type(exc).__name__}; {where}): go online "
                        f"once, or set TIKTOKEN_CACHE_DIR to a folder holding them (README: Offline)") from None


# ----------------------------------------------------------------------------- reading input


def dataset_url(dataset_name: str) -> str:
    """The JSONL file of a Hugging Face dataset `owner/name`: `name.jsonl` on its main branch."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset_name):
        raise DataError(f"dataset_name '{dataset_name}' is not of the form owner/name: "
                        f"pass e.g. --dataset_name databricks/databricks-dolly-15k")
    return f"https://huggingface.co/datasets/{dataset_name}/resolve/main/{dataset_name.split('/')[1]}.jsonl"


def download(url: str, dest: Path, input_flag: str = "--input") -> Path:
    """Fetch `url` into `dest` (through a temporary file) unless it is already there. Errors name
    `input_flag`, the caller's flag for a local file instead (train's is --data_input)."""
    if dest.is_file():
        print(f"using {dest} (downloaded before)")
        return dest
    remove_leftovers(dest, kinds=("part",))
    tmp = temporary_path(dest, "part")
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            of_total = f" of {total / 1e6:.1f}" if total else ""
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                try:
                    while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                        f.write(chunk)
                        done += len(chunk)
                        print(f"\rdownloading {url}: {done / 1e6:.1f}{of_total} MB", end="", file=sys.stderr, flush=True)
                finally:
                    if done:
                        print(file=sys.stderr)  # end the progress line, also before an error message
        if total and done != total:
            raise DataError(f"download of {url} stopped after {done} of {total} bytes: run again, "
                            f"or download the file yourself and pass it with {input_flag} FILE")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise DataError(f"could not download {url} ({reason}): download the file yourself and pass "
                        f"it with {input_flag} FILE") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def detect_format(path: Path, data: bytes) -> str:
    """'text' or 'jsonl', by the rule in the module docstring (Dolly vs text JSONL is decided later)."""
    if path.suffix.lower() == ".txt":
        return "text"
    if path.suffix.lower() in JSONL_SUFFIXES or data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "jsonl"
    return "text"


def record_problem(fmt: str, record: dict) -> str | None:
    """Why a JSONL record cannot be used, or None when it can."""
    for key in REQUIRED_FIELDS[fmt]:
        if key not in record:
            return f"missing '{key}'"
        if not isinstance(record[key], str):
            return f"'{key}' is not a string"
        if not record[key].strip():
            return f"blank '{key}'"
    for key in OPTIONAL_FIELDS[fmt]:
        if key in record and not isinstance(record[key], str):
            return f"'{key}' is not a string"
    return None


def parse_jsonl(data: bytes) -> tuple[str | None, list[dict], list[tuple[int, str]]]:
    """(format 'dolly' | 'jsonl-text' | None if none found, usable records, skipped (line, reason))."""
    fmt, records, skipped = None, [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            skipped.append((lineno, "not UTF-8"))
            continue
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append((lineno, f"malformed JSON: {exc.msg}"))
            continue
        except RecursionError:  # e.g. '[' x 200,000: deeper than the parser's recursion limit
            skipped.append((lineno, "malformed JSON: nested too deeply"))
            continue
        if not isinstance(record, dict):
            skipped.append((lineno, "not a JSON object"))
            continue
        if fmt is None:
            fmt = "dolly" if "instruction" in record else "jsonl-text" if "text" in record else None
        problem = record_problem(fmt, record) if fmt else "neither an 'instruction' nor a 'text' field"
        if problem:
            skipped.append((lineno, problem))
        else:
            records.append(record)
    return fmt, records, skipped


def describe_skips(skipped: list[tuple[int, str]]) -> str:
    """'line 3 (malformed JSON: ...), line 7 (missing 'response') and 12 more'."""
    named = ", ".join(f"line {n} ({why})" for n, why in skipped[:MAX_REPORTED_SKIPS])
    rest = len(skipped) - MAX_REPORTED_SKIPS
    return named + (f" and {rest} more" if rest > 0 else "")


# ----------------------------------------------------------------------------- tokens and splits


def split_sizes(n: int, train_val_split: float) -> tuple[int, int]:
    """(train, val) sizes for n >= 2 items: round(n * split) for train, at least one on each side."""
    n_train = min(max(round(n * train_val_split), 1), n - 1)
    return n_train, n - n_train


def encode_examples(enc: tiktoken.Encoding, texts: list[str]) -> np.ndarray:
    """Each text's ids followed by <|endoftext|>, concatenated into one token array."""
    ids = enc.encode_ordinary_batch(texts)
    return np.fromiter(chain.from_iterable(x + [EOT_ID] for x in ids), dtype=TOKEN_DTYPE)


def encode_records(enc: tiktoken.Encoding, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Dolly records as (tokens, response mask): per record its prompt's ids (mask 0), its response's
    ids and <|endoftext|> (mask 1). The ids are those of format_record's whole text (docstring)."""
    prompts = enc.encode_ordinary_batch([format_prompt(DOLLY_TEMPLATE, r["instruction"], r.get("context", ""))
                                         for r in records])
    responses = enc.encode_ordinary_batch([r["response"].strip() for r in records])
    tokens = chain.from_iterable(p + r + [EOT_ID] for p, r in zip(prompts, responses))
    mask = chain.from_iterable([0] * len(p) + [1] * (len(r) + 1) for p, r in zip(prompts, responses))
    return np.fromiter(tokens, dtype=TOKEN_DTYPE), np.fromiter(mask, dtype=MASK_DTYPE)


def build_jsonl(path: Path, data: bytes, enc: tiktoken.Encoding, dataset_size: int, train_val_split: float,
                seed: int) -> tuple[str, np.ndarray, np.ndarray, dict, tuple[np.ndarray, np.ndarray] | None]:
    """(format, train tokens, val tokens, counts, (train mask, val mask) or None) for a JSON Lines input."""
    fmt, records, skipped = parse_jsonl(data)
    if skipped:
        print(f"warning: skipped {len(skipped)} unusable line(s) of {path}: {describe_skips(skipped)}",
              file=sys.stderr)
    if len(records) < 2:
        found = f"{len(records)} usable record(s)" + (f", skipped {describe_skips(skipped)}" if skipped else "")
        raise DataError(f"{path} has {found}; at least 2 are needed (one for train, one for val): give a "
                        f"Dolly JSONL (instruction, context, response) or a JSONL with a 'text' field")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if dataset_size:
        if dataset_size > len(order):
            print(f"dataset_size {dataset_size} is more than the {len(order)} usable records: using all")
        order = order[:dataset_size]
    n_train, n_val = split_sizes(len(order), train_val_split)
    masks = None
    if fmt == "dolly":
        (train, train_mask), (val, val_mask) = (encode_records(enc, [records[i] for i in part])
                                                for part in (order[:n_train], order[n_train:]))
        masks = train_mask, val_mask
    else:
        texts = [records[i]["text"] for i in order]
        train, val = encode_examples(enc, texts[:n_train]), encode_examples(enc, texts[n_train:])
    counts = {"records_usable": len(records), "records_train": n_train, "records_val": n_val,
              "records_skipped": len(skipped), "tokens_train": len(train), "tokens_val": len(val)}
    if masks:
        counts.update(response_tokens_train=int(masks[0].sum()), response_tokens_val=int(masks[1].sum()))
    return fmt, train, val, counts, masks


def build_text(path: Path, data: bytes, enc: tiktoken.Encoding,
               train_val_split: float) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """(format, train tokens, val tokens, counts) for a plain-text document: its token stream, cut."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8 "
                        f"(e.g. iconv -t utf-8) and run again") from None
    ids = enc.encode_ordinary(text)
    if len(ids) < 2:
        raise DataError(f"{path} has {len(ids)} token(s) of text; at least 2 are needed (one for train, "
                        f"one for val): give a longer text")
    n_train, _ = split_sizes(len(ids), train_val_split)
    train = np.array(ids[:n_train] + [EOT_ID], dtype=TOKEN_DTYPE)
    val = np.array(ids[n_train:] + [EOT_ID], dtype=TOKEN_DTYPE)
    counts = {"records_usable": 1, "records_train": 1, "records_val": 1, "records_skipped": 0,
              "tokens_train": len(train), "tokens_val": len(val)}
    return "text", train, val, counts


# ----------------------------------------------------------------------------- output


def temporary_path(path: Path, kind: str = "tmp") -> Path:
    """The hidden sibling where this process stages `path`: `.NAME.KIND<pid>@<host>`, so a later run
    can tell a killed writer's leftover (its process gone) from a live writer's file."""
    return path.with_name(f".{path.name}.{kind}{os.getpid()}@{socket.gethostname()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def remove_leftovers(path: Path, kinds: tuple[str, ...] = ("tmp",)) -> None:
    """Delete the temporaries of `path` (see temporary_path) whose writer on this host is gone,
    and say so: a killed run would otherwise leave them forever (a checkpoint's size each).
    Names without a host are from before hosts were recorded, and count as this host's."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{'|'.join(kinds)})(\d+)(?:@(.+))?")
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # no directory yet: nothing left over
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or match[2] not in (None, socket.gethostname()) or process_alive(int(match[1])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        print(f"removed {entry}: left behind by process {match[1]}, which is gone", file=sys.stderr)


def atomic_write(path: Path, write) -> None:
    """Run write(tmp_path), fsync, then rename over `path`: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(out: Path, train: np.ndarray, val: np.ndarray, meta: dict,
                  masks: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """train.bin, val.bin, the masks (if any), then meta.json; the old meta.json goes first, so it
    always marks a complete set."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        atomic_write(out / "train.bin", train.tofile)
        atomic_write(out / "val.bin", val.tofile)
        for split, mask in zip(("train", "val"), masks or (None, None)):
            if mask is None:  # an earlier Dolly output's mask would not match these tokens
                (out / f"{split}.mask").unlink(missing_ok=True)
            else:
                atomic_write(out / f"{split}.mask", mask.tofile)
        atomic_write(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    except OSError as exc:
        raise DataError(f"cannot write to {out} ({exc.strerror or exc}): pick a writable --out_dir") from None


def load_meta(out_dir: str | Path) -> dict:
    """The meta.json of a prepared data directory (DataError if it is missing or unreadable)."""
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist: prepare the data with "
                        f"python data_prep.py --out_dir {out_dir}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({type(exc).__name__}): delete it and run data_prep.py again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not a data_prep meta file: delete it and run data_prep.py again")
    return meta


def is_up_to_date(out: Path, sha256: str, settings: dict) -> dict | None:
    """The existing meta when out already holds this input's tokens for these settings, else None."""
    try:
        meta = load_meta(out)
        expected_template = DOLLY_TEMPLATE if meta["format"] == "dolly" else None
        current = (meta["version"] == META_VERSION and meta["source"]["sha256"] == sha256
                   and meta["settings"] == settings and meta["template"] == expected_template)
        sizes_ok = all((out / f"{split}.bin").stat().st_size == meta["counts"][f"tokens_{split}"] * TOKEN_DTYPE.itemsize
                       and (meta["mask"] is None or (out / f"{split}.mask").stat().st_size
                            == meta["counts"][f"tokens_{split}"] * MASK_DTYPE.itemsize)
                       for split in ("train", "val"))
    except (DataError, OSError, KeyError, TypeError):
        return None
    return meta if current and sizes_ok else None


# ----------------------------------------------------------------------------- prepare


def prepare(input_path: str | None, out_dir: str, dataset_size: int = 1000, train_val_split: float = 0.9,
            seed: int = 1337, dataset_name: str = "databricks/databricks-dolly-15k",
            input_flag: str = "--input") -> dict:
    """Turn `input_path` (None or '': download `dataset_name`) into out_dir's token files; return the meta.
    Messages name `input_flag` as the caller's flag for the input file."""
    if dataset_size < 0 or dataset_size == 1:
        raise DataError(f"dataset_size {dataset_size} is invalid: use 0 (all records) or at least 2 "
                        f"(one for train, one for val)")
    if not 0.0 < train_val_split < 1.0:
        raise DataError(f"train_val_split {train_val_split} is invalid: use a fraction between 0 and 1, e.g. 0.9")
    out = Path(out_dir)
    for name in ("train.bin", "val.bin", "meta.json"):  # a killed run's temporary files
        remove_leftovers(out / name)
    url = None
    if input_path:
        path = Path(input_path)
        try:
            is_file = path.is_file()
            what = "is a directory" if path.is_dir() else "is not a regular file (a device or a pipe)" \
                if path.exists() else "does not exist"
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            is_file, what = False, f"cannot be used ({getattr(exc, 'strerror', None) or exc})"
        if not is_file:
            raise DataError(f"input file {str(path)[:200]} {what}: pass the path of a data file to {input_flag}")
    else:
        url = dataset_url(dataset_name)
        path = download(url, out.parent / url.rsplit("/", 1)[1], input_flag)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}): check the {input_flag} file") from None
    sha256 = hashlib.sha256(data).hexdigest()
    settings = {"dataset_size": dataset_size, "train_val_split": train_val_split, "seed": seed}

    if (meta := is_up_to_date(out, sha256, settings)) is not None:
        print(f"{out} is up to date (same input sha256 {sha256[:12]} and settings): nothing to do "
              f"(train {meta['counts']['tokens_train']:,} tokens, val {meta['counts']['tokens_val']:,} tokens)")
        return meta

    enc = gpt2_encoding()
    masks = None
    if detect_format(path, data) == "text":
        fmt, train, val, counts = build_text(path, data, enc, train_val_split)
    else:
        fmt, train, val, counts, masks = build_jsonl(path, data, enc, dataset_size, train_val_split, seed)
    meta = {
        "version": META_VERSION,
        "tokenizer": TOKENIZER,
        "vocab_size": VOCAB_SIZE,
        "eot_id": EOT_ID,
        "dtype": "uint16-le",
        "format": fmt,
        "template": DOLLY_TEMPLATE if fmt == "dolly" else None,
        "mask": "response" if masks else None,
        "source": {"path": str(path), "sha256": sha256, "bytes": len(data), "url": url},
        "settings": settings,
        "counts": counts,
    }
    write_outputs(out, train, val, meta, masks)
    if fmt == "text":
        summary = f"one document cut at {train_val_split}: train {len(train):,} tokens, val {len(val):,} tokens"
    else:
        summary = (f"train {counts['records_train']:,} records, {len(train):,} tokens; val {counts['records_val']:,} "
                   f"records, {len(val):,} tokens; {counts['records_skipped']:,} lines skipped")
    print(f"wrote {out} ({fmt}): {summary}")
    return meta


# ----------------------------------------------------------------------------- CLI


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one line (not usage plus error) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python data_prep.py --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per prepare() argument, same defaults."""
    p = OneLineParser(description="Dolly-15k JSONL, a text JSONL or a .txt file -> GPT-2 token files "
                                  "(train.bin, val.bin, meta.json; for Dolly the response masks train.mask, val.mask).")
    p.add_argument("--input", default=None, metavar="FILE", help="local input file (default: download --dataset_name)")
    p.add_argument("--out_dir", default="data/dolly", metavar="DIR", help="output folder (default: data/dolly)")
    p.add_argument("--dataset_size", type=int, default=1000, metavar="N", help="records to keep, 0: all (default: 1000)")
    p.add_argument("--train_val_split", type=float, default=0.9, metavar="F", help="fraction for train (default: 0.9)")
    p.add_argument("--seed", type=int, default=1337, metavar="S", help="shuffle seed (default: 1337)")
    p.add_argument("--dataset_name", default="databricks/databricks-dolly-15k", metavar="OWNER/NAME",
                   help="Hugging Face dataset to download without --input")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a DataError becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        prepare(args.input, args.out_dir, args.dataset_size, args.train_val_split, args.seed, args.dataset_name)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
