"""Build llama.cpp's own measuring tools from the llama-cpp-python 0.3.36 source distribution.

The benchmark scripts compare llamalocal's `perplexity`, `bench`, `imatrix` and `convert --imatrix`
with llama.cpp's `llama-perplexity`, `llama-bench`, `llama-imatrix` and `llama-quantize` built from
the very sources llama-cpp-python wraps, so any difference is ours and not a version skew. Used
only by scripts, never by the tests.

    python scripts/peer_tools.py                       # download the sdist, build, print the bin dir
    python scripts/peer_tools.py --sdist /tmp/peer/llama_cpp_python-0.3.36.tar.gz
    python scripts/peer_tools.py --sdist /tmp/peer/llama_cpp_python-0.3.36   # an unpacked sdist

A finished build is reused: the cache (~/.cache/llamalocal-peer, or $LLAMALOCAL_PEER_CACHE)
keeps the extracted sources and the build folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}"
TARGETS = ("llama-perplexity", "llama-bench", "llama-quantize", "llama-imatrix")


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMALOCAL_PEER_CACHE") or Path.home() / ".cache" / "llamalocal-peer")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _download_sdist(dest: Path) -> Path:
    """pip's own client fetches the sdist; --no-binary keeps it from picking a wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(dest)], check=True)
    found = sorted(dest.glob(f"{SDIST_NAME}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no {SDIST_NAME}.tar.gz in {dest}")
    return found[0]


def _extract(tarball: Path, dest: Path) -> Path:
    root = dest / SDIST_NAME
    if (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return root
    _log(f"extracting {tarball} -> {dest}")
    with tarfile.open(tarball) as tf:
        tf.extractall(dest, filter="data")
    return root


def llama_cpp_source(sdist: Path | None) -> Path:
    """The vendor/llama.cpp folder of the sdist: given (tarball or unpacked dir) or downloaded."""
    cache = cache_dir()
    if sdist is None:
        tarball = next(iter(sorted(cache.glob(f"{SDIST_NAME}.tar.gz"))), None) or _download_sdist(cache)
        root = _extract(tarball, cache)
    elif sdist.is_dir():
        root = sdist
    else:
        root = _extract(sdist, cache)
    src = root / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise SystemExit(f"{src} is not a llama.cpp source tree (no CMakeLists.txt)")
    return src


def bin_dir() -> Path:
    return cache_dir() / "build" / "bin"


def tool(name: str) -> Path | None:
    """Path of a built tool, or None if the build has not been run."""
    p = bin_dir() / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def build(sdist: Path | None = None, jobs: int = 2) -> Path:
    """Configure and build the tools (CPU only, no network features); returns the bin dir."""
    if all(tool(t) for t in TARGETS):
        _log(f"reusing the finished build in {bin_dir()}")
        return bin_dir()
    src = llama_cpp_source(sdist)
    build_dir = cache_dir() / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *generator,
                    "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DGGML_NATIVE=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"],
                   check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--config", "Release",
                    "--target", *TARGETS, "-j", str(jobs)], check=True)
    missing = [t for t in TARGETS if not tool(t)]
    if missing:
        raise SystemExit(f"build finished but {', '.join(missing)} not found in {bin_dir()}")
    return bin_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, default=None,
                    help=f"an existing {SDIST_NAME}.tar.gz or its unpacked folder (skips the download)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args()
    print(build(args.sdist, args.jobs))


if __name__ == "__main__":
    main()
