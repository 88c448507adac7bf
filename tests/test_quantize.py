"""convert.quantize: ggml's quantizers through ctypes, checked against independent routes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (which ships ggml's quantizers) is not installed")

from gguf import GGML_QUANT_SIZES, quants  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from llamalocal.convert import quantize as qz  # noqa: E402

# Every type the presets can produce (defaults, bumps and fallbacks).
PRESET_TYPES = [Q.F16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# gguf-py implements these quantizers in numpy, following ggml's reference code.
NUMPY_REFERENCE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1]

# Upper bound on RMS(dequantized - x) / RMS(x) for Gaussian rows. Measured with ggml 0.3.36 on
# this data: F16 2.1e-4, BF16 1.7e-3, Q8_0 .0054, Q6_K .018, Q5_1 .038, Q5_K .036, Q5_0 .043,
# Q4_K .071, Q4_1 .078, Q4_0 .086, Q3_K .15, Q2_K .30; bounds leave ~25% headroom.
MAX_REL_RMS = {
    Q.F16: 3e-4, Q.BF16: 2.2e-3, Q.Q8_0: 0.007, Q.Q6_K: 0.023, Q.Q5_1: 0.048, Q.Q5_K: 0.046,
    Q.Q5_0: 0.054, Q.Q4_K: 0.09, Q.Q4_1: 0.098, Q.Q4_0: 0.108, Q.Q3_K: 0.19, Q.Q2_K: 0.37,
}


def _rows(nrows: int, ncols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((nrows, ncols)).astype(np.float32)


@pytest.mark.parametrize("qtype", PRESET_TYPES + [Q.F32, Q.BF16], ids=lambda t: t.name)
def test_sizes_agree_with_ggml(qtype):
    # gguf-py's table (used for size estimates and by the writer) against ggml's own answers
    assert qz.block_size(qtype) == qz.ggml_block_size(qtype)
    assert GGML_QUANT_SIZES[qtype][1] == qz.ggml_type_size(qtype)
    assert qz.row_nbytes(4096, qtype) == qz.ggml_row_size(qtype, 4096)
    assert qz.quantized_nbytes((11, 4096), qtype) == 11 * qz.ggml_row_size(qtype, 4096)


def test_quantized_nbytes_known_values():
    assert qz.quantized_nbytes((4096, 4096), Q.Q4_0) == 4096 * 4096 // 32 * 18
    assert qz.quantized_nbytes((32000, 4096), Q.Q6_K) == 32000 * 4096 // 256 * 210
    assert qz.quantized_nbytes((4096,), Q.F32) == 4096 * 4
    with pytest.raises(ValueError, match="whole number"):
        qz.quantized_nbytes((10, 288), Q.Q4_K)


@pytest.mark.parametrize("qtype", NUMPY_REFERENCE, ids=lambda t: t.name)
def test_bytes_equal_gguf_py_numpy_quantizer(qtype):
    x = _rows(37, 512, seed=1) * 0.05
    ours = qz.quantize_rows(x, qtype)
    ref = quants.quantize(x, qtype)
    assert np.array_equal(ours, np.ascontiguousarray(ref).view(np.uint8).reshape(-1))


def test_f16_matches_numpy_on_awkward_values():
    # subnormals, values that overflow to inf, ties in rounding: ggml == numpy's astype(float16)
    bits = np.random.default_rng(2).integers(0, 2**32, size=1 << 16, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    x = np.concatenate([x, np.float32([65504, 65519.99, 65520, 2.9802322e-8, 5.9604645e-8, 6.1035156e-5])])
    x = x[: len(x) // 256 * 256].reshape(-1, 256)
    ours = qz.quantize_rows(x, Q.F16, validate=False).view(np.uint16)
    with np.errstate(over="ignore"):
        assert np.array_equal(ours, x.astype(np.float16).view(np.uint16).reshape(-1))


@pytest.mark.parametrize("qtype", PRESET_TYPES + [Q.BF16], ids=lambda t: t.name)
def test_dequantized_error_in_expected_range(qtype):
    x = _rows(64, 1024, seed=3)
    raw = qz.quantize_rows(x, qtype)
    assert raw.dtype == np.uint8 and raw.nbytes == qz.quantized_nbytes(x.shape, qtype)
    back = quants.dequantize(raw.reshape(x.shape[0], -1), qtype)  # gguf-py's numpy dequantizer
    assert back.shape == x.shape
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
    assert rel < MAX_REL_RMS[qtype]


def test_error_falls_with_bits():
    x = _rows(32, 1024, seed=4)

    def rel(t):
        back = quants.dequantize(qz.quantize_rows(x, t).reshape(32, -1), t)
        return float(np.sqrt(np.mean((back - x) ** 2)))

    order = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F16]
    errors = [rel(t) for t in order]
    assert errors == sorted(errors, reverse=True), dict(zip([t.name for t in order], errors, strict=True))


def test_f32_is_the_float_bytes():
    x = _rows(3, 64)
    assert qz.quantize_rows(x, Q.F32).tobytes() == x.tobytes()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K, Q.Q6_K, Q.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("nrows", [1, 3, 7, 129])
def test_rows_are_independent_for_odd_row_counts(qtype, nrows):
    x = _rows(nrows, 512, seed=nrows)
    whole = qz.quantize_rows(x, qtype)
    row = qz.row_nbytes(512, qtype)
    assert whole.nbytes == nrows * row
    for i in {0, nrows // 2, nrows - 1}:
        assert np.array_equal(whole[i * row:(i + 1) * row], qz.quantize_rows(x[i], qtype))


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as a checkpoint stores it: fp16, fp32, or bf16 bits as uint16 (round to nearest even)."""
    if dtype == "bf16":
        bits = x.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return x.astype(np.float16 if dtype == "f16" else np.float32)


