"""Reading Meta's `consolidated.NN.pth` files without torch, and without trusting them.

A torch>=1.6 `torch.save` file is an uncompressed zip:

    consolidated.00/data.pkl        pickle of {name: tensor}; each tensor refers to a storage by key
    consolidated.00/data/0 .. N     raw little-endian storage bytes, one record per storage
    consolidated.00/byteorder, version, .format_version, .storage_alignment, .data/serialization_id

The pickle is untrusted input: it is read by a restricted unpickler that resolves only the handful
of names a weight file needs, each to a harmless stand-in defined here (nothing named in the file is
ever imported or called), and refuses the opcodes that build or mutate arbitrary objects. Storages
are never read into memory whole: a tensor is read a block of rows at a time, by byte range, around
the page cache (direct_io), into a buffer the caller reuses (`read_rows`, the converter's path) or
widened to a float32 copy (`rows`).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llamalocal.convert.direct_io import BlockReader, aligned_empty
from llamalocal.convert.errors import CheckpointError, UnsafePickleError

BF16 = "bf16"  # numpy has no bfloat16: bf16 tensors are tagged and read as uint16

# A 70B shard's data.pkl is a few hundred KB; anything this big is not a state dict.
MAX_PICKLE_BYTES = 256 * 2**20

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the number torch<1.6 pickles first
LEGACY_HINT = ("saved by an old torch (legacy format): re-save it with torch>=1.6 "
               "`torch.save(torch.load(f), f)`")


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _DType:
    """A tensor element type as torch names it; `np_dtype` None means llamalocal cannot read it."""

    torch_name: str  # "float16", "int32", ...
    np_dtype: str | None  # little-endian numpy dtype of the raw bytes ("<u2" for bf16)
    itemsize: int

    @property
    def supported(self) -> bool:
        return self.np_dtype is not None


_F16 = _DType("float16", "<f2", 2)
_BF16 = _DType("bfloat16", "<u2", 2)
_F32 = _DType("float32", "<f4", 4)
_F64 = _DType("float64", "<f8", 8)

_UNSUPPORTED = {name: _DType(name, None, size) for name, size in (
    ("uint8", 1), ("int8", 1), ("int16", 2), ("int32", 4), ("int64", 8), ("bool", 1),
    ("uint16", 2), ("uint32", 4), ("uint64", 8), ("float8_e4m3fn", 1), ("float8_e5m2", 1),
    ("float8_e4m3fnuz", 1), ("float8_e5m2fnuz", 1), ("complex32", 4), ("complex64", 8),
    ("complex128", 16), ("qint8", 1), ("quint8", 1), ("qint32", 4), ("quint4x2", 1),
)}

# torch.<Name>Storage: the typed storage classes torch 2.x still writes into persistent ids
_STORAGE_TYPES = {
    "HalfStorage": _F16,
    "BFloat16Storage": _BF16,
    "FloatStorage": _F32,
    "DoubleStorage": _F64,
    "ByteStorage": _UNSUPPORTED["uint8"],
    "CharStorage": _UNSUPPORTED["int8"],
    "ShortStorage": _UNSUPPORTED["int16"],
    "IntStorage": _UNSUPPORTED["int32"],
    "LongStorage": _UNSUPPORTED["int64"],
    "BoolStorage": _UNSUPPORTED["bool"],
    "ComplexFloatStorage": _UNSUPPORTED["complex64"],
    "ComplexDoubleStorage": _UNSUPPORTED["complex128"],
    "QInt8Storage": _UNSUPPORTED["qint8"],
    "QUInt8Storage": _UNSUPPORTED["quint8"],
    "QInt32Storage": _UNSUPPORTED["qint32"],
}

# torch.<dtype> objects: written (as GLOBAL torch <name>) by _rebuild_tensor_v3, which torch uses
# for dtypes without a typed storage class (uint16, float8, ...), with an UntypedStorage
_TORCH_DTYPES = {"float16": _F16, "half": _F16, "bfloat16": _BF16, "float32": _F32, "float": _F32,
                 "float64": _F64, "double": _F64, **_UNSUPPORTED}


# ---------------------------------------------------------------------------------------------
# Stand-ins the restricted unpickler hands out instead of torch objects
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _StorageType:
    """Stand-in for torch.HalfStorage & co (dtype set) or torch.UntypedStorage (dtype None)."""

    qualname: str
    dtype: _DType | None


@dataclass(frozen=True)
class _DTypeRef:
    """Stand-in for a torch.dtype object such as torch.float16."""

    qualname: str
    dtype: _DType


_UNTYPED = _StorageType("torch.UntypedStorage", None)


@dataclass(frozen=True)
class _StorageRef:
    """What persistent_load returns for ('storage', type, key, location, numel)."""

    key: str
    stype: _StorageType
    numel: int  # elements of stype.dtype; bytes for an untyped storage


@dataclass(frozen=True)
class _TensorRecord:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: _DType


class _StateDict(dict):
    """Stand-in for collections.OrderedDict. `model.state_dict()` pickles its `_metadata` (module
    versions) with BUILD; it is accepted here and dropped, weights do not need it."""

    def __setstate__(self, state: Any) -> None:
        pass


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(v) is int and v >= 0 for v in x):
        raise CheckpointError(f"tensor {what} {x!r} is not a tuple of non-negative ints")
    return x


def _record(storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType | None) -> _TensorRecord:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"tensor built from {type(storage).__name__}, not from a storage")
    if type(offset) is not int or offset < 0:
        raise CheckpointError(f"tensor storage offset {offset!r} is not a non-negative int")
    shape, strides = _int_tuple(size, "shape"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointError(f"tensor shape {shape} and stride {strides} differ in length")
    if dtype is None:
        if storage.stype.dtype is None:
            raise CheckpointError("tensor on an untyped storage without a dtype")
        dtype = storage.stype.dtype
    return _TensorRecord(storage, offset, shape, strides, dtype)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRecord:
    """torch._utils._rebuild_tensor (torch 1.x) and _rebuild_tensor_v2 (torch 2.x):
    (storage, offset, size, stride[, requires_grad, backward_hooks[, metadata]])."""
    return _record(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None, dtype: Any = None,
                       *_: Any) -> _TensorRecord:
    """torch._utils._rebuild_tensor_v3: an UntypedStorage plus an explicit torch.dtype."""
    if not isinstance(dtype, _DTypeRef):
        raise CheckpointError(f"_rebuild_tensor_v3 given dtype {dtype!r}, not a torch dtype")
    return _record(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, *_: Any) -> _TensorRecord:
    """torch._utils._rebuild_parameter(data, requires_grad, backward_hooks[, state]): the tensor."""
    if not isinstance(data, _TensorRecord):
        raise CheckpointError(f"parameter built from {type(data).__name__}, not from a tensor")
    return data


_META_TENSOR = "torch._utils._rebuild_meta_tensor_no_storage"

# module.name -> stand-in. Exact names only: no dotted lookups, no modules, nothing imported.
_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": _StateDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.UntypedStorage": _UNTYPED,
    "torch.storage.UntypedStorage": _UNTYPED,
    **{f"torch.{n}": _StorageType(f"torch.{n}", d) for n, d in _STORAGE_TYPES.items()},
    **{f"torch.{n}": _DTypeRef(f"torch.{n}", d) for n, d in _TORCH_DTYPES.items()},
}
# the only things REDUCE may call
_CALLABLE = (_StateDict, _rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


# ---------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------

def _refuse(opname: str):
    def load(self: _RestrictedUnpickler) -> None:
        raise UnsafePickleError(f"{self.source}: its pickle uses the {opname} opcode, which builds "
                                "arbitrary objects and is never in a weight file; refusing to load it")
    return load


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: its opcode table can be edited
    """Unpickles a torch state dict into stand-ins. find_class knows a fixed table of names;
    opcodes that create objects of a class taken from the stack (INST, OBJ, NEWOBJ, NEWOBJ_EX),
    that reach the copyreg extension registry (EXT1/2/4) or that mutate objects (BUILD, except
    on a state dict) are refused; REDUCE may call only the stand-ins above."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        found = _ALLOWED.get(qualname)
        if found is not None:
            return found
        if qualname == _META_TENSOR:
            raise UnsafePickleError(
                f"{self.source}: holds a tensor saved without its data ({qualname}: a meta-device "
                "tensor); re-save the checkpoint from a model whose weights are loaded")
        raise UnsafePickleError(f"{self.source}: its pickle asks for {qualname}, which a weight file never "
                                "needs; refusing to load it (the file may be malicious)")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unknown persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{self.source}: storage of type {stype!r:.80} is not a torch storage class")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{self.source}: malformed storage reference {pid!r:.120}")
        ref = _StorageRef(key, stype, numel)
        seen = self.storages.setdefault(key, ref)
        if seen != ref:
            raise CheckpointError(f"{self.source}: storage {key} is described two ways ({seen} vs {ref})")
        return seen

    def load_reduce(self) -> None:
        func = self.stack[-2]
        if not any(func is c for c in _CALLABLE):
            raise UnsafePickleError(f"{self.source}: its pickle calls {func!r:.80}, which is not a tensor "
                                    "constructor; refusing to load it")
        super().load_reduce()

    def load_build(self) -> None:
        if type(self.stack[-2]) is not _StateDict:
            raise UnsafePickleError(f"{self.source}: its pickle sets the state of a "
                                    f"{type(self.stack[-2]).__name__} (BUILD); refusing to load it")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _op in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _op)[0]] = _refuse(_op)
    del _op


