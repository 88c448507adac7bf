"""The one native boundary: every ctypes call into the libraries llama-cpp-python ships.

llama-cpp-python binds libllama's public API (`llama_cpp.llama_*`) but not ggml's quantizers,
its fp16/bf16 widening, its backend registry, its CPU threadpool, its RPC backend or the graph
tensors an eval callback is handed. Everything
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
from typing import TYPE_CHECKING, Any

from llamalocal.convert.errors import LlamalocalError

if TYPE_CHECKING:
    import numpy

# The llama-cpp-python release the struct layouts and signatures below are written against.
PINNED_LLAMA_CPP_PYTHON = "0.3.36"
_ALLOW_OTHER_VERSION = "LLAMALOCAL_ALLOW_LLAMA_CPP_VERSION"  # set to 1 to run against another release anyway

vp, sz, i64, c_int, c_bool, cs = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_bool, ctypes.c_char_p)

# ggml.h: typedef void (*ggml_abort_callback_t)(const char * error_message)
_ABORT_FN = ctypes.CFUNCTYPE(None, cs)

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
        "ggml_set_abort_callback": ([_ABORT_FN], vp),
        # graph tensors, as the scheduler's eval callback sees them
        "ggml_op_name": ([c_int], cs),
        "ggml_nbytes": ([vp], sz),
        "ggml_tensor_overhead": ([], sz),
        "ggml_backend_buffer_is_host": ([vp], c_bool),
        "ggml_backend_tensor_get": ([vp, vp, sz, sz], None),
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
        "ggml_backend_dev_by_name": ([cs], vp),
        "ggml_backend_dev_by_type": ([c_int], vp),
        "ggml_backend_reg_dev_count": ([vp], sz),
        "ggml_backend_reg_dev_get": ([vp, sz], vp),
        "ggml_backend_load_all": ([], None),
    },
    # direct symbols, used only where the "RPC" registry entry lacks the proc address
    "ggml-rpc": {
        "ggml_backend_rpc_add_server": ([cs], vp),
        "ggml_backend_rpc_start_server": ([cs, cs, sz, sz, vp], None),
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
    d = lib_dir()
    if sys.platform == "win32":
        names = [f"{stem}.dll", f"lib{stem}.dll"]
    elif sys.platform == "darwin":
        names = [f"lib{stem}.dylib", f"lib{stem}.so"]
    else:
        # A wheel holds copies, not symlinks: libggml-base.so, .so.0 and .so.0.25.3 are three files.
        # The libraries name each other by soname (lib{stem}.so.N), so that is the copy in use;
        # loading another one would load the library twice, each with globals of its own (ggml's
        # abort handler, its backend registry).
        sonames = sorted(p.name for p in d.glob(f"lib{stem}.so.*") if p.name.rpartition(".so.")[2].isdigit())
        names = [*sonames, f"lib{stem}.so"]
    return next((d / n for n in names if (d / n).exists()), None)


@cache  # importlib.metadata costs ~1 ms, and llama() checks on every call (twice per generated token)
def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def check_version() -> None:
    """Refuse a llama-cpp-python other than the pinned one: the struct layouts here would not match
    and a mismatch is a crash, not an error. $LLAMALOCAL_ALLOW_LLAMA_CPP_VERSION=1 overrides."""
    imported = sys.modules.get("llama_cpp")
    # once it is imported its own __version__ says it; importlib.metadata would cost ~15 ms of start-up
    have = getattr(imported, "__version__", None) or installed_version()
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
    import llama_cpp  # importing loads the libraries but calls nothing that depends on their layout

    check_version()
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
# libc: is a byte range of a file already in the page cache?
# ---------------------------------------------------------------------------------------------

@cache
def _libc() -> ctypes.CDLL | None:
    if sys.platform not in ("linux", "darwin"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.argtypes, libc.mmap.restype = [vp, sz, c_int, c_int, c_int, ctypes.c_long], vp
        libc.munmap.argtypes, libc.munmap.restype = [vp, sz], c_int
        libc.mincore.argtypes, libc.mincore.restype = [vp, sz, ctypes.POINTER(ctypes.c_ubyte)], c_int
        libc.madvise.argtypes, libc.madvise.restype = [vp, sz, c_int], c_int
    except (OSError, AttributeError):
        return None
    return libc


_PROT_READ, _MAP_SHARED = 1, 1
_MADV_DONTNEED = 4  # Linux and macOS
_MAP_FAILED = ctypes.c_void_p(-1).value


class Residency:
    """Which pages of an open file are in the page cache, asked many times: the whole file is
    mapped once and mincore is asked about ranges of that one mapping. A map and unmap per
    question would cost the process a TLB shootdown on every core each time; that is what happens
    only where the whole file cannot be mapped (an address-space limit).

    `view()` lends the mapped bytes themselves, for reading cached pages without copying them;
    the caller must make sure the file cannot shrink meanwhile (a page past the end of a file
    faults with SIGBUS): direct_io.BlockReader does, with a lease."""

    def __init__(self, fd: int, size: int) -> None:
        import mmap

        self.page = mmap.PAGESIZE
        self._fd = fd
        self._addr: int | None = None
        self._span = -(-size // self.page) * self.page
        libc = _libc()
        if libc is not None and self._span:
            addr = libc.mmap(None, self._span, _PROT_READ, _MAP_SHARED, fd, 0)
            if addr is not None and addr != _MAP_FAILED:
                self._addr = addr

    def pages(self, offset: int, length: int) -> bytes | None:
        """One byte per page holding [offset, offset + length): non-zero where the page is cached
        (Linux sets bit 0; macOS's other bits mean resident too); None where the OS cannot tell."""
        libc = _libc()
        if libc is None or length <= 0:
            return None
        first = offset // self.page
        last = -(-(offset + length) // self.page)
        if self._addr is not None and last * self.page <= self._span:
            return _mincore(libc, self._addr + first * self.page, last - first, self.page)
        # past the file as it was when mapped, or no mapping of it all: map just this range
        addr = libc.mmap(None, (last - first) * self.page, _PROT_READ, _MAP_SHARED, self._fd, first * self.page)
        if addr is None or addr == _MAP_FAILED:
            return None
        try:
            return _mincore(libc, addr, last - first, self.page)
        finally:
            libc.munmap(addr, (last - first) * self.page)

    @property
    def mapped(self) -> bool:
        """Whether the whole file (as it was when opened) is mapped."""
        return self._addr is not None

    def view(self, offset: int, length: int) -> numpy.ndarray | None:
        """The file's bytes [offset, offset + length) in the mapping, read-only: touching them
        maps the page-cache pages into this process (or reads them from disk if they are not
        cached). None where the whole file is not mapped or the range lies past it."""
        import numpy as np

        if self._addr is None or offset < 0 or length <= 0 or offset + length > self._span:
            return None
        data = np.ctypeslib.as_array((ctypes.c_ubyte * length).from_address(self._addr + offset))
        data.flags.writeable = False  # PROT_READ: a write would be SIGSEGV
        return data

    def drop(self, offset: int, length: int) -> None:
        """Unmap the pages holding [offset, offset + length) from this process (they stay in the
        page cache): what `view` touched stops counting as this process's memory."""
        libc = _libc()
        if self._addr is None or libc is None or length <= 0:
            return
        first = offset // self.page * self.page
        last = min(self._span, -(-(offset + length) // self.page) * self.page)
        if last > first:
            libc.madvise(self._addr + first, last - first, _MADV_DONTNEED)

    def close(self) -> None:
        addr, self._addr = self._addr, None
        libc = _libc()
        if addr is not None and libc is not None:
            libc.munmap(addr, self._span)


def _mincore(libc: ctypes.CDLL, addr: int, n: int, page: int) -> bytes | None:
    vec = (ctypes.c_ubyte * n)()
    return bytes(vec) if libc.mincore(addr, n * page, vec) == 0 else None


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
# ggml: the RPC backend (llama.cpp's ggml-rpc), and devices for llama_model_params
# ---------------------------------------------------------------------------------------------

# ggml-rpc.h: void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
#                 size_t n_threads, size_t n_devices, ggml_backend_dev_t * devices)
_START_SERVER_FN = ctypes.CFUNCTYPE(None, cs, cs, sz, sz, vp)
# ggml-rpc.h: ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)
_ADD_SERVER_FN = ctypes.CFUNCTYPE(vp, cs)


def rpc_available() -> bool:
    """Whether this llama-cpp-python build has ggml's RPC backend (built with -DGGML_RPC=on)."""
    try:
        return bool(_registry().ggml_backend_reg_by_name(b"RPC"))
    except (OSError, LlamalocalError):
        return False


def _rpc_proc(name: str, prototype: Any) -> Any:
    """An RPC backend function, looked up the way llama.cpp's own tools do: through the "RPC"
    registry entry's proc address (works with dynamically loaded backends too), else the symbol."""
    lib = _registry()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise LlamalocalError("this llama-cpp-python build has no RPC backend (it was compiled without "
                              "-DGGML_RPC=on); `llamalocal doctor` prints the reinstall command")
    addr = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if addr:
        return prototype(addr)
    return getattr(library("ggml-rpc"), name)


def device_by_name(name: str) -> int | None:
    """A ggml device handle by ggml's name ("CPU", "CUDA0", "Metal"), or None."""
    return _registry().ggml_backend_dev_by_name(name.encode()) or None


def cpu_device() -> int:
    dev = _registry().ggml_backend_dev_by_type(DEV_CPU)
    if not dev:
        raise LlamalocalError("ggml has no CPU device in this llama-cpp-python build")
    return int(dev)


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes of a ggml device handle (an RPC device asks its server)."""
    free, total = sz(0), sz(0)
    _registry().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def rpc_add_server(endpoint: str) -> list[int]:
    """Register the RPC server at `endpoint` ("host:port") with ggml and return its devices.

    ggml connects at once to count them; ggml aborts the process if nothing answers there, so
    callers make sure something does (llamalocal always hands ggml a local relay's port).
    """
    reg = _rpc_proc("ggml_backend_rpc_add_server", _ADD_SERVER_FN)(endpoint.encode())
    if not reg:
        raise LlamalocalError(f"the RPC server at {endpoint} reports no devices")
    lib = _registry()
    return [int(lib.ggml_backend_reg_dev_get(reg, i)) for i in range(lib.ggml_backend_reg_dev_count(reg))]


def rpc_start_server(endpoint: str, device: int, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve `device` with ggml's RPC server on `endpoint` ("127.0.0.1:port"). Blocks for as long
    as the server runs (its accept loop never returns unless the port cannot be bound); the GIL
    is released meanwhile, so run it on a thread of its own."""
    fn = _rpc_proc("ggml_backend_rpc_start_server", _START_SERVER_FN)
    devices = (vp * 1)(device)
    fn(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devices)


class DeviceList:
    """A NULL-terminated ggml_backend_dev_t array for llama_model_params.devices. llama.cpp copies
    the handles when the model loads; the owner keeps this alive as long as the model anyway."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = list(devices)
        self.array = (vp * (len(devices) + 1))(*devices, None)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.array)


@contextmanager
def model_devices(devices: DeviceList | None) -> Iterator[None]:
    """While active, llama-cpp-python's Llama(...) loads its model with `devices` in
    llama_model_params.devices. (Its own `rpc_servers` is gone in 0.3.x, and it never sets the
    field: Llama builds its params from llama_model_default_params(), which this wraps.)"""
    if devices is None:
        yield
        return
    bindings = llama().llama_cpp
    default = bindings.llama_model_default_params

    def with_devices() -> Any:
        params = default()
        params.devices = devices.address
        return params

    bindings.llama_model_default_params = with_devices
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


_abort_handler: list[Any] = []  # the installed ctypes callback, kept alive


def on_ggml_abort(handler: Any) -> None:
    """Call `handler(message)` instead of ggml's abort (message and backtrace, then SIGABRT).
    ggml calls abort() right after the handler returns, so the handler must end the process
    itself (os._exit). ggml aborts on any RPC failure; this turns that into one clear line."""
    def call(message: bytes | None) -> None:
        handler((message or b"").decode(errors="replace"))

    cb = _ABORT_FN(call)
    _abort_handler[:] = [cb]
    library("ggml-base").ggml_set_abort_callback(cb)


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


# ---------------------------------------------------------------------------------------------
# libllama: samplers and grammars (through llama-cpp-python's bindings)
# ---------------------------------------------------------------------------------------------

GRAMMAR_ROOT = b"root"
_TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]  # llama.h's struct llama_token_data


def _chain(lc: Any, samplers: list[Any]) -> Any:
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for s in samplers:
        lc.llama_sampler_chain_add(chain, s)  # the chain owns them from here
    return chain


def grammar_sampler(model: Any, grammar: str) -> Any | None:
    """llama.cpp's grammar sampler for GBNF text, or None where llama.cpp refuses it (a parse error,
    left recursion, no `root`: llama_sampler_init_grammar answers NULL and logs why)."""
    lc = llama()
    return lc.llama_sampler_init_grammar(lc.llama_model_get_vocab(model), grammar.encode("utf-8"), GRAMMAR_ROOT) or None


def grammar_allowed(model: Any, grammar: str) -> int | None:
    """How many tokens of the vocabulary `grammar` allows as the first one (None: refused).

    Runs the grammar over the whole vocabulary once, as sampling does at every step; what is
    checked here may abort the process on a malformed grammar, so the server calls this in a
    child process it can lose (llamalocal.server.grammar)."""
    import numpy as np

    lc = llama()
    smpl = grammar_sampler(model, grammar)
    if smpl is None:
        return None
    try:
        n_vocab = vocab_info(model)[0]
        cand = _Candidates(lc, n_vocab)
        cand.load(np.zeros(n_vocab, dtype=np.float32))
        lc.llama_sampler_apply(smpl, ctypes.byref(cand.array))
        return int(np.isfinite(cand.view["logit"][: cand.array.size]).sum())
    finally:
        lc.llama_sampler_free(smpl)


def quiet_llama_log() -> None:
    """Send llama.cpp's log to its default (stderr), away from llama-cpp-python's Python callback:
    for a forked child, where that callback could wait on a lock another thread held."""
    lc = llama()
    lc.llama_log_set(ctypes.cast(0, lc.llama_log_callback), ctypes.c_void_p(0))  # NULL: llama.cpp's default


class _Candidates:
    """A llama_token_data_array over the whole vocabulary, filled through a numpy view."""

    def __init__(self, lc: Any, n_vocab: int) -> None:
        import numpy as np

        self.n_vocab = n_vocab
        self.buf = (lc.llama_token_data * n_vocab)()
        self.view = np.frombuffer(self.buf, dtype=np.dtype(_TOKEN_DATA))
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.array = lc.llama_token_data_array(data=ctypes.cast(self.buf, lc.llama_token_data_p),
                                               size=n_vocab, selected=-1, sorted=False)
        self._data = self.array.data

    def load(self, logits: Any) -> None:
        self.view["id"] = self.ids
        self.view["logit"] = logits
        self.view["p"] = 0.0
        # samplers may shrink the array and point it elsewhere: start over from the whole buffer
        self.array.data, self.array.size, self.array.selected, self.array.sorted = self._data, self.n_vocab, -1, False


class Sampler:
    """llama.cpp's samplers for one completion, in llama-cpp-python's order: logit bias and
    penalties, then the grammar, then top-k, typical, top-p, min-p, temperature and the draw
    (or plain argmax at temperature 0).

    The grammar is applied on its own, between the two chains: llama.cpp aborts the process
    (or throws through its C API) when a grammar is handed a token it forbids, which its own
    sampling does when a grammar allows nothing. Here a token is accepted by the grammar only
    after the grammar allowed it, and a grammar that allows nothing ends the completion
    (`sample` returns None).
    """

    def __init__(self, model: Any, ctx: Any, *, temp: float, top_k: int, top_p: float, min_p: float,
                 typical_p: float, repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                 penalty_last_n: int, seed: int | None, grammar: str | None = None,
                 logit_bias: dict[int, float] | None = None) -> None:
        import numpy as np

        lc = self._lc = llama()
        self.model, self.ctx = model, ctx
        n_vocab = vocab_info(model)[0]
        self.n_vocab = n_vocab
        self.pre = self.post = self.grammar = None
        self.bias_ids = np.array(sorted(logit_bias or {}), dtype=np.int64)
        self.bias = np.array([(logit_bias or {})[int(i)] for i in self.bias_ids], dtype=np.float32)
        if self.bias_ids.size and (self.bias_ids.min() < 0 or self.bias_ids.max() >= n_vocab):
            raise LlamalocalError(f"logit_bias names a token outside the vocabulary (0..{n_vocab - 1})")
        try:
            self.pre = _chain(lc, [lc.llama_sampler_init_penalties(n_vocab, penalty_last_n, repeat_penalty,
                                                                   frequency_penalty, presence_penalty)])
            if grammar is not None:
                self.grammar = grammar_sampler(model, grammar)
                if self.grammar is None:
                    raise LlamalocalError("llama.cpp refused the grammar")
            if temp == 0:
                post = [lc.llama_sampler_init_greedy()]
            else:
                post = [lc.llama_sampler_init_top_k(top_k), lc.llama_sampler_init_typical(typical_p, 1),
                        lc.llama_sampler_init_top_p(top_p, 1), lc.llama_sampler_init_min_p(min_p, 1),
                        lc.llama_sampler_init_temp(temp),
                        lc.llama_sampler_init_dist(lc.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF)]
            self.post = _chain(lc, post)
            self.cand = _Candidates(lc, n_vocab)
        except BaseException:
            self.close()
            raise

    def sample(self) -> int | None:
        """The next token from the last decode's logits, or None where the grammar allows none."""
        import numpy as np

        lc = self._lc
        ptr = lc.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise LlamalocalError("llama.cpp has no logits for the last token")
        cand = self.cand
        cand.load(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
        logit = cand.view["logit"]
        if self.bias_ids.size:
            logit[self.bias_ids] += self.bias
        arr = ctypes.byref(cand.array)
        lc.llama_sampler_apply(self.pre, arr)  # in place, in id order
        allowed = None
        if self.grammar is not None:
            lc.llama_sampler_apply(self.grammar, arr)  # forbidden tokens: -inf, still in id order
            allowed = np.isfinite(logit)
            if not allowed.any():
                return None
            allowed_logit = np.where(allowed, logit, -np.inf)
        lc.llama_sampler_apply(self.post, arr)
        sel = cand.array.selected
        if not 0 <= sel < cand.array.size:
            raise LlamalocalError(f"llama.cpp's sampler selected no token (index {sel})")
        token = int(cand.array.data[sel].id)
        if allowed is not None and not allowed[token]:
            token = int(np.argmax(allowed_logit))  # the draw landed on a forbidden token: take the best allowed
        return token

    def accept(self, token: int) -> None:
        """Record `token` as generated (penalties, the grammar's state, the draw's history)."""
        lc = self._lc
        lc.llama_sampler_accept(self.pre, token)
        if self.grammar is not None and not is_eog(self.model, token):
            lc.llama_sampler_accept(self.grammar, token)
        lc.llama_sampler_accept(self.post, token)

    def close(self) -> None:
        lc = self._lc
        for name in ("pre", "grammar", "post"):
            smpl = getattr(self, name)
            if smpl is not None:
                lc.llama_sampler_free(smpl)
                setattr(self, name, None)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# libllama: llama_model_quantize with an importance matrix (what llama-quantize runs)
# ---------------------------------------------------------------------------------------------

def model_quantize(src: str | Path, dst: str | Path, ftype: int, *, nthread: int = 0,
                   imatrix: dict[str, Any] | None = None) -> None:
    """llama.cpp's `llama_model_quantize` of the GGUF `src` into `dst` at llama_ftype `ftype`.

    `imatrix` maps tensor names to float32 importance (one value per column, what llama-quantize
    hands over after reading an imatrix file). Raises LlamalocalError if llama.cpp refuses.
    """
    import numpy as np

    lc = llama()
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep: list[Any] = []
    if imatrix:
        entries = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the terminator
        for k, (name, values) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(v)
            entries[k].name = name.encode()
            entries[k].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[k].size = v.size
        params.imatrix = entries
        keep.append(entries)
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise LlamalocalError(f"llama_model_quantize failed for {src} (ftype {ftype})")


# ---------------------------------------------------------------------------------------------
# ggml: the graph tensors a scheduler eval callback sees (llama_context_params.cb_eval)
# ---------------------------------------------------------------------------------------------

GGML_TYPE_F32 = 0
_GGML_OBJECT_SIZE = 32  # ggml.c's struct ggml_object, which precedes every tensor in a context


class GGMLTensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_NAME 64). `check_tensor_layout` compares its size with ggml's own."""

    _fields_ = [
        ("type", ctypes.c_int),                   # enum ggml_type
        ("buffer", vp),                           # ggml_backend_buffer_t: host memory or a device's
        ("ne", ctypes.c_int64 * 4),               # elements per dimension, ne[0] the row length
        ("nb", ctypes.c_size_t * 4),              # strides in bytes
        ("op", ctypes.c_int),                     # enum ggml_op
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", vp * 10),                         # inputs: a matmul's weight is src[0], activations src[1]
        ("view_src", vp),
        ("view_offs", ctypes.c_size_t),
        ("data", vp),
        ("name", ctypes.c_char * 64),
        ("extra", vp),
        ("padding", ctypes.c_char * 8),
    ]


def check_tensor_layout() -> None:
    """Refuse to read graph tensors if this struct is not ggml's (a crash otherwise)."""
    want = int(library("ggml-base").ggml_tensor_overhead()) - _GGML_OBJECT_SIZE
    if ctypes.sizeof(GGMLTensor) != want:
        raise LlamalocalError(f"struct ggml_tensor is {want} bytes in this ggml but {ctypes.sizeof(GGMLTensor)} "
                              f"in llamalocal; llamalocal needs llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}")


@cache
def op_code(name: str) -> int:
    """The enum ggml_op value of an op named as ggml_op_name names it ("MUL_MAT")."""
    base = library("ggml-base")
    for code in range(1, 512):
        got = base.ggml_op_name(code)
        if got is None:
            break
        if got.decode() == name:
            return code
    raise LlamalocalError(f"ggml has no op {name}")


def weight_name(raw: bytes) -> str:
    """A weight's own name from a graph tensor's name: the scheduler names the copy it makes for
    another device `CUDA0#blk.0.attn_k.weight#0` (llama-imatrix's filter_tensor_name)."""
    name = raw.decode(errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class MatmulTap:
    """The eval callback of a llama context that hands matmul inputs to Python.

    `want(op, weight, src1)` is asked for every graph node whose op is MUL_MAT or MUL_MAT_ID
    (the "ask" phase; answering False lets ggml compute on without stopping); for the wanted ones,
    once computed, `take(weight, x, src1_address)` receives the activations `x` as a float32 numpy
    array (ne3, ne2, ne1, ne0) — a view of host memory, or a copy read from a device buffer —
    valid only during the call. An exception in either is kept and raised by `raise_pending()`
    after the decode (ggml cannot unwind through C); the graph finishes computing meanwhile.
    Setting `stopped` (from a signal handler, say) makes it skip the rest of the graph: the
    decode returns early and its results are not to be used.
    """

    def __init__(self, want: Any, take: Any) -> None:
        check_tensor_layout()
        self._want, self._take = want, take
        self._mul_mat, self._mul_mat_id = op_code("MUL_MAT"), op_code("MUL_MAT_ID")
        self._base = library("ggml-base")
        self._copy: Any = None  # reused buffer for tensors on a device
        self.error: BaseException | None = None
        self.stopped = False
        self.c_callback = llama().ggml_backend_sched_eval_callback(self._call)

    def _activations(self, src1: GGMLTensor) -> Any:
        import numpy as np

        ne = tuple(int(n) for n in reversed(src1.ne))
        nb = tuple(int(n) for n in reversed(src1.nb))
        nbytes = int(self._base.ggml_nbytes(ctypes.addressof(src1)))
        if self._base.ggml_backend_buffer_is_host(src1.buffer):
            raw = np.ctypeslib.as_array(ctypes.cast(src1.data, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))
        else:
            if self._copy is None or self._copy.size < nbytes:
                self._copy = np.empty(nbytes, dtype=np.uint8)
            raw = self._copy[:nbytes]
            self._base.ggml_backend_tensor_get(ctypes.addressof(src1), raw.ctypes.data, 0, nbytes)
        return np.lib.stride_tricks.as_strided(raw.view(np.float32), shape=ne, strides=nb, writeable=False)

    def _call(self, t: int, ask: bool, _user_data: Any) -> bool:
        try:
            if self.stopped:
                return False  # asked: not wanted; computed: the scheduler skips the rest of the split
            if self.error is not None:
                return False  # stop asking; the decode finishes, then the error is raised
            op = ctypes.c_int.from_address(t + GGMLTensor.op.offset).value
            if op != self._mul_mat and op != self._mul_mat_id:
                return False
            node = GGMLTensor.from_address(t)
            src0, src1 = GGMLTensor.from_address(node.src[0]), GGMLTensor.from_address(node.src[1])
            name = weight_name(src0.name)
            if ask:
                return bool(self._want("MUL_MAT_ID" if op == self._mul_mat_id else "MUL_MAT", name, src1))
            if src1.type != GGML_TYPE_F32 or src1.nb[0] != 4:
                raise LlamalocalError(f"{name}: activations are not contiguous float32 rows")
            self._take(name, self._activations(src1), node.src[1])
            return True
        except BaseException as e:  # noqa: BLE001 - nothing may unwind into ggml; re-raised after the decode
            self.error = e
            return True  # returning False in the compute phase would skip the rest of the graph

    def raise_pending(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e


FLASH_ATTN_AUTO = -1  # llama.h's LLAMA_FLASH_ATTN_TYPE_AUTO: on where the backend has it (llama.cpp's default)


@contextmanager
def eval_callback(llm: Any, tap: MatmulTap, *, flash_attn_type: int | None = None) -> Iterator[Any]:
    """Run a llama_cpp.Llama with `tap` as its context's eval callback.

    llama-cpp-python takes no cb_eval, so the context it made is freed first (memory stays as the
    planner planned it) and a new one is made from the same parameters plus the callback (and
    `flash_attn_type`, if given). Yields the new llama_context pointer; the Llama is left without
    a usable context afterwards (close it).
    """
    import llama_cpp._internals as internals

    lc = llama()
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.cb_eval = tap.c_callback
    params.cb_eval_user_data = None
    if flash_attn_type is not None:
        params.flash_attn_type = flash_attn_type
    llm._ctx.close()
    try:
        ctx = internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
    except ValueError as e:
        raise LlamalocalError(f"llama.cpp could not create a context for the eval callback ({e})") from e
    ctx._llamalocal_keep = (params, tap)  # type: ignore[attr-defined]  # the callback must outlive the context
    llm._ctx = ctx
    try:
        yield ctx.ctx
    finally:
        lc.llama_synchronize(ctx.ctx)
        ctx.close()


def logits_view(ctx: Any, n_out: int, n_vocab: int) -> Any:
    """The logits of the last decode's outputs, (n_out, n_vocab) float32, as a view (no copy):
    valid until the next decode."""
    import numpy as np

    ptr = ctypes.cast(llama().llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(ptr, shape=(n_out * n_vocab,)).reshape(n_out, n_vocab)
