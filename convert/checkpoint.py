"""Reading Meta's `consolidated.NN.pth` files without torch, and without trusting them.

A torch>=1.6 `torch.save` file is an uncompressed zip:

    consolidated.00/data.pkl        pickle of {name: tensor}; each tensor refers to a storage by key
    consolidated.00/data/0 .. N     raw little-endian storage bytes, one record per storage
    consolidated.00/byteorder, version, .format_version, .storage_alignment, .data/serialization_id

The pickle is untrusted input. Before anything is built, its opcodes are walked once without
executing them (`_scan`) and held to budgets a state dict never approaches: size, opcode count,
nesting depth, memo entries, and only the opcodes a state dict is made of. Then a restricted
unpickler resolves only the handful of names a weight file needs, each to a harmless stand-in
defined here (nothing named in the file is ever imported or called), lets REDUCE call only those
stand-ins and BUILD touch only a state dict, and accepts only str and int dict keys, checked before
they are hashed (a deep or shared tuple as a key would make hashing crash or run for ever).
Nothing from the file is ever repr()'d whole into a message (`_brief`), for the same reason. The
zip around it is read with bounded reads (the central directory, data.pkl) and only stored
(uncompressed, unencrypted) records are accepted, as torch writes them. Sizes are Python ints, and
every tensor's bytes must lie inside its storage record, inside the file. Storages
are never read into memory whole: a tensor is read a block of rows at a time, by byte range, around
the page cache (direct_io), into a buffer the caller reuses (`read_rows`, the converter's path) or
widened to a float32 copy (`rows`).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from llamalocal.convert.direct_io import BlockReader, aligned_empty
from llamalocal.convert.errors import CheckpointError, UnsafePickleError
from llamalocal.convert.inputs import open_input

BF16 = "bf16"  # numpy has no bfloat16: bf16 tensors are tagged and read as uint16

# ---------------------------------------------------------------------------------------------
# Budgets. What a real state dict needs, measured on Llama-3.1-405B's layout (126 layers, 1,137
# tensors per shard, as torch 2.x writes it: a plain dict, model.state_dict() with its _metadata or
# nn.Parameters, protocols 2-5): 130-200 KB of pickle, 36-47k opcodes, 9-12.5k memo entries,
# nesting depth 5-7, a zip directory of 1,143 records (70-115 KB). Each budget leaves a margin of
# 10x or more (tests/test_hostile_memory.py re-measures). A pickle over any of them is refused
# before a single object is built; one within them builds at most ~40 MB of objects.
# ---------------------------------------------------------------------------------------------
MAX_PICKLE_BYTES = 8 * 2**20
MAX_OPCODES = 500_000
MAX_MEMO = 150_000  # memo entries (BINPUT, LONG_BINPUT, MEMOIZE)
MAX_DEPTH = 100  # containers inside containers, and MARKs open at once
MAX_DIRECTORY_BYTES = 4 * 2**20  # the zip's central directory, which zipfile reads whole
MAX_SMALL_RECORD = 4096  # byteorder, version: a few bytes each
MAX_NAME_CHARS = 512  # a tensor name or a storage key ("layers.125.feed_forward.w3.weight": 33)
MAX_NDIM = 8
MAX_DIM = 2**32  # a tensor dimension; LLaMA's largest is 128256 (Llama-3's vocabulary)
MAX_OFFSET = 2**62  # element offsets and strides: beyond any file

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


class _BadRecord(Exception):
    """A tensor record whose arguments are not what torch writes (`_unpickle` names the file)."""


def _brief(x: Any, limit: int = 60) -> str:
    """A value from the file, described for a message in at most about `limit` characters. Never a
    full repr: a hostile pickle's nested or shared containers make repr deep or exponential, and
    ints of thousands of digits cannot even be printed."""
    t = type(x)
    if t is str:
        return repr(x) if len(x) <= limit else repr(x[:limit])[:-1] + f"...' ({len(x)} characters)"
    if t is int:
        return str(x) if x.bit_length() <= 64 else f"an int of {x.bit_length()} bits"
    if x is None or t in (bool, float):
        return repr(x)
    if t in (tuple, list, dict, _StateDict):
        return f"a {'dict' if t is _StateDict else t.__name__} of {len(x)} items"
    if t in (_StorageType, _DTypeRef):
        return x.qualname
    return f"a {getattr(t, '__name__', 'value')}"


def _int_tuple(x: Any, what: str, bound: int) -> tuple[int, ...]:
    if type(x) is not tuple or len(x) > MAX_NDIM:
        raise _BadRecord(f"tensor {what} is {_brief(x)}, not a tuple of at most {MAX_NDIM} ints")
    for v in x:
        if type(v) is not int or not 0 <= v < bound:
            raise _BadRecord(f"tensor {what} holds {_brief(v)}, not an int from 0 to {bound - 1}")
    return x


def _record(storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType | None) -> _TensorRecord:
    if not isinstance(storage, _StorageRef):
        raise _BadRecord(f"tensor built from {_brief(storage)}, not from a storage")
    if type(offset) is not int or not 0 <= offset < MAX_OFFSET:
        raise _BadRecord(f"tensor storage offset is {_brief(offset)}, not an int from 0 to {MAX_OFFSET - 1}")
    shape, strides = _int_tuple(size, "shape", MAX_DIM), _int_tuple(stride, "stride", MAX_OFFSET)
    if len(shape) != len(strides):
        raise _BadRecord(f"tensor shape {shape} and stride {strides} differ in length")
    if dtype is None:
        if storage.stype.dtype is None:
            raise _BadRecord("tensor on an untyped storage without a dtype")
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
        raise _BadRecord(f"_rebuild_tensor_v3 given dtype {_brief(dtype)}, not a torch dtype")
    return _record(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, *_: Any) -> _TensorRecord:
    """torch._utils._rebuild_parameter(data, requires_grad, backward_hooks[, state]): the tensor."""
    if not isinstance(data, _TensorRecord):
        raise _BadRecord(f"parameter built from {_brief(data)}, not from a tensor")
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
# the only things REDUCE may call, with the names torch knows them by (for messages)
_CALLABLE = (_StateDict, _rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)
_CALLABLE_NAMES = {_StateDict: "collections.OrderedDict", _rebuild_tensor: "torch._utils._rebuild_tensor_v2",
                   _rebuild_tensor_v3: "torch._utils._rebuild_tensor_v3",
                   _rebuild_parameter: "torch._utils._rebuild_parameter"}


# ---------------------------------------------------------------------------------------------
# The scan: every opcode walked once, nothing built, budgets enforced
# ---------------------------------------------------------------------------------------------

# What torch.save writes for a state dict of tensors, in any protocol from 1 to 5: nothing else is
# accepted (no sets, bytes, extension codes or class instantiation).
_SCALARS = frozenset({"NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
                      "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "GLOBAL"})
_EMPTY = frozenset({"EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT"})
_FROM_MARK = frozenset({"TUPLE", "LIST", "DICT"})
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_INTO_TOP = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # pop n, add them to the container below
_INTO_TOP_FROM_MARK = frozenset({"APPENDS", "SETITEMS"})
_PUTS = frozenset({"BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GETS = frozenset({"BINGET", "LONG_BINGET"})
_OTHERS = frozenset({"PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "REDUCE", "BINPERSID",
                     "STACK_GLOBAL"})
_OPCODES = _SCALARS | _EMPTY | _FROM_MARK | set(_TUPLE_N) | set(_INTO_TOP) | _INTO_TOP_FROM_MARK | _PUTS | _GETS | _OTHERS


class _Malformed(Exception):
    """The opcodes do not make a pickle (stack underflow, a memo entry never stored)."""


@dataclass(frozen=True)
class PickleCost:
    """What a pickle asked of `_scan`'s budgets."""

    opcodes: int
    memo: int
    depth: int