def _widened(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


@pytest.mark.parametrize("qtype", PRESET_TYPES + [Q.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_block_equals_rows(qtype, dtype, monkeypatch):
    """quantize_block (widening fused with quantizing, chunk by chunk) gives quantize_rows' bytes,
    whatever the chunk size: 1001 rows in chunks of 3 rows, the last one short."""
    stored = _stored(_rows(1001, 256, seed=5), dtype)
    want = qz.quantize_rows(_widened(stored), qtype)  # one chunk: 1001 x 256 < CACHE_CHUNK_ELEMENTS
    assert stored.size <= qz.CACHE_CHUNK_ELEMENTS
    monkeypatch.setattr(qz, "CACHE_CHUNK_ELEMENTS", 3 * 256)
    out = np.full(want.nbytes + 100, 0xAB, dtype=np.uint8)
    got = qz.quantize_block([(stored, dtype == "bf16")], qtype, out)
    assert np.array_equal(got, want)
    assert (out[want.nbytes:] == 0xAB).all()  # nothing written past the block


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K, Q.F16, Q.F32], ids=lambda t: t.name)
def test_block_glues_parts_side_by_side(qtype, monkeypatch):
    """A row-parallel tensor's shards (parts of different widths and dtypes) are glued column-wise."""
    x = _rows(37, 768, seed=9)
    parts = [_stored(x[:, :256], "f16"), _stored(x[:, 256:512], "bf16"), _stored(x[:, 512:], "f32")]
    want = qz.quantize_rows(np.concatenate([_widened(p) for p in parts], axis=1), qtype)
    monkeypatch.setattr(qz, "CACHE_CHUNK_ELEMENTS", 5 * 768)
    got = qz.quantize_block([(p, p.dtype == np.uint16) for p in parts], qtype,
                            np.empty(want.nbytes, np.uint8))
    assert np.array_equal(got, want)


def test_block_names_the_rows_with_nan(monkeypatch):
    monkeypatch.setattr(qz, "CACHE_CHUNK_ELEMENTS", 4 * 64)
    x = _rows(20, 64, seed=2)
    x[13, 5] = np.nan
    with pytest.raises(ValueError, match="rows 112..115 hold NaN"):  # chunk 12..15, block starts at 100
        qz.quantize_block([(x, False)], Q.Q8_0, np.empty(20 * 68, np.uint8), first_row=100)
    with pytest.raises(ValueError, match="output buffer"):
        qz.quantize_block([(x, False)], Q.Q8_0, np.empty(10, np.uint8))


@pytest.mark.parametrize("qtype,ncols", [(Q.Q4_K, 288), (Q.Q6_K, 4000), (Q.Q4_0, 40), (Q.Q8_0, 100)])
def test_partial_block_raises_value_error(qtype, ncols):
    with pytest.raises(ValueError, match="whole number"):
        qz.quantize_rows(np.zeros((2, ncols), np.float32), qtype)
    with pytest.raises(ValueError, match="whole number"):
        qz.quantize_block([(np.zeros((2, ncols), np.float16), False)], qtype, np.empty(1 << 16, np.uint8))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q4_0, Q.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_is_refused(qtype, bad):
    x = _rows(4, 256)
    x[2, 17] = bad
    with pytest.raises(ValueError, match="NaN"):
        qz.quantize_rows(x, qtype)
    with pytest.raises(ValueError, match="NaN"):
        qz.quantize_block([(x.astype(np.float16), False)], qtype, np.empty(x.size * 4, np.uint8))


@pytest.mark.parametrize("bits,bad", [(0x7C00, True), (0xFC00, True), (0x7C01, True), (0xFE00, True), (0x7FFF, True),
                                      (0x7BFF, False), (0xFBFF, False), (0x0001, False), (0x8000, False)])
def test_fp16_values_are_checked_as_stored(bits, bad):
    """Every fp16 bit pattern with all exponent bits set (infinities, quiet and signalling NaNs of
    either sign) is refused, in any part of a glued block; the largest finite values pass."""
    parts = [_rows(3, 64, seed=4).astype(np.float16), _rows(3, 32, seed=5).astype(np.float16)]
    parts[1].view(np.uint16)[1, 7] = bits
    out = np.empty(3 * 96 * 2, np.uint8)
    if bad:
        with pytest.raises(ValueError, match="rows 1..3 hold NaN"):
            qz.quantize_block([(p, False) for p in parts], Q.F16, out, first_row=1)
    else:
        got = qz.quantize_block([(p, False) for p in parts], Q.F16, out)
        assert got.view(np.uint16)[1 * 96 + 64 + 7] == bits  # stored as it was


def test_type_needing_an_imatrix_is_refused():
    with pytest.raises(ValueError, match="importance matrix"):
        qz.quantize_rows(_rows(2, 256), Q.IQ2_XXS)


def test_rejects_3d_input():
    with pytest.raises(ValueError, match="nrows, ncols"):
        qz.quantize_rows(np.zeros((2, 2, 32), np.float32), Q.Q8_0)


def test_overflow_to_f16_infinity_is_refused():
    x = _rows(2, 256)
    x[1, 3] = 1e6  # finite in f32, inf in f16: llama-quantize refuses the row too
    with pytest.raises(ValueError, match="F16"):
        qz.quantize_rows(x, Q.F16)
    assert qz.quantize_rows(x, Q.F16, validate=False).view(np.float16)[256 + 3] == np.inf


@pytest.mark.parametrize("n", [1, 7, 8, 33, 4099])
def test_to_f32_widens_exactly_like_numpy(n):
    """ggml's vectorised fp16/bf16 -> fp32 (and its scalar tail) agrees with numpy bit for bit."""
    rng = np.random.default_rng(n)
    bits = rng.integers(0, 2**16, n, dtype=np.uint16)
    h = bits.view(np.float16)
    out = np.empty(n, np.float32)
    qz.to_f32(h, out)
    want = h.astype(np.float32)
    assert np.array_equal(out.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(out[np.isnan(want)]).all()
    qz.to_f32(bits, out, bf16=True)
    assert np.array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)
