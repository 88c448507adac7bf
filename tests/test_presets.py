"""convert.presets against llama.cpp itself.

For small llama GGUFs written at F32 with gguf-py, run llama.cpp's own `llama_model_quantize` at
every preset, without and with an importance matrix, then check, for every tensor of the result,
that `tensor_type` names the type llama.cpp chose and that `quantize_rows` (given the same
importance) gives the very bytes llama.cpp wrote; and that the presets llama.cpp refuses without
an importance matrix are exactly those marked `needs_imatrix`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is needed to run llama.cpp's quantizer")

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tiny_llama_gguf import Model, shapes_of, write_f32_gguf  # noqa: E402

from llamalocal.convert import native  # noqa: E402
from llamalocal.convert.presets import (  # noqa: E402
    PRESETS,
    Preset,
    parse_preset,
    requires_imatrix,
    tensor_type,
    use_more_bits,
)
from llamalocal.convert.quantize import quantize_rows  # noqa: E402
from llamalocal.errors import BadInputError, LlamalocalError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# tiny llama GGUFs
# ---------------------------------------------------------------------------------------------


MODELS = {
    # use_more_bits picks layers 0, 3, 6, 7 of 8 and 0, 1, 4, 7, 10, 13, 14, 15 of 16
    "mha-8": Model(n_layers=8, dim=256, ffn=512, n_head=4, n_head_kv=4, rows=24),
    # GQA factor 4: Q2_K's attn_v goes to Q4_K instead of Q3_K
    "gqa4-16": Model(n_layers=16, dim=256, ffn=512, n_head=8, n_head_kv=2, rows=24),
    # rows of 288 (not a multiple of 256: k-quants fall back) and ffn_down rows of 200 (not even
    # a multiple of 32: F16)
    "odd-rows": Model(n_layers=4, dim=288, ffn=200, n_head=4, n_head_kv=4, rows=24),
    # llama.cpp's "70B" (80 layers with GQA): attn_v Q3_K/Q4_K -> Q5_K ...
    "70b": Model(n_layers=80, dim=256, ffn=256, n_head=8, n_head_kv=1, vocab=16, rows=8),
    # ... but not "65B" (80 layers, no GQA)
    "65b": Model(n_layers=80, dim=256, ffn=256, n_head=8, n_head_kv=8, vocab=16, rows=8),
}


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    d = tmp_path_factory.mktemp("f32")
    return {key: (d / f"{key}.gguf", write_f32_gguf(d / f"{key}.gguf", m, seed=i))
            for i, (key, m) in enumerate(MODELS.items())}


def _importance(tensors: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A stand-in imatrix: positive per-column weights for every 2-D tensor llama-imatrix would
    cover (the blk.* matmuls) plus output.weight (as with --process-output)."""
    rng = np.random.default_rng(seed)
    return {name: rng.gamma(0.5, 2.0, a.shape[-1]).astype(np.float32) for name, a in tensors.items()
            if a.ndim == 2 and name != "token_embd.weight"}


def _llama_quantize(src: Path, dst: Path, preset: Preset, imatrix: dict[str, np.ndarray] | None = None) -> None:
    native.model_quantize(src, dst, int(preset.ftype), nthread=2, imatrix=imatrix)


def _check_against_llama_cpp(out: Path, m: Model, p: Preset, tensors: dict[str, np.ndarray],
                             imatrix: dict[str, np.ndarray] | None) -> None:
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].contents()) == int(p.ftype)
    assert {t.name for t in reader.tensors} == set(tensors)

    wrong = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne order -> numpy (rows, cols)
        assert shape == tensors[t.name].shape
        ours = tensor_type(p, t.name, shape, n_layers=m.n_layers, n_head=m.n_head, n_head_kv=m.n_head_kv,
                           has_imatrix=imatrix is not None)
        if ours != t.tensor_type:
            wrong[t.name] = (ours.name, Q(t.tensor_type).name)
            continue
        # the same quantizer on the same floats and importance: llama.cpp's bytes exactly
        importance = (imatrix or {}).get(t.name)
        assert np.array_equal(quantize_rows(tensors[t.name], ours, importance=importance),
                              np.asarray(t.data).view(np.uint8).reshape(-1)), t.name
    assert not wrong, f"tensor_type (ours, llama.cpp) differs for {wrong}"