def _scan(data: bytes, source: str) -> PickleCost:
    """Walk data.pkl's opcodes without building anything and refuse it if it uses an opcode a state
    dict never needs or goes over a budget (MAX_OPCODES, MAX_MEMO, MAX_DEPTH).

    Nesting depth is followed on a stack of depths that mirrors the unpickler's stack of objects.
    It is exact for what is built bottom-up (tuples always, torch's own pickles entirely); growth
    through a shared reference (a list filled after it was stored elsewhere) is not followed, which
    is safe because nothing built from the file is ever hashed (except str and int keys), compared
    or repr'd: depth is a budget here, not the only defence.
    """
    stack: list[int] = []  # the depth of each object on the unpickler's stack
    marks: list[int] = []  # where each open MARK is in `stack`
    memo: dict[int, int] = {}
    deepest = 0

    def floor() -> int:
        return marks[-1] if marks else 0

    def pop(n: int) -> list[int]:
        if len(stack) - n < floor():
            raise _Malformed("stack underflow")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    def pop_mark() -> list[int]:
        if not marks:
            raise _Malformed("no MARK to pop to")
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def push(depth: int) -> None:
        nonlocal deepest
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{source}: data.pkl nests containers more than {MAX_DEPTH} deep; a state dict "
                                  "needs fewer than 10. Refusing it (the file may be malicious)")
        stack.append(depth)

    def into_top(items: list[int]) -> None:
        if len(stack) <= floor():
            raise _Malformed("nothing to add to")
        stack[-1] = max(stack[-1], 1 + max(items, default=0))
        push(stack.pop())

    n_ops = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            n_ops += 1
            if n_ops > MAX_OPCODES:
                raise CheckpointError(f"{source}: data.pkl has more than {MAX_OPCODES:,} opcodes; a state dict, "
                                      "even Llama-3.1-405B's, has fewer than 50,000. Refusing it")
            name = op.name
            if name not in _OPCODES:
                raise UnsafePickleError(f"{source}: its pickle uses the {name} opcode, which a state dict of "
                                        "tensors never needs; refusing to load it (the file may be malicious)")
            if name in _SCALARS:
                push(0)
            elif name in _EMPTY:
                push(1)
            elif name in _FROM_MARK:
                push(1 + max(pop_mark(), default=0))
            elif name in _TUPLE_N:
                push(1 + max(pop(_TUPLE_N[name]), default=0))
            elif name in _INTO_TOP:
                into_top(pop(_INTO_TOP[name]))
            elif name in _INTO_TOP_FROM_MARK:
                into_top(pop_mark())
            elif name in _PUTS:
                if len(stack) <= floor():
                    raise _Malformed("nothing to memoize")
                memo[len(memo) if name == "MEMOIZE" else cast(int, arg)] = stack[-1]
                if len(memo) > MAX_MEMO:
                    raise CheckpointError(f"{source}: data.pkl stores more than {MAX_MEMO:,} memo entries; a "
                                          "state dict needs fewer than 15,000. Refusing it")
            elif name in _GETS:
                if arg not in memo:
                    raise _Malformed(f"memo entry {arg} read before it is stored")
                push(memo[arg])
            elif name == "MARK":
                if len(marks) >= MAX_DEPTH:
                    raise CheckpointError(f"{source}: data.pkl opens more than {MAX_DEPTH} MARKs at once; "
                                          "refusing it")
                marks.append(len(stack))
            elif name == "POP":
                if len(stack) > floor():
                    stack.pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                push(pop(1)[0])
                stack.append(stack[-1])
            elif name in ("REDUCE", "STACK_GLOBAL", "BINPERSID"):
                items = pop(1 if name == "BINPERSID" else 2)
                push(0 if name == "STACK_GLOBAL" else 1 + max(items))
            elif name == "STOP" and len(stack) <= floor():
                raise _Malformed("nothing to return")
            # PROTO and FRAME change nothing on the stack
    except (ValueError, _Malformed) as e:  # genops: an unknown opcode, a truncated argument, a bad int
        raise CheckpointError(f"{source}: data.pkl is corrupt ({str(e)[:200]}); re-download the file and "
                              "check it against checklist.chk") from None
    return PickleCost(n_ops, len(memo), deepest)


