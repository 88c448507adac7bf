"""Quantize float32 rows with ggml's own quantizers, the ones llama-quantize calls.

The quantizers live in llama-cpp-python's `libggml-base` shared library; this module binds the
handful of functions it needs with ctypes (llama-cpp-python's `_ggml` module only loads the
library, it binds none of these). With no importance matrix `ggml_quantize_chunk` is exactly what
`llama_model_quantize` runs per chunk of rows, so the bytes are llama.cpp's bytes. F16 and BF16 go
through the same call (ggml's own rounding), F32 is copied as is.

Every quantizer works row by row (a block never spans rows), so rows can be split across threads
in any way without changing a byte; ctypes releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from concurrent.futures import Executor
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llamalocal.errors import LlamalocalError

Q = GGMLQuantizationType

# llama.cpp hands each worker at least this many elements (src/llama-quant.cpp, min_chunk_size);
# we use larger chunks because every chunk also costs a Python-level task.
_MIN_CHUNK_ELEMENTS = 32 * 512
_TARGET_CHUNK_ELEMENTS = 1 << 20


# ---------------------------------------------------------------------------------------------
# the shared library
# ---------------------------------------------------------------------------------------------

def _library_names(stem: str = "ggml-base") -> list[str]:
    if sys.platform == "win32":
        return [f"{stem}.dll", f"lib{stem}.dll"]
    if sys.platform == "darwin":
        return [f"lib{stem}.dylib", f"lib{stem}.so"]
    return [f"lib{stem}.so"]


def _load(stem: str) -> ctypes.CDLL:
    """A ggml library shipped inside the installed llama_cpp package."""
    spec = importlib.util.find_spec("llama_cpp")  # find, don't import: importing loads libllama
    if spec is None or spec.origin is None:
        raise LlamalocalError("llama-cpp-python is not installed; pip install llama-cpp-python==0.3.36")
    lib_dir = Path(spec.origin).parent / "lib"
    path = next((lib_dir / n for n in _library_names(stem) if (lib_dir / n).exists()), None)
    if path is None:
        raise LlamalocalError(f"no {stem} library in {lib_dir}; reinstall llama-cpp-python==0.3.36")
    return ctypes.CDLL(str(path))


@cache
def _ggml() -> ctypes.CDLL:
    """libggml-base from the installed llama_cpp package, with argument types declared."""
    lib = _load("ggml-base")

    i64, size_t, ctype = ctypes.c_int64, ctypes.c_size_t, ctypes.c_int  # enum ggml_type is an int
    # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64 start, int64 nrows,
    #                            int64 n_per_row, const float * imatrix)
    lib.ggml_quantize_chunk.argtypes = [ctype, ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = size_t
    lib.ggml_quantize_init.argtypes = [ctype]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctype]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctype, ctypes.c_void_p, size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctype, i64]
    lib.ggml_row_size.restype = size_t
    lib.ggml_blck_size.argtypes = [ctype]
    lib.ggml_blck_size.restype = i64
    lib.ggml_type_size.argtypes = [ctype]
    lib.ggml_type_size.restype = size_t
    return lib


def ggml_block_size(qtype: Q) -> int:
    """Elements per block, as ggml itself reports it."""
    return int(_ggml().ggml_blck_size(int(qtype)))


def ggml_type_size(qtype: Q) -> int:
    """Bytes per block, as ggml itself reports it."""
    return int(_ggml().ggml_type_size(int(qtype)))


def ggml_row_size(qtype: Q, n_per_row: int) -> int:
    """Bytes of one quantized row, as ggml itself reports it."""
    return int(_ggml().ggml_row_size(int(qtype), n_per_row))


_initialized: set[Q] = set()


def _prepare(qtype: Q) -> None:
    """Check the type is usable without an imatrix and build its tables before threads use it."""
    if qtype in _initialized:
        return
    lib = _ggml()
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix, which llamalocal does not compute")
    lib.ggml_quantize_init(int(qtype))  # IQ tables; a no-op for the types the presets use
    _initialized.add(qtype)


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


@cache
def _ggml_cpu() -> ctypes.CDLL:
    """libggml-cpu: its fp16/bf16 -> fp32 row converters use the CPU's vector units."""
    lib = _load("ggml-cpu")
    lib.ggml_cpu_init()  # fills the fp16 lookup table the converters use for odd tails
    for fn in (lib.ggml_cpu_fp16_to_fp32, lib.ggml_cpu_bf16_to_fp32):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return lib


def to_f32(src: np.ndarray, out: np.ndarray, *, bf16: bool = False) -> None:
    """Widen contiguous fp16 / bf16 (as uint16) / fp32 / fp64 values into float32 `out` (same size)."""
    if src.size != out.size:
        raise ValueError(f"{src.size} values into a buffer of {out.size}")
    if bf16 or src.dtype == np.float16:
        fn = _ggml_cpu().ggml_cpu_bf16_to_fp32 if bf16 else _ggml_cpu().ggml_cpu_fp16_to_fp32
        fn(src.ctypes.data, out.ctypes.data, src.size)  # releases the GIL, unlike numpy's scalar cast
    else:
        np.copyto(out, src.reshape(out.shape), casting="same_kind")


