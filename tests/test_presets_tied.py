"""The tied-embedding rule (Llama-3.2 1B/3B: no output.weight) against llama.cpp's quantizer.

As tests/test_presets.py does for the other rules: small F32 llama GGUFs without output.weight,
quantized by llama.cpp's own `llama_model_quantize` at every preset; token_embd must get the type
`tensor_type(..., tied_embeddings=True)` names and the bytes our quantizer writes. An untied
twin shows the rule is what makes the difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is needed to run llama.cpp's quantizer")

import gguf  # noqa: E402
from tiny_llama_gguf import Model, write_f32_gguf  # noqa: E402

from llamalocal.convert.presets import PRESETS, Preset, tensor_type  # noqa: E402
from llamalocal.convert.quantize import quantize_rows  # noqa: E402

N_LAYERS, N_HEAD, N_HEAD_KV = 2, 4, 2


def _write(path: Path, dim: int, vocab: int, tied: bool, seed: int) -> dict[str, np.ndarray]:
    return write_f32_gguf(path, Model(n_layers=N_LAYERS, dim=dim, ffn=2 * dim, n_head=N_HEAD, n_head_kv=N_HEAD_KV,
                                      vocab=vocab, tied=tied), seed)


def _quantize(src: Path, dst: Path, preset: Preset, imatrix: dict[str, np.ndarray] | None) -> gguf.GGUFReader:
    from llamalocal.convert import native

    native.model_quantize(src, dst, int(preset.ftype), nthread=2, imatrix=imatrix)
    return gguf.GGUFReader(str(dst))


def _importance(tensors: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A made-up importance per column of every matrix (the presets that cannot do without one)."""
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(0.1, 2.0, a.shape[1]).astype(np.float32) for n, a in tensors.items() if a.ndim == 2}


# rows of 256 (every k-quant fits) and of 288 (Q6_K does not: llama.cpp falls back)
@pytest.mark.parametrize("dim", [256, 288])
@pytest.mark.parametrize("preset", PRESETS)
def test_token_embd_of_a_tied_model_as_llama_quantize(tmp_path, preset, dim):
    p = PRESETS[preset]
    chosen = {}
    for tied in (True, False):
        src = tmp_path / f"{tied}.gguf"
        tensors = _write(src, dim, 64, tied, seed=dim)
        imatrix = _importance(tensors, seed=dim) if p.needs_imatrix else None
        reader = _quantize(src, tmp_path / f"{tied}-{preset}.gguf", p, imatrix)
        assert ("output.weight" in {t.name for t in reader.tensors}) is not tied
        t = next(t for t in reader.tensors if t.name == "token_embd.weight")
        ours = tensor_type(p, t.name, (64, dim), n_layers=N_LAYERS, n_head=N_HEAD, n_head_kv=N_HEAD_KV,
                           tied_embeddings=tied, has_imatrix=imatrix is not None)
        assert ours == t.tensor_type, (tied, ours.name, gguf.GGMLQuantizationType(t.tensor_type).name)
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        importance = imatrix.get(t.name) if imatrix else None
        assert np.array_equal(quantize_rows(tensors[t.name], ours, importance=importance), got)
        chosen[tied] = ours
    if preset == "q4_0":  # the rule matters: the output's Q6_K (Q8_0 for rows of 288), not Q4_0
        assert chosen[False] == gguf.GGMLQuantizationType.Q4_0 and chosen[True] != chosen[False]
