"""Packaging: what `pip install` gets from setup.py (console script, extras) and the license."""
import runpy
import shutil
import subprocess
import sys
import zipfile

import pytest

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


def test_a_plain_install_ships_the_extension_sources_and_the_page(tmp_path):
    """`pip install .` (not -e) puts the modules in site-packages, away from the checkout: the
    wheel must carry csrc/ and the chat page as data under share/optimus-prime, which pip installs
    below sys.prefix, where optimus.CSRC_DIRS and serve.PAGE_PATHS look second."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "optimus.py", "data_prep.py", "bench.py", "serve.py", "serve_page.html"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    # Build isolation, as `pip install .` itself: pip fetches setuptools from the index (the venv's may be too old).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = "optimus_prime-0.1.0.data/data/share/optimus-prime/"
    sources = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h"))
    assert len(sources) > 10 and {data + "csrc/" + name for name in sources} <= names
    assert data + "serve_page.html" in names and "optimus.py" in names


def test_extension_sources_are_found_beside_the_module_or_under_the_prefix(tmp_path, monkeypatch):
    beside, prefix = tmp_path / "beside", tmp_path / "share" / "optimus-prime" / "csrc"
    prefix.mkdir(parents=True)
    (prefix / "op.cpp").write_text("// an op\n")
    monkeypatch.setattr(optimus, "CSRC_DIRS", (beside, prefix))
    assert optimus.csrc_dir() == prefix
    (prefix / "op.cpp").unlink()
    with pytest.raises(RuntimeError, match=f"no extension sources found in {beside} or {prefix}.*--impl ref"):
        optimus.csrc_dir()