# ---------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------

_KEY_TYPES = (str, int)  # what a state dict's keys (and its _metadata's) are


# the pure-Python unpickler: its opcode table can be edited (typeshed knows only the C one: Any here)
_PurePythonUnpickler: Any = pickle._Unpickler


class _RestrictedUnpickler(_PurePythonUnpickler):
    """Unpickles a torch state dict into stand-ins, after `_scan` passed it. find_class knows a
    fixed table of names; REDUCE may call only the stand-ins above, with a tuple of arguments (a
    state dict only empty: its items come by SETITEMS); BUILD may set only a state dict's state;
    items go only into dicts and lists, and dict keys must be str or int (checked before hashing).
    The opcodes `_scan` refuses are refused here too, in case this class is used alone."""

    dispatch: dict[int, Callable[[Any], None]] = dict(_PurePythonUnpickler.dispatch)

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
        shown = qualname if len(qualname) <= 120 else qualname[:120] + "..."
        raise UnsafePickleError(f"{self.source}: its pickle asks for {shown}, which a weight file never "
                                "needs; refusing to load it (the file may be malicious)")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unknown persistent id ({_brief(pid)}); the file is corrupt or "
                                  "not a torch checkpoint")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{self.source}: storage of type {_brief(stype)} is not a torch storage class")
        if type(key) is not str or len(key) > MAX_NAME_CHARS or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{self.source}: malformed storage reference (key {_brief(key)}, numel "
                                  f"{_brief(numel)}); the file is corrupt or not a torch checkpoint")
        ref = _StorageRef(key, stype, numel)
        seen = self.storages.setdefault(key, ref)
        if seen != ref:
            raise CheckpointError(f"{self.source}: storage {_brief(key)} is described two ways "
                                  f"({seen.stype.qualname} x {_brief(seen.numel)} vs {stype.qualname} x {_brief(numel)})")
        return seen

    def _refuse_opcode(self, name: str) -> None:
        raise UnsafePickleError(f"{self.source}: its pickle uses the {name} opcode, which a state dict of "
                                "tensors never needs; refusing to load it (the file may be malicious)")

    def _check_keys(self, keys: Any) -> None:
        for k in keys:
            if type(k) not in _KEY_TYPES:  # before the dict hashes it
                raise UnsafePickleError(f"{self.source}: its pickle uses {_brief(k)} as a dict key; a state "
                                        "dict's keys are strings. Refusing to load it (the file may be malicious)")

    def _check_target(self, target: Any, kinds: tuple[type, ...], what: str) -> None:
        if type(target) not in kinds:
            raise UnsafePickleError(f"{self.source}: its pickle adds {what} to {_brief(target)}; refusing to load it")

    def load_reduce(self) -> None:
        func, args = self.stack[-2], self.stack[-1]
        if not any(func is c for c in _CALLABLE):
            raise UnsafePickleError(f"{self.source}: its pickle calls {_brief(func)}, which is not a tensor "
                                    "constructor; refusing to load it")
        if type(args) is not tuple or (func is _StateDict and args):
            # torch pickles a state dict as OrderedDict() and adds its items with SETITEMS; copying one
            # given as an argument could multiply memory (a million items copied 200 times)
            raise UnsafePickleError(f"{self.source}: its pickle calls {_CALLABLE_NAMES[func]} with "
                                    f"{_brief(args)}, not as torch does; refusing to load it")
        super().load_reduce()

    def load_build(self) -> None:
        if type(self.stack[-2]) is not _StateDict:
            raise UnsafePickleError(f"{self.source}: its pickle sets the state of {_brief(self.stack[-2])} "
                                    "(BUILD); refusing to load it")
        super().load_build()

    def load_setitem(self) -> None:
        self._check_target(self.stack[-3], (dict, _StateDict), "an item")
        self._check_keys((self.stack[-2],))
        super().load_setitem()

    def load_setitems(self) -> None:
        items = self.stack  # the items since the MARK; the dict is the last object before it
        self._check_target(self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None,
                           (dict, _StateDict), "items")
        self._check_keys(items[0::2])
        super().load_setitems()

    def load_dict(self) -> None:
        self._check_keys(self.stack[0::2])
        super().load_dict()

    def load_append(self) -> None:
        self._check_target(self.stack[-2], (list,), "an element")
        super().load_append()

    def load_appends(self) -> None:
        self._check_target(self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None,
                           (list,), "elements")
        super().load_appends()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    for _op in pickletools.opcodes:
        if _op.name not in _OPCODES:
            dispatch[ord(_op.code)] = (lambda n: lambda self: self._refuse_opcode(n))(_op.name)
    del _op


