"""Optimus Prime: `pip install -e .` (the extension in csrc/ is JIT-built on first use)."""
from setuptools import setup

setup(
    name="optimus-prime",
    version="0.1.0",
    description="A small, fast, hackable Llama-style language model engine",
    py_modules=["optimus", "data_prep", "bench", "serve"],
    # The chat page of `optimus.py serve`: serve.py looks beside itself, then here under sys.prefix.
    data_files=[("share/optimus-prime", ["serve_page.html"])],
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy", "tiktoken", "ninja", "pybind11"],
    extras_require={
        "test": ["pytest", "transformers", "safetensors", "tensorboard", "openai", "selenium"],
        "hf": ["safetensors"],
        "tensorboard": ["tensorboard"],
    },
)
