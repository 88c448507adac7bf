"""gguf_header: the header read without the vocabulary equals gguf-py's reading of it."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import gguf
import pytest

from llamalocal.errors import GGUFError
from llamalocal.gguf_header import LongArray, read_header
from llamalocal.model_desc import read_model_desc

REPO = Path(__file__).resolve().parents[1]


def _check_against_gguf_py(path: Path) -> None:
    ours = read_header(path)
    ref = gguf.GGUFReader(str(path))
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(ref_fields)
    for key, f in ref_fields.items():
        got = ours.fields[key]
        want = f.contents()
        if isinstance(got, LongArray):
            assert got.count == len(want) and got.type == f.types[-1], key
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), key
        else:
            assert got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.shape == tuple(int(x) for x in b.shape)
        assert a.type == b.tensor_type
        assert a.offset == b.data_offset
        assert a.n_bytes == int(b.n_bytes) and a.n_elements == int(b.n_elements)


@pytest.mark.parametrize("preset", ["f32", "f16", "q8_0", "q4_0", "q4_k_m", "q2_k"])
def test_converted_header_equals_gguf_py(converted, preset):
    _check_against_gguf_py(converted("tiny-v2", preset))


def test_llama3_vocab_header_equals_gguf_py(llama_cpp_models):
    # llama.cpp's own vocab-only GGUF of Llama 3's tokenizer: 128256 tokens, 280147 merges
    path = llama_cpp_models / "ggml-vocab-llama-bpe.gguf"
    _check_against_gguf_py(path)
    h = read_header(path)
    assert isinstance(h.fields["tokenizer.ggml.tokens"], LongArray)
    assert len(h.fields["tokenizer.ggml.tokens"]) == 128256


def test_model_desc_from_header(converted):
    path = converted("tiny-v1", "q4_0")
    d = read_model_desc(path)
    ref = gguf.GGUFReader(str(path))
    assert d.n_params == sum(int(t.n_elements) for t in ref.tensors)
    assert d.weights_bytes == sum(int(t.n_bytes) for t in ref.tensors)
    assert d.n_vocab == len(ref.fields["tokenizer.ggml.tokens"].data)
    assert (d.n_layers, d.n_embd, d.n_head) == (4, 256, 4)


def test_start_up_does_not_grow_with_the_vocabulary(llama_cpp_models):
    # reading the 128k-token header takes a small fraction of a second (gguf-py: seconds)
    import time

    path = llama_cpp_models / "ggml-vocab-llama-bpe.gguf"
    read_header(path)
    t0 = time.perf_counter()
    read_header(path)
    assert time.perf_counter() - t0 < 0.5


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("cut", [5, 12, 30, 100, 400])
def test_truncated_headers_are_one_error(converted, tmp_path, cut):
    src = converted("tiny-v1", "f16").read_bytes()
    with pytest.raises(GGUFError):
        read_header(_write(tmp_path / "cut.gguf", src[:cut]))


def test_hostile_counts_are_refused_without_work(tmp_path):
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62)
    with pytest.raises(GGUFError, match="more than a"):
        read_header(_write(tmp_path / "big.gguf", head + b"\0" * 64))
    # a string array claiming 2**40 entries in a tiny file
    kv = struct.pack("<Q", 3) + b"abc" + struct.pack("<IIQ", 9, 8, 2**40) + struct.pack("<Q", 1) + b"x"
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_header(_write(tmp_path / "arr.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv))
    # a string whose length runs past the end
    kv = struct.pack("<Q", 2**63) + b"k"
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_header(_write(tmp_path / "str.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + b"\0" * 16))


def test_not_a_gguf(tmp_path):
    with pytest.raises(GGUFError, match="not a GGUF"):
        read_header(_write(tmp_path / "x.gguf", b"PK\x03\x04" + b"\0" * 100))
    sys.stdout.flush()


def test_header_reading_leaves_gguf_package_unimported(converted):
    """`plan`, `info` and `generate` read headers with gguf-py's constants alone (its package imports
    a writer, lazy tensors and yaml); a later `import gguf` shares those very enums."""
    import subprocess
    import sys

    code = ("import sys; from llamalocal.model_desc import read_model_desc; "
            f"d = read_model_desc({str(converted('tiny-v1', 'q8_0'))!r}); assert d.n_layers > 0; "
            "assert 'gguf' not in sys.modules, 'gguf imported'; "
            "from llamalocal import gguf_header; import gguf; "
            "assert gguf.GGMLQuantizationType is gguf_header.GGMLQuantizationType; "
            "assert gguf.Keys is gguf_header.Keys and gguf.GGML_QUANT_SIZES is gguf_header.GGML_QUANT_SIZES; "
            "from gguf import GGUFReader, GGUFWriter")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
