"""scripts/install.sh (the README's install and CI's): RPC on, and a wheel pip cached without RPC
rebuilt rather than silently reused. Run against stand-ins for python3 and pip that record what
they were asked to do (the real rebuild takes minutes and would empty pip's shared cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `python3 -m venv .venv` makes a .venv whose pip and python are these stand-ins
_PYTHON3 = """#!/bin/sh
mkdir -p .venv/bin
cat > .venv/bin/pip <<'EOF'
#!/bin/sh
echo "pip $* | CMAKE_ARGS=$CMAKE_ARGS" >> .venv/calls
case "$*" in *--force-reinstall*) [ -n "$FAKE_REBUILD_FAILS" ] || touch .venv/has_rpc ;; esac
EOF
cat > .venv/bin/python <<'EOF'
#!/bin/sh
case "$*" in
  *llama_supports_rpc*) [ -e .venv/has_rpc ] ;;
  *importlib.metadata*) echo 0.3.36 ;;
esac
EOF
chmod +x .venv/bin/pip .venv/bin/python
[ -n "$FAKE_CACHED_HAS_RPC" ] && touch .venv/has_rpc
exit 0
"""


def install(tmp_path: Path, spec: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(REPO / "scripts" / "install.sh", tmp_path / "scripts" / "install.sh")
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(_PYTHON3)
    (bin_dir / "python3").chmod(0o755)
    shutil.rmtree(tmp_path / ".venv", ignore_errors=True)
    full_env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env['PATH']}"
    full_env.update(env)
    r = subprocess.run(["sh", str(tmp_path / "scripts" / "install.sh"), spec], capture_output=True, text=True,
                       env=full_env, timeout=60)
    calls = (tmp_path / ".venv" / "calls").read_text().splitlines()
    return r, calls


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_a_build_with_rpc_is_installed_once(tmp_path):
    r, calls = install(tmp_path, ".[test]", FAKE_CACHED_HAS_RPC="1")
    assert r.returncode == 0, r.stderr
    assert calls == ["pip install -q -e .[test] | CMAKE_ARGS=-DGGML_RPC=on"]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_a_cached_wheel_without_rpc_is_removed_and_rebuilt(tmp_path):
    r, calls = install(tmp_path, ".", CMAKE_ARGS="-DGGML_CUDA=on")
    assert r.returncode == 0, r.stderr
    assert calls == [
        "pip install -q -e . | CMAKE_ARGS=-DGGML_CUDA=on -DGGML_RPC=on",
        "pip cache remove llama_cpp_python | CMAKE_ARGS=-DGGML_CUDA=on -DGGML_RPC=on",
        "pip install -q --force-reinstall --no-deps llama-cpp-python==0.3.36 | CMAKE_ARGS=-DGGML_CUDA=on -DGGML_RPC=on",
    ]
    assert "built without RPC" in r.stderr


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_an_install_still_without_rpc_fails(tmp_path):
    r, _ = install(tmp_path, ".", FAKE_REBUILD_FAILS="1")
    assert r.returncode == 1 and "still has no RPC backend" in r.stderr