def _unpickle(data: bytes, source: str) -> tuple[Any, dict[str, _StorageRef]]:
    _scan(data, source)  # budgets first: nothing is built from a pickle that fails them
    u = _RestrictedUnpickler(data, source)
    try:
        obj = u.load()
    except CheckpointError:
        raise
    except _BadRecord as e:
        raise CheckpointError(f"{source}: {e}; the file is corrupt or not a weight file") from None
    except RecursionError as e:
        raise CheckpointError(f"{source}: data.pkl is nested too deeply to be a state dict") from e
    except Exception as e:  # any malformed pickle: EOFError, UnpicklingError, TypeError, struct.error...
        raise CheckpointError(f"{source}: data.pkl is corrupt ({type(e).__name__}: {str(e)[:200]}); "
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
        return math.prod(self.shape)  # a Python int: no int64 wrap-around

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
        self._reader: BlockReader | None = BlockReader(path, error=CheckpointError)

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
        return self._rows(name, start, stop, buf, lend=False)[0]

    def fetch_rows(self, name: str, start: int, stop: int | None, buf: np.ndarray) -> tuple[np.ndarray, bool]:
        """Rows [start, stop) as `read_rows` gives them, but lent from the page cache without a
        copy where they are all cached (BlockReader.fetch). Returns (the rows, whether they are
        lent: then `give_back(name, start, stop)` once done with them)."""
        return self._rows(name, start, stop, buf, lend=True)

    def give_back(self, name: str, start: int, stop: int | None) -> None:
        t = self._info(name)
        offset, count, _ = self._span(t, start, stop)
        if self._reader is not None:
            self._reader.release(offset, count * t.itemsize)

    def _rows(self, name: str, start: int, stop: int | None, buf: np.ndarray, lend: bool) -> tuple[np.ndarray, bool]:
        t = self._info(name)
        offset, count, n = self._span(t, start, stop)
        reader = self._reader
        if reader is None:
            raise ValueError(f"{self.path}: checkpoint is closed")
        try:
            data, lent = (reader.fetch(offset, count * t.itemsize, buf) if lend
                          else (reader.read(offset, count * t.itemsize, buf), False))
        except EOFError as e:
            raise CheckpointError(f"{self.path} is truncated ({e}); download it again") from None
        return data.view(_stored(t.dtype)).reshape((n,) + t.shape[1:] if t.shape else ()), lent

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
    header = os.pread(fd, 30, h) if h >= 0 and h + 30 <= file_size else b""
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path} is truncated or corrupt: no local header for {_brief(info.filename)}; "
                              "download it again and check it against checklist.chk")
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return h + 30 + name_len + extra_len


