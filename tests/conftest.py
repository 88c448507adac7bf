"""Shared fixtures: converted GGUFs of the real tiny checkpoints (or synthetic ones), held-out text."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never read or write the user's cache (the record of verified downloads): this process and
# every CLI child it starts use a fresh one.
os.environ["LLAMALOCAL_CACHE"] = tempfile.mkdtemp(prefix="llamalocal-test-cache-")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
META_TINY = SHARED / "fixtures" / "meta-tiny"
LLAMA_TOKENIZER = SHARED / "fixtures" / "llama-tokenizer" / "tokenizer.model"
LLAMA3_TOKENIZER = SHARED / "fixtures" / "llama3-tokenizer" / "tokenizer.model"


def shared_available() -> bool:
    return (META_TINY / "tiny-v1" / "params.json").is_file()


needs_shared = pytest.mark.skipif(not shared_available(), reason="../shared/fixtures (real Meta-layout checkpoints) not present")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A writable copy of meta-tiny (tokenizer.model + tiny-v1/ + tiny-v2/), or a synthetic stand-in
    with the same layout (random weights, trained tokenizer) when ../shared is absent."""
    root = tmp_path_factory.mktemp("meta-tiny")
    if shared_available():
        for item in META_TINY.iterdir():
            dest = root / item.name
            if item.is_dir():
                shutil.copytree(item, dest)
            else:
                shutil.copy(item, dest)
        for p in root.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        return root
    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    v1 = SampleSpec(params=ModelParams(dim=256, n_layers=4, n_heads=4, multiple_of=256, norm_eps=1e-6), n_shards=2)
    build_sample(root, "tiny-v1", v1)
    v2 = SampleSpec(params=ModelParams(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=256,
                                       ffn_dim_multiplier=1.3, norm_eps=1e-5), dtype="bf16", rope_freqs=False, seed=1)
    tok = root / "tokenizer.model"
    build_sample(root, "tiny-v2", v2, tokenizer=tok)
    return root


@pytest.fixture(scope="session")
def converted(tiny_checkpoints, tmp_path_factory) -> Callable[[str, str], Path]:
    """converted("tiny-v1", "q4_0") -> path of that checkpoint converted by llamalocal at that preset."""
    from llamalocal.convert.convert import convert

    out_dir = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str = "tiny-v1", preset: str = "f32") -> Path:
        key = (model, preset)
        if key not in cache:
            cache[key] = convert(tiny_checkpoints / model, preset, out_dir / f"{model}-{preset}.gguf").path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def heldout_text() -> str:
    """Text the tiny models never saw (synthetic prose when ../shared is absent)."""
    path = META_TINY / "heldout.txt"
    if path.is_file():
        return path.read_text()
    from llamalocal.convert.sample import _corpus

    return "\n".join(_corpus()[:800])


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    """vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist (its vocab test files under models/, its
    convert scripts): from scripts/peer_tools.py's cache, pip-downloaded and unpacked when absent."""
    import importlib.util
    import subprocess
    import tarfile

    spec = importlib.util.spec_from_file_location("peer_tools", REPO / "scripts" / "peer_tools.py")
    assert spec is not None and spec.loader is not None
    peer_tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_tools)
    try:
        return peer_tools.llama_cpp_source(None)
    except (SystemExit, OSError, subprocess.SubprocessError, tarfile.TarError) as e:  # offline, nothing cached
        pytest.skip(f"the llama-cpp-python {peer_tools.VERSION} sdist is not available ({e})")


@pytest.fixture(scope="session")
def llama3_tokenizer() -> Path:
    """Meta's real Llama-3 tokenizer.model: ../shared's copy, else the identical file llama-models ships."""
    from llamalocal.convert.sample import llama3_tokenizer_file

    found = llama3_tokenizer_file(LLAMA3_TOKENIZER)
    if found is None:
        pytest.skip("no Llama-3 tokenizer.model (../shared absent and llama-models not installed)")
    return found


@pytest.fixture(scope="session")
def llama_cpp_models(llama_cpp_src) -> Path:
    """llama.cpp's models/ folder: vocab-only GGUFs of real tokenizers and their test vectors."""
    return llama_cpp_src / "models"
