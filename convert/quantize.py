"""Quantize float32 rows with ggml's own quantizers, the ones llama-quantize calls.

The quantizers live in llama-cpp-python's `libggml-base` shared library, reached through
`llamalocal.convert.native` (llama-cpp-python binds none of them). `ggml_quantize_chunk` is exactly
what `llama_model_quantize` runs per chunk of rows, with the tensor's importance (one float per
column: the mean squared activation from an imatrix, see convert.imatrix_file) or without, so the
bytes are llama.cpp's bytes. F16 and BF16 go through the same call (ggml's own rounding), F32 is
copied as is.

Every quantizer works row by row (a block never spans rows), so rows can be split into chunks and
across threads in any way without changing a byte; ctypes releases the GIL during the call.
"""

from __future__ import annotations

import threading

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llamalocal.convert import native

Q = GGMLQuantizationType

# quantize_block widens this many values at a time: 1 MiB of float32 stays in a core's L2 cache
# while ggml quantizes it, so the float32 copy of a tensor never travels through main memory
CACHE_CHUNK_ELEMENTS = 1 << 18


def ggml_block_size(qtype: Q) -> int:
    """Elements per block, as ggml itself reports it."""
    return native.block_size(int(qtype))


def ggml_type_size(qtype: Q) -> int:
    """Bytes per block, as ggml itself reports it."""
    return native.type_size(int(qtype))


def ggml_row_size(qtype: Q, n_per_row: int) -> int:
    """Bytes of one quantized row, as ggml itself reports it."""
    return native.row_size(int(qtype), n_per_row)


_initialized: set[Q] = set()


def _prepare(qtype: Q, has_importance: bool) -> None:
    """Check the type can be made with what is given and build its tables before threads use it."""
    if not has_importance and native.quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} cannot be made without an importance matrix; "
                         "compute one with `llamalocal imatrix`")
    if qtype in _initialized:
        return
    native.quantize_init(int(qtype))  # the IQ types' grids; a no-op for the others
    _initialized.add(qtype)


def _importance_ptr(importance: np.ndarray | None, ncols: int) -> int | None:
    if importance is None:
        return None
    if importance.dtype != np.float32 or importance.shape != (ncols,) or not importance.flags.c_contiguous:
        raise ValueError(f"importance must be {ncols} contiguous float32 values (one per column), "
                         f"got {importance.dtype} {importance.shape}")
    return importance.ctypes.data


# ---------------------------------------------------------------------------------------------
# sizes (gguf-py's table; the tests check it against ggml's own answers)
# ---------------------------------------------------------------------------------------------

def block_size(qtype: Q) -> int:
    """Elements per quantization block: 1 for F32/F16/BF16, 32 for Q4_0..Q8_0, 256 for k-quants."""
    return GGML_QUANT_SIZES[qtype][0]