def _unpickle(data: bytes, source: str) -> tuple[Any, dict[str, _StorageRef]]:
    u = _RestrictedUnpickler(data, source)
    try:
        obj = u.load()
    except CheckpointError:
        raise
    except RecursionError as e:
        raise CheckpointError(f"{source}: data.pkl is nested too deeply to be a state dict") from e
    except Exception as e:  # any malformed pickle: EOFError, UnpicklingError, TypeError, struct.error...
        raise CheckpointError(f"{source}: data.pkl is corrupt ({type(e).__name__}: {e}); "
                              "re-download the file and check it against checklist.chk") from e
    return obj, u.storages


# ---------------------------------------------------------------------------------------------
# Public: TensorInfo, Checkpoint, open_checkpoint
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as laid out in the file."""

    name: str
    dtype: np.dtype | str  # np.float16 / np.float32 / np.float64, or BF16 ("bf16")
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements; always C-contiguous here
    storage_key: str
    storage_offset: int  # in elements, from the start of the storage
    offset: int  # byte offset of the first element in the file

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return 2 if _is_bf16(self.dtype) else np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def dtype_name(self) -> str:
        """"f16", "bf16", "f32" or "f64" (torch_save's names)."""
        return BF16 if _is_bf16(self.dtype) else {2: "f16", 4: "f32", 8: "f64"}[np.dtype(self.dtype).itemsize]


def _is_bf16(dtype: np.dtype | str) -> bool:
    return isinstance(dtype, str) and dtype == BF16


def _stored(dtype: np.dtype | str) -> np.dtype:
    """The numpy dtype of the stored bytes: bf16 as uint16."""
    return np.dtype(_BF16.np_dtype if _is_bf16(dtype) else dtype)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1 and s != expected:  # torch ignores the stride of size-1 dims
            return False
        expected *= n
    return True


class Checkpoint:
    """An open `torch.save` file: `tensors` in file order, their data read by byte range.

    Use as a context manager. `read_rows()` streams a block of stored values into a caller's
    buffer (the converter's path); `rows()` returns a block as float32. Both read around the page
    cache (direct_io), so reading a shard once neither fills the cache nor stays resident.
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.tensors = tensors
        self._reader: BlockReader | None = BlockReader(path)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what reading every tensor once touches)."""
        return sum(t.nbytes for t in self.tensors.values())

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def _span(self, t: TensorInfo, start: int, stop: int | None) -> tuple[int, int, int]:
        """(byte offset, element count, rows) of rows [start, stop) along dim 0."""
        if not t.shape:
            return t.offset, 1, 0
        stop = t.shape[0] if stop is None else stop
        if not 0 <= start <= stop <= t.shape[0]:
            raise ValueError(f"{t.name}: rows [{start}, {stop}) outside its {t.shape[0]} rows")
        row = t.numel // t.shape[0] if t.shape[0] else 0
        return t.offset + start * row * t.itemsize, (stop - start) * row, stop - start

    def read_size(self, name: str, start: int = 0, stop: int | None = None) -> int:
        """Bytes of buffer `read_rows` needs for rows [start, stop)."""
        t = self._info(name)
        _, count, _ = self._span(t, start, stop)
        return BlockReader.buffer_size(count * t.itemsize)

    def read_rows(self, name: str, start: int, stop: int | None, buf: np.ndarray) -> np.ndarray:
        """Rows [start, stop) in their stored dtype (bf16 as uint16), read into `buf` (from
        `direct_io.aligned_empty`, at least `read_size` bytes): a view of `buf`."""
        t = self._info(name)
        offset, count, n = self._span(t, start, stop)
        reader = self._reader
        if reader is None:
            raise ValueError(f"{self.path}: checkpoint is closed")
        try:
            data = reader.read(offset, count * t.itemsize, buf)
        except EOFError as e:
            raise CheckpointError(f"{self.path} is truncated ({e}); download it again") from None
        return data.view(_stored(t.dtype)).reshape((n,) + t.shape[1:] if t.shape else ())

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 copy of rows [start, stop) along dim 0 (a 2-D tensor's rows, a 1-D tensor's
        elements; the defaults give the whole tensor)."""
        from llamalocal.convert.quantize import to_f32

        stored = self.read_rows(name, start, stop, aligned_empty(self.read_size(name, start, stop)))
        out = np.empty(stored.shape, dtype=np.float32)
        to_f32(stored.reshape(-1), out.reshape(-1), bf16=_is_bf16(self.tensors[name].dtype))
        return out

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors, {self.nbytes} bytes)"


def _not_a_zip(path: Path, head: bytes) -> CheckpointError:
    if not head:
        return CheckpointError(f"{path} is empty; download it again")
    if head.startswith(b"PK\x03\x04"):
        return CheckpointError(f"{path} is truncated or corrupt (a zip whose directory at the end is missing "
                               "or damaged); "
                               "download it again and check it against checklist.chk")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        if head[2:3] == b"\x8a" and int.from_bytes(head[4:4 + head[3]], "little") == LEGACY_MAGIC:
            return CheckpointError(f"{path}: {LEGACY_HINT}")
        return CheckpointError(f"{path}: a bare pickle, not torch's zip format; probably {LEGACY_HINT}")
    if head[257:262] == b"ustar":
        return CheckpointError(f"{path}: a tar archive, torch's oldest format; {LEGACY_HINT}")
    return CheckpointError(f"{path} is not a torch checkpoint (neither a zip nor a pickle); "
                           "expected Meta's consolidated.NN.pth")


def _data_offset(path: Path, file_size: int, info: zipfile.ZipInfo, fd: int) -> int:
    """Where a stored record's bytes start: after its local header, whose extra field (torch pads
    it to align data to 64 bytes) differs from the central directory's."""
    h = info.header_offset
    # a 30-byte pread per storage: the index is read without touching the tensor data
    header = os.pread(fd, 30, h) if h + 30 <= file_size else b""
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path} is truncated or corrupt: no local header for {info.filename}; "
                              "download it again and check it against checklist.chk")
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return h + 30 + name_len + extra_len


