"""Optimus Prime: `pip install -e .` (the extension in csrc/ is JIT-built on first use).

On a machine without a GPU, install the CPU build of torch first (pip's default torch is the CUDA
build, with about 5 GB of NVIDIA libraries):
    pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install -e .
"""
from setuptools import setup

setup(
    name="optimus-prime",
    version="0.1.0",
    description="A small, fast, hackable Llama-style language model engine",
    license="MIT",
    py_modules=["optimus", "data_prep", "bench", "serve"],
    # The chat page of `optimus.py serve`: serve.py looks beside itself, then here under sys.prefix.
    data_files=[("share/optimus-prime", ["serve_page.html"])],
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
