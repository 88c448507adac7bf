"""Writing torch.save's zip format without torch (tests, sample checkpoints).

`save_state_dict` writes byte for byte what torch 2.x's `torch.save(state_dict, f)` writes for a
dict of contiguous CPU tensors (checked against the torch-written fixtures):

    <stem>/data.pkl                 protocol-2 pickle: {name: _rebuild_tensor_v2(persistent storage
                                    ('storage', torch.HalfStorage, '0', 'cpu', numel), offset, size,
                                    stride, False, collections.OrderedDict())}
    <stem>/.format_version          b"1"
    <stem>/.storage_alignment       b"64"
    <stem>/byteorder                b"little"
    <stem>/data/0 .. N              storage bytes, each starting at a multiple of 64 in the file
    <stem>/version                  b"3\\n"
    <stem>/.data/serialization_id   40 random digits

<stem> is the file name without its last suffix (`consolidated.00` for consolidated.00.pth), as
torch does. Records are stored (not compressed) with data descriptors; the local header's extra
field ("FB" + length + "Z" padding) aligns each record's data to 64 bytes; a zip64 end record is
always written.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

DTYPES = ("f16", "bf16", "f32")
_NP_DTYPE = {"f16": "<f2", "bf16": "<u2", "f32": "<f4"}
_ALIGN = 64  # torch's kFieldAlignment
_ZIP32_LIMIT = 0xFFFFFFFF  # sizes and offsets at or above this need zip64 fields
_ZIP64_SENTINEL = 0xFFFFFFFF  # what a 32-bit field holds when the value is in the zip64 extra
_CHUNK = 1 << 22  # elements converted at a time, so big tensors are not copied whole


# ---------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------

def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even like torch; NaN -> 0x7FC0."""
    x = np.asarray(x, dtype=np.float32)
    u = x.astype(np.float32, order="C", copy=False).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _convert(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return to_bf16(x.astype(np.float32, copy=False))
    with np.errstate(over="ignore"):  # out-of-range values become inf, as in torch
        return x.astype(_NP_DTYPE[dtype])


# ---------------------------------------------------------------------------------------------
# The zip container, as torch's PyTorchStreamWriter (miniz) lays it out
# ---------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    name: bytes
    offset: int
    crc: int
    size: int

    @property
    def big_size(self) -> bool:
        return self.size >= _ZIP32_LIMIT

    @property
    def big_offset(self) -> bool:
        return self.offset >= _ZIP32_LIMIT


def _zip64_extra(values: list[int]) -> bytes:
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


class _TorchZipWriter:
    """Appends stored records to a zip, then writes the central directory on `finish()`.

    Past 4 GiB (a record that big, or starting that far in) torch's miniz adds a zip64 extra field
    to the local header as well as to the central one ([size, 0] and/or [offset]) and writes 8-byte
    sizes in the data descriptor; this writer does the same.
    """

    def __init__(self, f: BinaryIO, archive: str) -> None:
        self.f = f
        self.archive = archive
        self.entries: list[_Entry] = []
        self.pos = 0

    def _write(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.pos += len(b)

    def record(self, name: str, size: int, chunks: Iterable[bytes | memoryview]) -> None:
        """Write one record of exactly `size` bytes given as `chunks`."""
        e = _Entry(f"{self.archive}/{name}".encode(), self.pos, 0, size)
        zip64 = _zip64_extra(([size, 0] if e.big_size else []) + ([e.offset] if e.big_offset else []))
        # pad so that the data starts on a 64-byte boundary: 30-byte header, name, zip64, "FB" field
        pad = -(e.offset + 30 + len(e.name) + len(zip64) + 4) % _ALIGN
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        # version 0, flags: sizes in a data descriptor (bit 3) + UTF-8 names (bit 11), stored, no date
        self._write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0,
                                len(e.name), len(extra)))
        self._write(e.name)
        self._write(extra)
        written = 0
        for c in chunks:
            e.crc = zlib.crc32(c, e.crc)
            written += len(c)
            self._write(c)
        if written != size:
            raise ValueError(f"{name}: wrote {written} bytes, announced {size}")
        sizes = "QQ" if e.big_size or e.big_offset else "II"
        self._write(struct.pack(f"<II{sizes}", 0x08074B50, e.crc, size, size))
        self.entries.append(e)

    def finish(self) -> None:
        cd_start = self.pos
        for e in self.entries:
            extra = _zip64_extra(([e.size, e.size] if e.big_size else []) + ([e.offset] if e.big_offset else []))
            size32 = _ZIP64_SENTINEL if e.big_size else e.size
            offset32 = _ZIP64_SENTINEL if e.big_offset else e.offset
            self._write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0,
                                    e.crc, size32, size32, len(e.name), len(extra), 0, 0, 0, 0, offset32))
            self._write(e.name)
            self._write(extra)
        cd_size = self.pos - cd_start
        n = len(self.entries)
        eocd64 = self.pos
        self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_start))
        self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                                _ZIP64_SENTINEL if cd_size >= _ZIP32_LIMIT else cd_size,
                                _ZIP64_SENTINEL if cd_start >= _ZIP32_LIMIT else cd_start, 0))


def _archive_name(path: Path) -> str:
    """torch names the zip's top folder after the file, without its last suffix."""
    name = path.name
    return name[: name.rfind(".")] if "." in name else name


def _serialization_id() -> str:
    return "".join(f"{int.from_bytes(os.urandom(8), 'little'):020d}" for _ in range(2))