def _find_pickle(path: Path, names: list[str]) -> str:
    found = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(found) != 1:
        what = "no" if not found else "several"
        raise CheckpointError(f"{path}: a zip with {what} */data.pkl record, not a torch.save checkpoint")
    return found[0]


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a torch.save (zip format) checkpoint for reading without torch.

    Args:
        path: a `consolidated.NN.pth` file.
    Returns:
        A Checkpoint (context manager) with `tensors` in file order.
    Raises:
        CheckpointError: missing, legacy-format, truncated or corrupt file, a tensor llamalocal cannot
            read (unsupported dtype, non-contiguous, meta tensor).
        UnsafePickleError: the pickle asks for anything beyond tensors and storages.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _open(path, f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"{path} is not readable (permission denied)") from None


def _open(path: Path, f: BinaryIO) -> Checkpoint:
    head = f.read(512)
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise _not_a_zip(path, head) from e
    with zf:
        tensors = _read_index(path, zf, os.fstat(f.fileno()).st_size, f.fileno())
    return Checkpoint(path, tensors)


def _read_index(path: Path, zf: zipfile.ZipFile, file_size: int, fd: int) -> dict[str, TensorInfo]:
    infos = {i.filename: i for i in zf.infolist()}
    pkl_name = _find_pickle(path, list(infos))
    prefix = pkl_name[: -len("data.pkl")]
    byteorder = infos.get(prefix + "byteorder")
    if byteorder is not None and _read_small(path, zf, byteorder) not in (b"little", b"little\n"):
        raise CheckpointError(f"{path} was saved on a big-endian machine; re-save it on x86 or ARM")
    pkl_info = infos[pkl_name]
    if pkl_info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: data.pkl is {pkl_info.file_size} bytes, far too big for a state dict")
    obj, storages = _unpickle(_read_small(path, zf, pkl_info), str(path))

    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")

    # where each storage's bytes lie in the file
    located: dict[str, tuple[int, int]] = {}  # key -> (byte offset, byte size)
    for key, ref in storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"{path}: storage record data/{key} is missing; the file is corrupt, "
                                  "download it again")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: storage data/{key} is compressed, which torch.save never does; "
                                  "re-save it with torch.save")
        start = _data_offset(path, file_size, info, fd)
        if start + info.file_size > file_size:
            raise CheckpointError(f"{path} is truncated: storage data/{key} ends at byte "
                                  f"{start + info.file_size} of a {file_size}-byte file; download it again")
        itemsize = ref.stype.dtype.itemsize if ref.stype.dtype is not None else 1
        if ref.numel * itemsize != info.file_size:
            raise CheckpointError(f"{path}: storage data/{key} has {info.file_size} bytes but the pickle "
                                  f"says {ref.numel} x {itemsize}; the file is corrupt")
        located[key] = (start, info.file_size)

    tensors: dict[str, TensorInfo] = {}
    for name, rec in obj.items():
        if not isinstance(rec, _TensorRecord):
            continue  # non-tensor entries (a version number, say) carry no weights
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: tensor name {name!r:.80} is not a string")
        tensors[name] = _tensor_info(path, name, rec, located[rec.storage.key])
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; is it a Meta consolidated.NN.pth?")
    return tensors


