"""The one native boundary: every ctypes call into the libraries llama-cpp-python ships.

llama-cpp-python binds libllama's public API (`llama_cpp.llama_*`) but not ggml's quantizers,
its fp16/bf16 widening, its backend registry, its CPU threadpool or its RPC backend. Everything
llamalocal calls across the C boundary — bound here or already bound by llama-cpp-python — goes
through this module: one loader (`library`), one table of signatures per library (`_SIGNATURES`),
and a version check against the pinned llama-cpp-python (`check_version`), so a version bump is a
one-module job. It lives in the converter package, the lowest layer, because the converter needs
the quantizers and every other part of llamalocal may depend on the converter, never the reverse.

Nothing here imports `llama_cpp` at module import time: loading libllama costs ~0.2 s and the
converter does not need it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from llamalocal.convert.errors import LlamalocalError

# The llama-cpp-python release the struct layouts and signatures below are written against.
PINNED_LLAMA_CPP_PYTHON = "0.3.36"
_ALLOW_OTHER_VERSION = "LLAMALOCAL_ALLOW_LLAMA_CPP_VERSION"  # set to 1 to run against another release anyway

vp, sz, i64, c_int, c_bool, cs = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_bool, ctypes.c_char_p)

# library stem -> {function: (argtypes, restype)}. enum ggml_type is an int.
_SIGNATURES: dict[str, dict[str, tuple[list[Any], Any]]] = {
    "ggml-base": {
        # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64 start, int64 nrows,
        #                            int64 n_per_row, const float * imatrix)
        "ggml_quantize_chunk": ([c_int, vp, vp, i64, i64, i64, vp], sz),
        "ggml_quantize_init": ([c_int], None),
        "ggml_quantize_requires_imatrix": ([c_int], c_bool),
        "ggml_validate_row_data": ([c_int, vp, sz], c_bool),
        "ggml_row_size": ([c_int, i64], sz),
        "ggml_blck_size": ([c_int], i64),
        "ggml_type_size": ([c_int], sz),
        "ggml_threadpool_params_init": ([vp, c_int], None),
    },
    "ggml-cpu": {
        "ggml_cpu_init": ([], None),
        "ggml_cpu_fp16_to_fp32": ([vp, vp, i64], None),
        "ggml_cpu_bf16_to_fp32": ([vp, vp, i64], None),
        "ggml_threadpool_new": ([vp], vp),
        "ggml_threadpool_free": ([vp], None),
    },
    "ggml": {
        "ggml_backend_reg_count": ([], sz),
        "ggml_backend_reg_get": ([sz], vp),
        "ggml_backend_reg_name": ([vp], cs),
        "ggml_backend_reg_by_name": ([cs], vp),
        "ggml_backend_reg_get_proc_address": ([vp, cs], vp),
        "ggml_backend_dev_count": ([], sz),
        "ggml_backend_dev_get": ([sz], vp),
        "ggml_backend_dev_name": ([vp], cs),
        "ggml_backend_dev_description": ([vp], cs),
        "ggml_backend_dev_type": ([vp], c_int),
        "ggml_backend_dev_backend_reg": ([vp], vp),
        "ggml_backend_dev_memory": ([vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
        "ggml_backend_load_all": ([], None),
    },
}


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def lib_dir() -> Path:
    """llama-cpp-python's folder of shared libraries, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")  # find, don't import: importing loads libllama
    if spec is None or spec.origin is None:
        raise LlamalocalError(f"llama-cpp-python is not installed; pip install llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}")
    return Path(spec.origin).resolve().parent / "lib"


def library_file(stem: str) -> Path | None:
    """The shared library `stem` ("ggml-base", "ggml-rpc", ...) in llama-cpp-python's lib folder."""
    if sys.platform == "win32":
        names = [f"{stem}.dll", f"lib{stem}.dll"]
    elif sys.platform == "darwin":
        names = [f"lib{stem}.dylib", f"lib{stem}.so"]
    else:
        names = [f"lib{stem}.so"]
    d = lib_dir()
    return next((d / n for n in names if (d / n).exists()), None)


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def check_version() -> None:
    """Refuse a llama-cpp-python other than the pinned one: the struct layouts here would not match
    and a mismatch is a crash, not an error. $LLAMALOCAL_ALLOW_LLAMA_CPP_VERSION=1 overrides."""
    have = installed_version()
    if have is None:
        raise LlamalocalError(f"llama-cpp-python is not installed; pip install llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}")
    if have != PINNED_LLAMA_CPP_PYTHON and os.environ.get(_ALLOW_OTHER_VERSION) != "1":
        raise LlamalocalError(
            f"llama-cpp-python {have} is installed but llamalocal is built against {PINNED_LLAMA_CPP_PYTHON}; "
            f"pip install llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON} (or set {_ALLOW_OTHER_VERSION}=1 to try anyway)")