def _all_finite(x: np.ndarray) -> bool:
    """No NaN or inf in x. A NaN or inf anywhere makes the (vectorised) sum non-finite; only a
    non-finite sum needs the exact check, which is several times slower."""
    return bool(np.isfinite(np.sum(x))) or bool(np.isfinite(x).all())


def _quantize_into(x: np.ndarray, qtype: Q, out: np.ndarray, r0: int, r1: int, validate: bool) -> None:
    """Quantize rows [r0, r1) of contiguous float32 `x` into their place in `out` (uint8)."""
    ncols = x.shape[1]
    row_size = out.nbytes // x.shape[0]
    src = x.ctypes.data + r0 * ncols * 4
    dst = out.ctypes.data + r0 * row_size
    lib = _ggml()
    # llama.cpp checks the source when it loads it (check_tensors) and the result after each
    # chunk; the quantizers themselves skip a NaN when picking a block's scale.
    if validate and not _all_finite(x[r0:r1]):
        raise ValueError(f"rows {r0}..{r1 - 1} hold NaN or infinite values")
    n = lib.ggml_quantize_chunk(int(qtype), src, dst, 0, r1 - r0, ncols, None)
    if n != (r1 - r0) * row_size:  # ggml asserts this itself; a mismatch means a wrong binding
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {(r1 - r0) * row_size}")
    if validate and not lib.ggml_validate_row_data(int(qtype), dst, n):
        raise ValueError(f"rows {r0}..{r1 - 1} overflow to infinity or NaN when stored as {qtype.name}")


def _output_buffer(x: np.ndarray, qtype: Q) -> np.ndarray:
    """The rows as contiguous float32 and an output buffer for them; checks before ggml can abort."""
    row_size = row_nbytes(x.shape[1], qtype)  # ggml would abort the process on a partial block
    if qtype != Q.F32:
        _prepare(qtype)
    return np.empty(x.shape[0] * row_size, dtype=np.uint8)


def quantize_rows(x: np.ndarray, qtype: Q, *, validate: bool = True) -> np.ndarray:
    """Store float32 rows as `qtype`, byte for byte as ggml (and so llama-quantize) does.

    Args:
        x: float32 (nrows, ncols) — or one row (ncols,) — with ncols a multiple of the block size.
        qtype: F32, F16, BF16 or a quantized type that needs no importance matrix.
        validate: refuse NaN / inf in the input and in the result (ggml_validate_row_data), as
            llama-quantize does.

    Returns:
        uint8 array of nrows * row_nbytes(ncols, qtype) bytes. For F32 this may share memory with x.

    Raises:
        ValueError: ncols not a whole number of blocks, a type that needs an imatrix, or data
            that is NaN/infinite in the stored type.
    """
    x = _as_rows(x)
    if qtype == Q.F32:
        if validate and not _all_finite(x):
            raise ValueError("rows hold NaN or infinite values")
        return x.reshape(-1).view(np.uint8)
    out = _output_buffer(x, qtype)
    if x.shape[0]:
        _quantize_into(x, qtype, out, 0, x.shape[0], validate)
    return out


def _chunks(nrows: int, ncols: int, n_tasks: int) -> list[tuple[int, int]]:
    """Row ranges of at least _MIN_CHUNK_ELEMENTS, at most about _TARGET_CHUNK_ELEMENTS, and at
    least `n_tasks` of them when the tensor is big enough to give every worker some."""
    per_row = max(ncols, 1)
    lo = -(-_MIN_CHUNK_ELEMENTS // per_row)
    hi = max(lo, _TARGET_CHUNK_ELEMENTS // per_row)
    rows = max(lo, min(hi, -(-nrows // max(n_tasks, 1))))
    return [(r, min(r + rows, nrows)) for r in range(0, nrows, rows)]


def quantize_rows_parallel(
    x: np.ndarray, qtype: Q, pool: Executor | None, *, n_tasks: int = 16, validate: bool = True,
) -> np.ndarray:
    """`quantize_rows` with the rows split across `pool`'s threads; the bytes are identical.

    Args:
        x, qtype, validate: as for `quantize_rows`.
        pool: a ThreadPoolExecutor (ctypes releases the GIL); None quantizes on this thread.
        n_tasks: split into at least this many chunks when the tensor is large enough
            (a few per worker evens out the load).
    """
    x = _as_rows(x)
    if qtype == Q.F32 or pool is None:
        return quantize_rows(x, qtype, validate=validate)
    out = _output_buffer(x, qtype)
    futures = [pool.submit(_quantize_into, x, qtype, out, r0, r1, validate)
               for r0, r1 in _chunks(x.shape[0], x.shape[1], n_tasks)]
    for f in futures:
        f.result()  # re-raises a worker's error
    return out