# ---------------------------------------------------------------------------------------------
# the strong check
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_same_types_and_bytes_as_llama_quantize(f32_models, tmp_path, model, preset):
    src, tensors = f32_models[model]
    m, p = MODELS[model], PRESETS[preset]
    out = tmp_path / f"{model}-{preset}.gguf"
    needing = [n for n, a in tensors.items()
               if requires_imatrix(p, n, tensor_type(p, n, a.shape, n_layers=m.n_layers, n_head=m.n_head,
                                                     n_head_kv=m.n_head_kv))]
    if needing:
        # llama.cpp refuses, before writing anything; so must we (tested in test_imatrix_convert)
        with pytest.raises(LlamalocalError, match="llama_model_quantize failed"):
            _llama_quantize(src, out, p)
        assert not out.exists()
        return
    _llama_quantize(src, out, p)
    _check_against_llama_cpp(out, m, p, tensors, None)


# Presets whose choices depend on the imatrix, or that cannot be made without one: on every model.
# The others choose as without one and only their bytes change: on two models (one with fallbacks).
_IMATRIX_CHOICES = {"iq3_xxs", "iq4_nl", "iq4_xs", "q4_0", "q5_0"} | {p.name for p in PRESETS.values() if p.needs_imatrix}
_WITH_IMATRIX = [(model, preset) for preset, p in PRESETS.items() if p.quantized
                 for model in (MODELS if preset in _IMATRIX_CHOICES else ("mha-8", "odd-rows"))]


@pytest.mark.slow
@pytest.mark.parametrize("model,preset", _WITH_IMATRIX)
def test_same_types_and_bytes_as_llama_quantize_with_an_imatrix(f32_models, tmp_path, model, preset):
    src, tensors = f32_models[model]
    m, p = MODELS[model], PRESETS[preset]
    imatrix = _importance(tensors, seed=len(preset))
    out = tmp_path / f"{model}-{preset}-imatrix.gguf"
    _llama_quantize(src, out, p, imatrix)
    _check_against_llama_cpp(out, m, p, tensors, imatrix)


def test_needs_imatrix_is_what_requires_imatrix_says():
    """A preset is refused without an imatrix iff one of a LLaMA-7B's tensors needs one."""
    for p in PRESETS.values():
        needing = [n for n, shape in shapes_of(Model(n_layers=32, dim=4096, ffn=11008, n_head=32, n_head_kv=32,
                                                    vocab=32000)).items()
                   if requires_imatrix(p, n, tensor_type(p, n, shape, n_layers=32, n_head=32, n_head_kv=32))]
        assert bool(needing) == p.needs_imatrix, p.name


# ---------------------------------------------------------------------------------------------
# the table itself (each rule, in words; llama.cpp above is the authority)
# ---------------------------------------------------------------------------------------------


def _tt(preset: str, name: str, shape: tuple[int, ...], n_layers: int = 32, n_head: int = 32,
        n_head_kv: int = 32) -> Q:
    return tensor_type(preset, name, shape, n_layers=n_layers, n_head=n_head, n_head_kv=n_head_kv)


def test_norms_and_1d_stay_f32():
    for preset in PRESETS:
        assert _tt(preset, "blk.3.attn_norm.weight", (4096,)) == Q.F32
        assert _tt(preset, "output_norm.weight", (4096,)) == Q.F32


