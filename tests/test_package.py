"""Packaging: what `pip install` gets from setup.py (console script, extras) and the license."""
import runpy

import optimus
from conftest import ROOT


def setup_metadata(monkeypatch) -> dict:
    """The arguments setup.py passes to setuptools.setup (nothing is built or installed)."""
    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


def test_console_script_runs_main_and_extras_cover_the_readme(monkeypatch):
    meta = setup_metadata(monkeypatch)
    assert meta["entry_points"]["console_scripts"] == ["optimus = optimus:main"]
    # The generated script does sys.exit(main()): main must return the exit code, not print it.
    assert optimus.main(["train", "--no_such_field", "1"]) == 2 and optimus.main(["--help"]) == 0
    assert {"transformers", "safetensors"} <= set(meta["extras_require"]["hf"])  # the README's export lines import both
    assert "pytest" in meta["extras_require"]["test"] and "optimus" in meta["py_modules"]


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 The Optimus Prime authors" in text
