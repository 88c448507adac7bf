"""Every preset is as good as llama.cpp's own `llama-quantize` of the same weights.

The peer: our f16 GGUF (lossless for fp16 weights) quantized by llama.cpp's
`llama_model_quantize` at the same preset. Ours: the Meta checkpoint converted straight to the
preset in one pass. Same tensor types, same ggml quantizers -> the same bytes, and perplexity
on held-out text within 1 %.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

QUANTIZED = ["q8_0", "q5_0", "q5_1", "q5_k_m", "q4_0", "q4_1", "q4_k_m", "q3_k_m", "q2_k"]


@pytest.fixture(scope="module")
def peer(converted, tmp_path_factory):
    """peer(model, preset) -> llama_model_quantize(f16 GGUF of the same checkpoint, preset)."""
    import llama_cpp

    from llamalocal.convert.presets import parse_preset

    out = tmp_path_factory.mktemp("peer")
    cache = {}

    def get(model, preset):
        if (model, preset) not in cache:
            dst = out / f"{model}-{preset}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = int(parse_preset(preset).ftype)
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(converted(model, "f16")).encode(), str(dst).encode(), params)
            assert rc == 0
            cache[(model, preset)] = dst
        return cache[(model, preset)]

    return get


@pytest.mark.parametrize("preset", QUANTIZED)
def test_same_types_and_bytes_as_llama_quantize(converted, peer, preset):
    """tiny-v1 stores fp16, so the f16 route loses nothing and the outputs must be identical."""
    ours, theirs = gguf.GGUFReader(converted("tiny-v1", preset)), gguf.GGUFReader(peer("tiny-v1", preset))
    theirs_by_name = {t.name: t for t in theirs.tensors}
    assert sorted(theirs_by_name) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:
        p = theirs_by_name[t.name]
        assert t.tensor_type == p.tensor_type, f"{t.name}: {t.tensor_type.name} vs llama.cpp {p.tensor_type.name}"
        assert np.array_equal(t.data, p.data), f"{t.name} bytes differ from llama-quantize's"


@pytest.mark.parametrize("preset", QUANTIZED)
@pytest.mark.parametrize("model", ["tiny-v1", "tiny-v2"])
def test_perplexity_no_worse_than_llama_quantize(converted, peer, heldout_text, model, preset):
    from llamalocal.perplexity import perplexity

    ours = perplexity(converted(model, preset), heldout_text, n_ctx=256, chunks=12, threads=2)
    theirs = perplexity(peer(model, preset), heldout_text, n_ctx=256, chunks=12, threads=2)
    assert ours.ppl <= theirs.ppl * 1.01, f"{preset}: ours {ours.ppl:.4f} vs llama-quantize {theirs.ppl:.4f}"