def _read_small(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({info.filename}: {e}); "
                              "download it again and check it against checklist.chk") from e


def _tensor_info(path: Path, name: str, rec: _TensorRecord, where: tuple[int, int]) -> TensorInfo:
    dt = rec.dtype
    if not dt.supported:
        via = f" (stored as {rec.storage.stype.qualname})" if rec.storage.stype.dtype is not None else ""
        raise CheckpointError(f"{path}: tensor {name} has dtype torch.{dt.torch_name}{via}, which is not a "
                              "weight format llamalocal reads (float16, bfloat16, float32, float64)")
    if not _contiguous(rec.shape, rec.stride):
        raise CheckpointError(f"{path}: tensor {name} is not contiguous (shape {rec.shape}, stride "
                              f"{rec.stride}); re-save it with `.contiguous()` applied to every tensor")
    start, size = where
    numel = int(np.prod(rec.shape, dtype=np.int64))
    end = (rec.offset + numel) * dt.itemsize if numel else 0
    if end > size:
        raise CheckpointError(f"{path}: tensor {name} (offset {rec.offset}, shape {rec.shape}) runs past "
                              f"the end of its storage ({size} bytes); the file is corrupt")
    np_dtype: np.dtype | str = BF16 if dt is _BF16 else np.dtype(dt.np_dtype)
    return TensorInfo(name, np_dtype, rec.shape, rec.stride, rec.storage.key, rec.offset,
                      start + rec.offset * dt.itemsize)
