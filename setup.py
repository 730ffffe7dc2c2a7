"""Optimus Prime: `pip install -e .` (the extension in csrc/ is JIT-built on first use).

On a machine without a GPU, install the CPU build of torch first (pip's default torch is the CUDA
build, with about 5 GB of NVIDIA libraries):
    pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install -e .
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent

setup(
    name="optimus-prime",
    version="0.1.0",
    description="A small, fast, hackable Llama-style language model engine",
    license="MIT",
    py_modules=["optimus", "data_prep", "bench", "serve"],
    # The chat page of `optimus.py serve` and the extension's sources (JIT-built on first use):
    # serve.py and optimus.py look beside themselves, then here under sys.prefix.
    data_files=[("share/optimus-prime", ["serve_page.html"]),
                ("share/optimus-prime/csrc", sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").iterdir()
                                                    if p.suffix in (".cpp", ".cu", ".h")))],
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy", "tiktoken", "ninja", "pybind11"],
    extras_require={
        "test": ["pytest", "transformers", "safetensors", "tensorboard", "openai", "selenium"],
        "hf": ["transformers", "safetensors"],  # export needs safetensors; loading the export, transformers
        "tensorboard": ["tensorboard"],
    },
    # `optimus train ...` after pip install; the generated script exits with main()'s return code.
    entry_points={"console_scripts": ["optimus = optimus:main"]},
)
