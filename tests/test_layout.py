"""The package layout the architecture relies on: the converter installs as llamalocal.convert,
dependencies point one way, and every ctypes call lives in one module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_plain_convert_is_not_importable_but_the_cli_works(tmp_path):
    # run outside the checkout, so only what is installed can be imported
    r = subprocess.run([sys.executable, "-c", "import convert"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'convert'" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import llamalocal.convert.convert as c; print(c.__file__)"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).name == "convert.py"
    r = subprocess.run([sys.executable, "-m", "llamalocal", "convert", "--help"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Convert a Meta LLaMA checkpoint" in r.stdout


def test_converter_depends_on_nothing_above_it():
    for path in sorted((REPO / "convert").glob("*.py")):
        for name in _imports(path):
            if name == "llamalocal" or name.startswith("llamalocal."):
                assert name.startswith("llamalocal.convert"), f"{path.name} imports {name}"


def test_ctypes_only_in_the_native_module():
    offenders = []
    for folder in ("convert", "llamalocal"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name != "native.py" and "ctypes" in _imports(path):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_native_refuses_another_llama_cpp_python(monkeypatch):
    import sys
    import types

    import pytest

    from llamalocal.convert import native
    from llamalocal.errors import LlamalocalError

    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)  # not imported yet: its metadata says
    monkeypatch.setattr(native, "installed_version", lambda: "0.3.99")
    monkeypatch.delenv("LLAMALOCAL_ALLOW_LLAMA_CPP_VERSION", raising=False)
    with pytest.raises(LlamalocalError, match=r"0\.3\.99 is installed but llamalocal is built against 0\.3\.36"):
        native.check_version()
    monkeypatch.setenv("LLAMALOCAL_ALLOW_LLAMA_CPP_VERSION", "1")
    native.check_version()
    monkeypatch.setattr(native, "installed_version", lambda: native.PINNED_LLAMA_CPP_PYTHON)
    monkeypatch.delenv("LLAMALOCAL_ALLOW_LLAMA_CPP_VERSION")
    native.check_version()
    # imported: the module's own __version__ is what is loaded
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.98"))
    with pytest.raises(LlamalocalError, match=r"0\.3\.98 is installed"):
        native.check_version()


def test_every_package_is_installed():
    """Each folder of modules under llamalocal/ is listed in pyproject.toml's packages (a wheel built
    without one would lack it while an editable install still finds it)."""
    import pytest

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"llamalocal"} | {"llamalocal." + d.name for d in (REPO / "llamalocal").iterdir()
                              if (d / "__init__.py").is_file()}
    assert found == listed
