"""model_desc: GGUF headers read without touching tensor data; the reference LLaMA sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from llamalocal.errors import BadInputError, GGUFError, ModelNotFoundError
from llamalocal.model_desc import REFERENCE_QUANTS, REFERENCE_SHAPES, read_model_desc, reference_model


def write_gguf(path: Path, *, n_layers: int = 2, n_embd: int = 64, n_ff: int = 128, n_head: int = 4,
               n_head_kv: int = 4, n_vocab: int = 300, n_ctx: int = 256, dtype=np.float32,
               name: str = "test-model") -> Path:
    """A loadable llama GGUF with synthetic weights and a byte-fallback vocabulary (>= 259 tokens):
    scripts/synth_gguf.py's, at sizes small enough for unit tests."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from synth_gguf import write_model

    return write_model(path, n_layers=n_layers, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                       n_vocab=n_vocab, n_ctx=n_ctx, dtype=dtype, name=name)


def test_reads_shapes_and_bytes(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", n_layers=3, n_embd=64, n_ff=160, n_head=8, n_head_kv=2)
    d = read_model_desc(path)
    assert (d.arch, d.n_layers, d.n_embd, d.n_head, d.n_head_kv, d.n_ff, d.n_vocab, d.n_ctx_train) == \
        ("llama", 3, 64, 8, 2, 160, 300, 256)
    assert d.name == "test-model" and d.file_type == "f32" and d.head_dim == 8
    n_kv = 16
    per_layer = 4 * (2 * 64 + 64 * 64 * 2 + 2 * n_kv * 64 + 3 * 160 * 64)
    assert d.layer_bytes == [per_layer] * 3
    assert d.token_embd_bytes == 4 * 300 * 64
    assert d.output_bytes == 4 * (300 * 64 + 64)
    assert d.other_bytes == 0
    assert d.weights_bytes == sum(d.tensor_type_bytes.values()) < d.file_bytes == path.stat().st_size
    assert d.output_type == "f32" and d.layer_type_bytes[0] == {"f32": per_layer}


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        read_model_desc(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(GGUFError, match="not a GGUF"):
        read_model_desc(p)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated(tmp_path, keep):
    p = write_gguf(tmp_path / "m.gguf")
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError) as e:
        read_model_desc(p)
    assert "\n" not in str(e.value)


def test_truncated_header(tmp_path):
    p = write_gguf(tmp_path / "m.gguf")
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(GGUFError):
        read_model_desc(p)


# Published GGUF sizes of llama.cpp's own conversions (e.g. TheBloke's Llama-2 files: 7B Q4_0
# 3.83 GB, Q8_0 7.16 GB; 13B Q4_0 7.37 GB; 70B Q4_0 38.87 GB; 7B f16 13.5 GB).
@pytest.mark.parametrize("size,quant,gb", [("7B", "q4_0", 3.83), ("7B", "q8_0", 7.16), ("13B", "q4_0", 7.37),
                                           ("70B", "q4_0", 38.87), ("7B", "f16", 13.48)])
def test_reference_sizes_match_real_files(size, quant, gb):
    d = reference_model(size, quant)
    assert d.weights_bytes / 1e9 == pytest.approx(gb, rel=0.01)


def test_reference_shapes():
    d7 = reference_model("7B", "q4_0")
    assert d7.n_params == pytest.approx(6.74e9, rel=0.01)
    assert d7.output_type == "q6_k" and d7.token_embd_type == "q4_0"
    d70 = reference_model("70B", "q2_k")
    assert (d70.n_head, d70.n_head_kv, d70.n_ctx_train, d70.n_ff) == (64, 8, 4096, 28672)
    # the 70B rule: attn_v gets Q5_K
    assert "q5_k" in d70.layer_type_bytes[0]
    for s in REFERENCE_SHAPES:
        sizes = [reference_model(s, q).weights_bytes for q in REFERENCE_QUANTS]
        assert sizes == sorted(sizes, reverse=True)  # f16 > q8_0 > q5_1 > q4_0 > q2_k


def test_reference_unknown():
    with pytest.raises(BadInputError):
        reference_model("8B", "q4_0")
    with pytest.raises(BadInputError):
        reference_model("7B", "q9_9")