def _stored_record(path: Path, file_size: int, info: zipfile.ZipInfo, fd: int) -> tuple[int, int]:
    """(byte offset, size) of a record's bytes in the file, if torch could have written it: stored
    as is (torch never compresses or encrypts; its reader maps the bytes in place) and inside the file."""
    what = _brief(info.filename)
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: record {what} is compressed (zip method {info.compress_type}), which "
                              "torch.save never does; this is not a torch checkpoint, re-download it")
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{path}: record {what} is encrypted, which torch.save never does; "
                              "this is not a torch checkpoint, re-download it")
    if info.compress_size != info.file_size:
        raise CheckpointError(f"{path}: record {what} is stored but its two sizes differ "
                              f"({info.compress_size} and {info.file_size}); the file is corrupt, download it again")
    start = _data_offset(path, file_size, info, fd)
    if start + info.file_size > file_size:
        raise CheckpointError(f"{path} is truncated: record {what} ends at byte {start + info.file_size} "
                              f"of a {file_size}-byte file; download it again")
    return start, info.file_size


def _read_record(path: Path, file_size: int, info: zipfile.ZipInfo, fd: int, limit: int) -> bytes:
    """A small record read whole (data.pkl, byteorder): at most `limit` bytes, CRC-checked."""
    if info.file_size > limit:
        raise CheckpointError(f"{path}: {_brief(info.filename)} is {info.file_size} bytes; a state dict's is far "
                              f"smaller (at most {limit}). Refusing it")
    start, size = _stored_record(path, file_size, info, fd)
    data = os.pread(fd, size, start)
    if len(data) != size:
        raise CheckpointError(f"{path} is truncated ({_brief(info.filename)}); download it again")
    if zlib.crc32(data) != info.CRC:
        raise CheckpointError(f"{path}: {_brief(info.filename)} fails its CRC check; the file is damaged, "
                              "download it again and check it against checklist.chk")
    return data


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
    fd = open_input(path, CheckpointError)  # a regular file: never a FIFO, a device or a directory
    with os.fdopen(fd, "rb") as f:
        return _open(path, f)