def _write_zip(path: Path, pickle_bytes: bytes,
               storages: Iterable[tuple[str, int, Iterable[bytes | memoryview]]]) -> None:
    with open(path, "wb") as f:
        z = _TorchZipWriter(f, _archive_name(path))
        z.record("data.pkl", len(pickle_bytes), [pickle_bytes])
        z.record(".format_version", 1, [b"1"])
        z.record(".storage_alignment", 2, [b"64"])
        z.record("byteorder", 6, [b"little"])
        for key, size, chunks in storages:
            z.record(f"data/{key}", size, chunks)
        z.record("version", 2, [b"3\n"])
        z.record(".data/serialization_id", 40, [_serialization_id().encode()])
        z.finish()


# ---------------------------------------------------------------------------------------------
# The pickle: markers for torch's globals, emitted with the pure-Python pickler
# ---------------------------------------------------------------------------------------------

class _Global:
    """A name torch.load resolves (pickled as GLOBAL 'module name'); never imported here."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # save_reduce requires a callable
        raise TypeError(f"{self.module}.{self.name} is a marker, not a function")


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_CLASS = {"f16": _Global("torch", "HalfStorage"), "bf16": _Global("torch", "BFloat16Storage"),
                  "f32": _Global("torch", "FloatStorage")}
_CPU = "cpu"  # one object, so later tensors refer to it with BINGET as torch's files do


@dataclass(eq=False)
class _Storage:
    key: str  # one str object per storage: tensors sharing it BINGET the same key
    dtype: str
    numel: int
    source: np.ndarray  # flat, C-ordered values to convert and write


@dataclass(eq=False)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        # what torch.Tensor.__reduce_ex__ returns for a plain CPU tensor
        return (_REBUILD_TENSOR_V2, (self.storage, self.offset, self.shape, self.stride, False,
                                     collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # pure-Python: its dispatch table takes our marker type
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_marker(self, obj: _Global) -> None:
        # write/memoize: the pure-Python pickler's internals, which typeshed does not describe
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[_Global] = _save_marker  # type: ignore[assignment]

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", _STORAGE_CLASS[obj.dtype], obj.key, _CPU, obj.numel)
        return None


def _pickle(state: dict[str, _Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(state)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Tensors -> storages (views of one array share its storage, as in torch)
# ---------------------------------------------------------------------------------------------

def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _as_view(a: np.ndarray, base: np.ndarray) -> tuple[int, tuple[int, ...]] | None:
    """(element offset, element strides) of `a` inside C-contiguous `base`, if expressible."""
    size = base.itemsize
    byte_offset = a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if a.dtype != base.dtype or byte_offset % size or any(s % size or s < 0 for s in a.strides):
        return None
    return byte_offset // size, tuple(s // size for s in a.strides)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, n = [], 1
    for d in reversed(shape):
        stride.append(n)
        n *= d
    return tuple(reversed(stride))


def _layout(tensors: Mapping[str, Any], dtype: str) -> dict[str, _Tensor]:
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    by_owner: dict[int, list[str]] = {}
    for name, a in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        by_owner.setdefault(id(_owner(a)), []).append(name)
    n_storages = 0
    shared: dict[int, _Storage] = {}  # id(owner) -> the storage its views share
    state: dict[str, _Tensor] = {}
    for name, a in arrays.items():
        owner = _owner(a)
        group = by_owner[id(owner)]
        if (len(group) > 1 and owner.flags.c_contiguous
                and all(_as_view(arrays[n], owner) is not None for n in group)):
            st = shared.get(id(owner))
            if st is None:
                st = shared[id(owner)] = _Storage(str(n_storages), dtype, owner.size, owner.reshape(-1))
                n_storages += 1
            offset, stride = _as_view(a, owner)  # type: ignore[misc]
            state[name] = _Tensor(st, offset, a.shape, stride)
        else:
            st = _Storage(str(n_storages), dtype, a.size, np.ascontiguousarray(a).reshape(-1))
            n_storages += 1
            state[name] = _Tensor(st, 0, a.shape, _contiguous_stride(a.shape))
    return state


def _chunks(st: _Storage) -> Iterator[memoryview]:
    for i in range(0, st.numel, _CHUNK):
        yield memoryview(_convert(st.source[i:i + _CHUNK], st.dtype).data).cast("B")


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------

def save_state_dict(path: str | Path, tensors: Mapping[str, Any], dtype: str = "f16") -> None:
    """Write `tensors` as torch 2.x `torch.save(state_dict, path)` would, without torch.

    Args:
        path: output file; the zip's folder is named after it (consolidated.00.pth -> consolidated.00).
        tensors: name -> numpy array (any real dtype), in the order to store them. Arrays that are
            views of one C-contiguous array share one storage, with offsets and strides, as torch
            saves views of one tensor; every other array gets a contiguous storage of its own.
        dtype: "f16", "bf16" (round to nearest even) or "f32": what the file stores.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    state = _layout(tensors, dtype)
    storages = list({id(t.storage): t.storage for t in state.values()}.values())
    itemsize = np.dtype(_NP_DTYPE[dtype]).itemsize
    _write_zip(Path(path), _pickle(state),
               ((st.key, st.numel * itemsize, _chunks(st)) for st in storages))


def write_raw_checkpoint(path: str | Path, pickle_bytes: bytes,
                         storages: Mapping[str, bytes] | None = None) -> None:
    """Write a torch-format zip around a hand-made pickle (for tests of hostile or odd files).

    Args:
        path: output file.
        pickle_bytes: the exact bytes of data.pkl.
        storages: storage key -> raw bytes, written as data/<key>.
    """
    items = (storages or {}).items()
    _write_zip(Path(path), pickle_bytes, ((k, len(b), [b]) for k, b in items))