@cache
def library(stem: str) -> ctypes.CDLL:
    """A ggml library of llama-cpp-python's, loaded once, with its signatures declared."""
    check_version()
    path = library_file(stem)
    if path is None:
        raise LlamalocalError(f"no {stem} library in {lib_dir()}; reinstall "
                              f"llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}")
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.get(stem, {}).items():
        fn = getattr(lib, name, None)
        if fn is not None:  # optional symbols (ggml_backend_load_all) may be absent
            fn.argtypes, fn.restype = args, res
    return lib


def llama() -> Any:
    """llama-cpp-python's own binding module (`llama_cpp`), imported on first use."""
    check_version()
    import llama_cpp

    return llama_cpp


# ---------------------------------------------------------------------------------------------
# ggml: quantizers and widening
# ---------------------------------------------------------------------------------------------

def quantize_chunk(qtype: int, src: int, dst: int, nrows: int, n_per_row: int, imatrix: int | None = None) -> int:
    """ggml_quantize_chunk over `nrows` rows at address `src` into `dst`; bytes written."""
    return int(library("ggml-base").ggml_quantize_chunk(qtype, src, dst, 0, nrows, n_per_row, imatrix))


def quantize_init(qtype: int) -> None:
    library("ggml-base").ggml_quantize_init(qtype)


def quantize_requires_imatrix(qtype: int) -> bool:
    return bool(library("ggml-base").ggml_quantize_requires_imatrix(qtype))


_STDERR_LOCK = threading.Lock()


def validate_row_data(qtype: int, data: int, nbytes: int, *, quiet: bool = False) -> bool:
    """ggml_validate_row_data; `quiet`: with file descriptor 2 pointed at /dev/null meanwhile, as
    ggml fprintf()s each bad block it finds (the caller reports the failure itself)."""
    fn = library("ggml-base").ggml_validate_row_data
    if not quiet:
        return bool(fn(qtype, data, nbytes))
    with _STDERR_LOCK:
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            return bool(fn(qtype, data, nbytes))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def block_size(qtype: int) -> int:
    """Elements per block, as ggml itself reports it."""
    return int(library("ggml-base").ggml_blck_size(qtype))


def type_size(qtype: int) -> int:
    """Bytes per block, as ggml itself reports it."""
    return int(library("ggml-base").ggml_type_size(qtype))


def row_size(qtype: int, n_per_row: int) -> int:
    """Bytes of one row, as ggml itself reports it."""
    return int(library("ggml-base").ggml_row_size(qtype, n_per_row))


@cache
def _ggml_cpu() -> ctypes.CDLL:
    lib = library("ggml-cpu")
    lib.ggml_cpu_init()  # fills the fp16 lookup table the converters use for odd tails
    return lib


def widen_f16(src: int, dst: int, n: int, *, bf16: bool = False) -> None:
    """n fp16 (or bf16) values at `src` to float32 at `dst`, with the CPU's vector units; the GIL
    is released during the call."""
    lib = _ggml_cpu()
    (lib.ggml_cpu_bf16_to_fp32 if bf16 else lib.ggml_cpu_fp16_to_fp32)(src, dst, n)


# ---------------------------------------------------------------------------------------------
# ggml: the backend registry
# ---------------------------------------------------------------------------------------------

# ggml-backend.h: enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL, DEV_META = range(5)


@cache
def _registry() -> ctypes.CDLL:
    llama()  # loads libllama and with it the ggml libraries and their backends
    lib = library("ggml")
    if hasattr(lib, "ggml_backend_load_all") and lib.ggml_backend_reg_count() == 0:
        lib.ggml_backend_load_all()  # builds with dynamic backends (GGML_BACKEND_DL) register nothing until asked
    return lib


def backend_names() -> list[str]:
    lib = _registry()
    return [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
            for i in range(lib.ggml_backend_reg_count())]