def row_nbytes(ncols: int, qtype: Q) -> int:
    """Bytes of one row of `ncols` values stored as `qtype`. Raises ValueError if not whole blocks."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if ncols % block != 0:
        raise ValueError(f"a row of {ncols} values is not a whole number of {qtype.name} blocks of {block}")
    return ncols // block * nbytes


def quantized_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    """Bytes of a tensor of numpy `shape` (last axis = row) stored as `qtype`."""
    nrows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return nrows * row_nbytes(shape[-1], qtype)


# ---------------------------------------------------------------------------------------------
# quantizing
# ---------------------------------------------------------------------------------------------

def _as_rows(x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"expected (nrows, ncols) rows, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def to_f32(src: np.ndarray, out: np.ndarray, *, bf16: bool = False) -> None:
    """Widen contiguous fp16 / bf16 (as uint16) / fp32 / fp64 values into float32 `out` (same size)."""
    if src.size != out.size:
        raise ValueError(f"{src.size} values into a buffer of {out.size}")
    if bf16 or src.dtype == np.float16:
        native.widen_f16(src.ctypes.data, out.ctypes.data, src.size, bf16=bf16)  # releases the GIL
    else:
        np.copyto(out, src.reshape(out.shape), casting="same_kind")


F16_MAX = 65504.0  # below this in magnitude, no value or block scale stored as fp16 becomes infinite


def _extremes(x: np.ndarray) -> tuple[float, float]:
    """min and max of x: NaN if x holds one (numpy's max and min propagate it), +-inf if it holds
    one. Two vectorised reductions, cheaper than materialising np.isfinite(x)."""
    return (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)


_scratch = threading.local()  # per-thread work areas for quantize_block, reused


def _scratch_of(kind: str, dtype: type, n: int) -> np.ndarray:
    buf = getattr(_scratch, kind, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype=dtype)
        setattr(_scratch, kind, buf)
    return buf[:n]


def _scratch_f32(n: int) -> np.ndarray:
    return _scratch_of("f32", np.float32, n)


def _finite_f16(values: np.ndarray) -> bool:
    """Whether contiguous fp16 values hold no NaN and no infinity (both have every exponent bit
    set), checked on the stored 2-byte values: half the memory traffic of looking at their float32
    widening, and every finite fp16 value is below F16_MAX in magnitude."""
    bits = values.reshape(-1).view(np.uint16)
    magnitude = np.bitwise_and(bits, 0x7FFF, out=_scratch_of("u16", np.uint16, bits.size))
    return bool(magnitude.size == 0 or int(magnitude.max()) < 0x7C00)


def quantize_block(parts: list[tuple[np.ndarray, bool]], qtype: Q, out: np.ndarray, *,
                   first_row: int = 0, validate: bool = True, importance: np.ndarray | None = None) -> np.ndarray:
    """Widen stored rows to float32 and store them as `qtype`, a cache-sized chunk at a time.

    The bytes are `quantize_rows`' bytes (ggml works row by row); the difference is memory
    traffic: only the stored values come in and the quantized ones go out, the float32 rows live
    in a per-thread scratch area small enough to stay in cache.

    Args:
        parts: the block's columns as (values, is_bf16) pairs, each values array (nrows, cols_i)
            C-contiguous fp16 / fp32 / fp64 / bf16-as-uint16; several parts are glued side by side
            (a row-parallel tensor's shards), one part is the usual case.
        qtype: the output type (F32, F16, BF16 or a quantized type).
        out: uint8 buffer of at least nrows * row_nbytes(total cols, qtype) bytes.
        first_row: where the block starts in its tensor, for error messages.
        validate: refuse NaN / inf in the values and in the result (ggml_validate_row_data), as
            llama-quantize does (it checks sources on load and results after each chunk).
        importance: float32 (total cols,): how much each column matters (an imatrix entry, as
            llama-quantize hands it to ggml), or None.

    Returns:
        The filled front of `out`.

    Raises:
        ValueError: NaN / inf in the values or in the result, a row that is not whole blocks, or
            a type that cannot be made without importance when none is given.
    """
    nrows = parts[0][0].shape[0]
    widths = [p.shape[1] for p, _ in parts]
    ncols = sum(widths)
    row_size = row_nbytes(ncols, qtype)
    if out.size < nrows * row_size:
        raise ValueError(f"output buffer of {out.size} bytes for {nrows} rows of {row_size}")
    imatrix = _importance_ptr(importance, ncols)
    if qtype != Q.F32:
        _prepare(qtype, imatrix is not None)
    all_f16 = all(p.dtype == np.float16 and not bf16 for p, bf16 in parts)
    step = max(1, CACHE_CHUNK_ELEMENTS // ncols)
    work = _scratch_f32(step * ncols * (2 if len(parts) > 1 else 1))
    for r0 in range(0, nrows, step):
        r1 = min(nrows, r0 + step)
        k = r1 - r0
        dst = out[r0 * row_size:r1 * row_size]
        x = (dst.view(np.float32) if qtype == Q.F32 else work[:k * ncols]).reshape(k, ncols)
        if len(parts) == 1:
            to_f32(parts[0][0][r0:r1], x, bf16=parts[0][1])
        else:
            c = 0
            for (p, bf16), width in zip(parts, widths, strict=True):
                piece = work[step * ncols:step * ncols + k * width].reshape(k, width)
                to_f32(p[r0:r1], piece, bf16=bf16)
                x[:, c:c + width] = piece
                c += width
        rows = f"rows {first_row + r0}..{first_row + r1 - 1}"
        lo, hi = 0.0, 0.0  # an fp16 source stays below F16_MAX: ggml has nothing to overflow
        if validate and not all_f16:
            lo, hi = _extremes(x)
        if validate and not (all(_finite_f16(p[r0:r1]) for p, _ in parts) if all_f16
                             else np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{rows} hold NaN or infinite values")
        if qtype == Q.F32:
            continue
        n = native.quantize_chunk(int(qtype), x.ctypes.data, dst.ctypes.data, k, ncols, imatrix)
        if n != k * row_size:
            raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {k * row_size}")
        # ggml prints what it finds on stderr: only values this large can overflow, and then the
        # one line the CLI prints says it instead
        if validate and not native.validate_row_data(int(qtype), dst.ctypes.data, n, quiet=max(-lo, hi) > F16_MAX):
            raise ValueError(f"{rows} overflow to infinity or NaN when stored as {qtype.name}")
    return out[:nrows * row_size]


def quantize_rows(x: np.ndarray, qtype: Q, *, validate: bool = True,
                  importance: np.ndarray | None = None) -> np.ndarray:
    """Store float32 rows as `qtype`, byte for byte as ggml (and so llama-quantize) does.

    Args:
        x: float32 (nrows, ncols) — or one row (ncols,) — with ncols a multiple of the block size.
        qtype: F32, F16, BF16 or a quantized type (one that needs an importance matrix only
            with `importance`).
        validate: refuse NaN / inf in the input and in the result (ggml_validate_row_data), as
            llama-quantize does.
        importance: float32 (ncols,) per-column importance, as in `quantize_block`.

    Returns:
        uint8 array of nrows * row_nbytes(ncols, qtype) bytes.

    Raises:
        ValueError: ncols not a whole number of blocks, a type that needs an imatrix, or data
            that is NaN/infinite in the stored type.
    """
    x = _as_rows(x)
    out = np.empty(x.shape[0] * row_nbytes(x.shape[1], qtype), dtype=np.uint8)
    return (quantize_block([(x, False)], qtype, out, validate=validate, importance=importance)
            if x.shape[0] else out)