def test_llama_7b_q4_k_m_choices():
    assert _tt("q4_k_m", "token_embd.weight", (32000, 4096)) == Q.Q4_K
    assert _tt("q4_k_m", "output.weight", (32000, 4096)) == Q.Q6_K
    assert _tt("q4_k_m", "blk.0.attn_q.weight", (4096, 4096)) == Q.Q4_K
    assert _tt("q4_k_m", "blk.0.attn_v.weight", (4096, 4096)) == Q.Q6_K   # first eighth
    assert _tt("q4_k_m", "blk.5.attn_v.weight", (4096, 4096)) == Q.Q4_K
    assert _tt("q4_k_m", "blk.5.ffn_down.weight", (4096, 11008)) == Q.Q4_K
    assert _tt("q4_k_m", "blk.6.ffn_down.weight", (4096, 11008)) == Q.Q6_K  # every third
    # OpenLLaMA-3B's ffn of 8640 is not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0
    assert _tt("q4_k_m", "blk.4.ffn_down.weight", (3200, 8640), n_layers=26) == Q.Q5_0
    assert _tt("q4_k_m", "blk.0.ffn_down.weight", (3200, 8640), n_layers=26) == Q.Q8_0


def test_f16_and_q8_0():
    assert _tt("f16", "token_embd.weight", (32000, 4096)) == Q.F16
    assert _tt("f16", "output.weight", (32000, 4096)) == Q.F16
    assert _tt("f32", "output.weight", (32000, 4096)) == Q.F32
    assert _tt("q8_0", "output.weight", (32000, 4096)) == Q.Q8_0
    assert _tt("q4_0", "output.weight", (32000, 4096)) == Q.Q6_K
    assert _tt("q4_0", "output.weight", (32000, 4100)) == Q.F16    # 4100 % 32 != 0


def test_70b_rule_needs_80_layers_and_gqa():
    v = "blk.40.attn_v.weight"
    assert _tt("q4_k_m", v, (1024, 8192), n_layers=80, n_head=64, n_head_kv=8) == Q.Q5_K
    assert _tt("q4_k_m", v, (8192, 8192), n_layers=80, n_head=64, n_head_kv=64) == Q.Q4_K
    assert _tt("q2_k", v, (1024, 8192), n_layers=80, n_head=64, n_head_kv=8) == Q.Q5_K
    assert _tt("q4_0", v, (1024, 8192), n_layers=80, n_head=64, n_head_kv=8) == Q.Q4_0


def test_use_more_bits_pattern():
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_layer_out_of_range():
    with pytest.raises(ValueError, match="layer"):
        _tt("q4_k_m", "blk.32.attn_v.weight", (4096, 4096), n_layers=32)


@pytest.mark.parametrize("text,name", [
    ("q4_0", "q4_0"), ("Q4_0", "q4_0"), ("q4_K_M", "q4_k_m"), ("--q8_0", "q8_0"), ("q4-k-m", "q4_k_m"),
    ("4_0", "q4_0"), ("q4_k", "q4_k_m"), ("F16", "f16"), ("fp32", "f32"), ("IQ2_XS", "iq2_xs"),
    ("q6_K", "q6_k"), ("Q2_K_S", "q2_k_s"), ("q5_k", "q5_k_m"),
])
def test_parse_preset(text, name):
    assert parse_preset(text).name == name


@pytest.mark.parametrize("text", ["q4", "q6", "iq2", "", "q4_k_x", "tq1_0"])
def test_parse_preset_refuses_with_the_valid_names(text):
    with pytest.raises(BadInputError, match="q4_k_m") as e:
        parse_preset(text)
    assert e.value.exit_code == 2


def test_preset_table():
    assert list(PRESETS) == ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                             "q4_1", "iq4_nl", "q4_0", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "iq3_m", "iq3_s",
                             "iq3_xs", "iq3_xxs", "q2_k", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs",
                             "iq1_m", "iq1_s"]
    assert [p.name for p in PRESETS.values() if p.needs_imatrix] == [
        "iq3_xs", "iq3_xxs", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"]
    assert PRESETS["q8_0"].bits_per_weight == 8.5
    assert PRESETS["q4_0"].bits_per_weight == 4.5
    assert PRESETS["q5_1"].bits_per_weight == 6.0
    for p in PRESETS.values():
        assert p.ftype == getattr(llama_cpp, f"LLAMA_FTYPE_{p.ftype.name}")
