"""Shared test setup: the repo on sys.path, tiktoken's offline cache, small helpers."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_cache = ROOT.parent / "shared" / "data" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _cache.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)

requires_cuda = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

# The kernel tests' parameters: every device (CUDA skipped without a GPU) and floating dtype.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch."))
          for d in (__import__("torch").float32, __import__("torch").bfloat16, __import__("torch").float16)]
