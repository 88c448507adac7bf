"""Test-speed helpers for the Llama-3 test modules: the same pure, slow reads done once.

- Meta's tokenizer.model (128256 tokens, 280147 merges) takes a couple of seconds to read, and
  the tests build and convert many checkpoints with that one file.
- gguf-py's GGUFReader, behind `read_model_desc`, takes several seconds on a Llama-3 header
  (400,000 vocabulary strings, each its own numpy view); every command reads the header first.

Both are memoized for the module that imports these fixtures (the real function still runs
once per file). Nothing else about the code under test changes.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def vocab_once():
    from llamalocal.convert import convert as convert_mod
    from llamalocal.convert import sample as sample_mod

    real = convert_mod.load_vocab
    seen: dict[bytes, object] = {}

    def cached(path):
        key = path.read_bytes()
        if key not in seen:
            seen[key] = real(path)
        return seen[key]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(convert_mod, "load_vocab", cached)
        m.setattr(sample_mod, "load_vocab", cached)
        yield


@pytest.fixture(autouse=True, scope="module")
def header_once():
    from pathlib import Path

    from llamalocal import model_desc

    real = model_desc.read_model_desc
    seen: dict[tuple, object] = {}

    def cached(path):
        p = Path(path)
        st = p.stat() if p.is_file() else None
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size) if st else None
        if key is None:
            return real(path)
        if key not in seen:
            seen[key] = real(path)
        return seen[key]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(model_desc, "read_model_desc", cached)
        yield