class _BoundedReads(io.RawIOBase):
    """The file as zipfile sees it: no single read may ask for more than MAX_DIRECTORY_BYTES, so a
    central directory that claims to be huge is refused instead of read into memory whole."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self._f, self._path = f, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > MAX_DIRECTORY_BYTES:
            left = os.fstat(self._f.fileno()).st_size - self._f.tell()
            n = left if n is None or n < 0 else min(n, left)
            if n > MAX_DIRECTORY_BYTES:
                raise CheckpointError(f"{self._path}: its zip directory claims {n} bytes; a checkpoint's is far "
                                      f"smaller (at most {MAX_DIRECTORY_BYTES}). Refusing it")
        return self._f.read(n)


def _open(path: Path, f: BinaryIO) -> Checkpoint:
    head = f.read(512)
    f.seek(0)
    try:
        zf = zipfile.ZipFile(_BoundedReads(f, path))  # type: ignore[arg-type]
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - only the stdlib's parser of this file's bytes runs here
        raise _not_a_zip(path, head) from e
    with zf:
        tensors = _read_index(path, zf, os.fstat(f.fileno()).st_size, f.fileno())
    return Checkpoint(path, tensors)


def _read_index(path: Path, zf: zipfile.ZipFile, file_size: int, fd: int) -> dict[str, TensorInfo]:
    infos = {i.filename: i for i in zf.infolist()}
    pkl_name = _find_pickle(path, list(infos))
    prefix = pkl_name[: -len("data.pkl")]
    byteorder = infos.get(prefix + "byteorder")
    if (byteorder is not None and _read_record(path, file_size, byteorder, fd, MAX_SMALL_RECORD)
            not in (b"little", b"little\n")):
        raise CheckpointError(f"{path} was saved on a big-endian machine; re-save it on x86 or ARM")
    pkl = _read_record(path, file_size, infos[pkl_name], fd, MAX_PICKLE_BYTES)
    obj, storages = _unpickle(pkl, str(path))
    del pkl

    if type(obj) not in (dict, _StateDict):
        raise CheckpointError(f"{path} holds {_brief(obj)}, not a state dict of tensors")

    # where each storage's bytes lie in the file
    located: dict[str, tuple[int, int]] = {}  # key -> (byte offset, byte size)
    for key, ref in storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"{path}: storage record data/{_brief(key)[1:-1]} is missing; the file is corrupt, "
                                  "download it again")
        start, size = _stored_record(path, file_size, info, fd)
        itemsize = ref.stype.dtype.itemsize if ref.stype.dtype is not None else 1
        if ref.numel * itemsize != size:
            raise CheckpointError(f"{path}: storage data/{_brief(key)[1:-1]} has {size} bytes but the pickle "
                                  f"says {_brief(ref.numel)} x {itemsize}; the file is corrupt")
        located[key] = (start, size)

    tensors: dict[str, TensorInfo] = {}
    for name, rec in obj.items():
        if not isinstance(rec, _TensorRecord):
            continue  # non-tensor entries (a version number, say) carry no weights
        if type(name) is not str or len(name) > MAX_NAME_CHARS:
            raise CheckpointError(f"{path}: tensor name {_brief(name)} is not a weight's name (a string of at most "
                                  f"{MAX_NAME_CHARS} characters)")
        tensors[name] = _tensor_info(path, name, rec, located[rec.storage.key])
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; is it a Meta consolidated.NN.pth?")
    return tensors


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
    numel = math.prod(rec.shape)  # Python ints: a shape whose product wraps int64 is still refused
    end = (rec.offset + numel) * dt.itemsize if numel else 0
    if end > size:
        raise CheckpointError(f"{path}: tensor {name} (offset {rec.offset}, shape {list(rec.shape)}) runs past "
                              f"the end of its storage ({size} bytes); the file is corrupt")
    np_dtype: np.dtype | str = BF16 if dt is _BF16 else np.dtype(dt.np_dtype)
    return TensorInfo(name, np_dtype, rec.shape, rec.stride, rec.storage.key, rec.offset,
                      start + rec.offset * dt.itemsize)