def backend_devices() -> list[dict[str, Any]]:
    """Every device in ggml's registry: {name, description, type (DEV_*), backend, free, total}."""
    lib = _registry()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = sz(0), sz(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({
            "name": lib.ggml_backend_dev_name(dev).decode(errors="replace"),
            "description": (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            "type": int(lib.ggml_backend_dev_type(dev)),
            "backend": lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode(errors="replace"),
            "free": free.value, "total": total.value,
        })
    return out


def system_info() -> str:
    """llama.cpp's system info line ("CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |")."""
    return llama().llama_print_system_info().decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# ggml: a persistent CPU threadpool (llama-bench attaches one; llama-cpp-python binds none)
# ---------------------------------------------------------------------------------------------

class _ThreadpoolParams(ctypes.Structure):
    # ggml.h's struct ggml_threadpool_params
    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


@contextmanager
def cpu_threadpool(ctx: Any, n_threads: int) -> Iterator[bool]:
    """Attach a persistent ggml CPU threadpool to a llama context for the duration.

    Without one ggml starts and joins its worker threads on every decode, which costs a small
    model a good part of its generation speed. Best effort: yields False, and changes nothing,
    where the libraries do not allow it.
    """
    pool = None
    try:
        base, cpu = library("ggml-base"), library("ggml-cpu")
        params = _ThreadpoolParams()
        base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        llama_lib = llama().llama_cpp._lib
        llama_lib.llama_attach_threadpool.argtypes = [vp, vp, vp]
        llama_lib.llama_detach_threadpool.argtypes = [vp]
    except (OSError, AttributeError, LlamalocalError):
        pool = None
    if not pool:
        yield False
        return
    llama_lib.llama_attach_threadpool(ctx, pool, pool)
    try:
        yield True
    finally:
        llama_lib.llama_detach_threadpool(ctx)
        cpu.ggml_threadpool_free(pool)


# ---------------------------------------------------------------------------------------------
# libllama: vocabulary, memory, batches and logits (through llama-cpp-python's bindings)
# ---------------------------------------------------------------------------------------------

def vocab_info(model: Any) -> tuple[int, bool, int]:
    """(n_tokens, add_bos, bos id) of a llama_model pointer."""
    lc = llama()
    vocab = lc.llama_model_get_vocab(model)
    return int(lc.llama_vocab_n_tokens(vocab)), bool(lc.llama_vocab_get_add_bos(vocab)), int(lc.llama_vocab_bos(vocab))


def is_eog(model: Any, token: int) -> bool:
    """Whether `token` ends generation (eos, eot, eom, ...) for a llama_model pointer."""
    lc = llama()
    return bool(lc.llama_vocab_is_eog(lc.llama_model_get_vocab(model), token))


def token_piece(model: Any, token: int, *, special: bool = False) -> bytes:
    """The bytes of one token, however long. (llama-cpp-python's own detokenize goes through a
    32-byte buffer and returns nothing for longer tokens: Llama 3 has 231 of them.)"""
    lc = llama()
    vocab = lc.llama_model_get_vocab(model)
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = int(lc.llama_token_to_piece(vocab, token, buf, size, 0, special))
        if n >= 0:
            return buf.raw[:n]
        size = -n  # llama.cpp answers with the size it needs, negated


def clear_memory(ctx: Any, data: bool = True) -> None:
    """Empty a context's KV cache (`data`: also zero its buffers)."""
    lc = llama()
    lc.llama_memory_clear(lc.llama_get_memory(ctx), data)


def context_counts(ctx: Any) -> tuple[int, int, int]:
    """(n_ctx, n_batch, n_threads) of a llama_context pointer."""
    lc = llama()
    return int(lc.llama_n_ctx(ctx)), int(lc.llama_n_batch(ctx)), int(lc.llama_n_threads(ctx))


def set_threads(ctx: Any, n_threads: int) -> None:
    llama().llama_set_n_threads(ctx, n_threads, n_threads)


def synchronize(ctx: Any) -> None:
    llama().llama_synchronize(ctx)


def model_counts(model: Any) -> tuple[int, int]:
    """(bytes of weights, parameters) of a llama_model pointer, as llama.cpp counts them."""
    lc = llama()
    return int(lc.llama_model_size(model)), int(lc.llama_model_n_params(model))


class TokenBatch:
    """A llama_batch for one sequence, filled through numpy views of its arrays: a Python loop of
    ctypes stores costs more than decoding a token of a small model."""

    def __init__(self, capacity: int) -> None:
        import numpy as np

        lc = llama()
        self.capacity = capacity
        self.batch = lc.llama_batch_init(capacity, 0, 1)
        b = self.batch
        self.token = np.ctypeslib.as_array(b.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(b.logits, shape=(capacity,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(capacity,))[:] = 1
        for k in range(capacity):  # once: every token belongs to sequence 0
            b.seq_id[k][0] = 0

    def set(self, tokens: Any, pos0: int, outputs: Any) -> int:
        """Load `tokens` at positions pos0…; `outputs` (bool or bool array) marks the tokens whose
        logits are wanted. Returns how many are."""
        import numpy as np

        n = len(tokens)
        self.token[:n] = tokens
        self.pos[:n] = np.arange(pos0, pos0 + n)
        self.logits[:n] = outputs
        self.batch.n_tokens = n
        return int(np.count_nonzero(self.logits[:n]))

    def decode_raw(self, ctx: Any) -> int:
        """llama_decode's return code (0 is success)."""
        return int(llama().llama_decode(ctx, self.batch))

    def decode(self, ctx: Any) -> None:
        rc = self.decode_raw(ctx)
        if rc != 0:
            raise LlamalocalError(f"llama_decode failed with code {rc} (out of memory for this context?); "
                                  "try a smaller --ctx")

    def close(self) -> None:
        if self.batch is not None:
            llama().llama_batch_free(self.batch)
            self.batch = None

    def __enter__(self) -> TokenBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def last_logits(ctx: Any, n_out: int, n_vocab: int) -> Any:
    """A copy of the logits of the last decode's outputs, (n_out, n_vocab) float32."""
    import numpy as np

    ptr = ctypes.cast(llama().llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(ptr, shape=(n_out * n_vocab,)).reshape(n_out, n_vocab).copy()
