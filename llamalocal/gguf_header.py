"""A GGUF file's header — metadata and tensor infos — read without materialising its vocabulary.

gguf-py's GGUFReader builds a numpy view for every element of every array, so opening a
Llama-3 file (128k tokens, 280k merges) costs seconds and hundreds of MB before a plan can be
made. Everything that needs only the header (planner, `info`, `list`, `plan`, the start of
`chat`) reads it here instead: scalars and short arrays are decoded, long arrays are skipped by
length and kept as `LongArray` (type, count, where), to be read only if someone asks.

Layout (GGUF v2/v3, little-endian), checked against the file size at every step, since the file
may come from anywhere:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x       key (u64 length + utf-8) | value type u32 | value
    n_tensors x  name | n_dims u32 | ne[n_dims] u64 | ggml type u32 | offset u64 (from data start)
    padding to general.alignment (default 32), then tensor data
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from llamalocal.errors import GGUFError, ModelNotFoundError


def gguf_constants() -> ModuleType:
    """gguf-py's `gguf.constants` (keys, value types, ggml types and their sizes) without running
    `gguf/__init__`, which also imports its writer, lazy tensors and metadata code: ~40 ms of every
    start-up that a header never needs. The module is registered under its own name, so a later
    `import gguf` finds it in sys.modules and uses this very module: there is one set of enums
    (only the attribute `gguf.constants` is then unset; gguf-py's own modules import it by name)."""
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("gguf")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("gguf (gguf-py) is not installed")
    origin = Path(next(iter(spec.submodule_search_locations))) / "constants.py"
    const_spec = importlib.util.spec_from_file_location("gguf.constants", origin)
    if const_spec is None or const_spec.loader is None:
        raise ImportError(f"cannot load {origin}")
    module = importlib.util.module_from_spec(const_spec)
    sys.modules["gguf.constants"] = module
    try:
        const_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["gguf.constants"]
        raise
    return module


if TYPE_CHECKING:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType
else:
    _c = gguf_constants()
    GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType = (
        _c.GGML_QUANT_SIZES, _c.GGMLQuantizationType, _c.GGUFValueType, _c.Keys, _c.LlamaFileType)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
SHORT_ARRAY = 256  # arrays up to this long are decoded; longer ones are skipped by length

# scalar GGUF value types -> struct format
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class LongArray:
    """An array left unread: its element type, length and the file offset of its first element."""

    type: GGUFValueType
    count: int
    offset: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (the row length) first
    type: GGMLQuantizationType
    offset: int  # absolute file offset of the data

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block * size


@dataclass
class GGUFHeader:
    path: Path
    version: int
    file_bytes: int
    fields: dict[str, Any]  # key -> int / float / bool / str / list (short arrays) / LongArray
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def arch_key(self, template: str, default: Any = None) -> Any:
        """A `{arch}.…` key of this file's architecture (gguf.Keys.LLM.* templates)."""
        return self.fields.get(template.format(arch=self.fields.get(Keys.General.ARCHITECTURE, "")), default)


class _Cursor:
    """Bounds-checked reads from the mapped file: running past the end is a GGUFError, never a crash
    or a huge allocation."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise GGUFError(f"{self.path} is truncated or corrupt (its header's {what} runs past the end of the "
                            "file); convert or download it again")

    def unpack(self, s: struct.Struct, what: str) -> Any:
        self.need(s.size, what)
        v = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return v

    def u32(self, what: str) -> int:
        return int(self.unpack(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.unpack(_U64, what))

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        # the one loop that grows with the vocabulary: 8 bytes of length per string, nothing decoded;
        # a length that runs past the end makes the next unpack fail (struct.error), checked once
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = self.end + 1
        self.pos = min(pos, self.end + 1)
        self.need(0, what)


def _value_type(c: _Cursor, what: str) -> GGUFValueType:
    t = c.u32(what)
    try:
        return GGUFValueType(t)
    except ValueError:
        raise GGUFError(f"{c.path}: unknown GGUF value type {t} in {what}; the file is corrupt") from None


def _scalar(c: _Cursor, t: GGUFValueType, what: str) -> Any:
    if t == GGUFValueType.STRING:
        return c.string(what)
    return c.unpack(struct.Struct(_SCALARS[t]), what)


def _value(c: _Cursor, t: GGUFValueType, key: str) -> Any:
    if t != GGUFValueType.ARRAY:
        return _scalar(c, t, key)
    et = _value_type(c, key)
    n = c.u64(key)
    if et == GGUFValueType.ARRAY:
        raise GGUFError(f"{c.path}: {key} is an array of arrays, which llamalocal does not read")
    if n <= SHORT_ARRAY:
        return [_scalar(c, et, key) for _ in range(n)]
    start = c.pos
    if et == GGUFValueType.STRING:
        c.skip_strings(n, key)
    else:
        size = struct.calcsize(_SCALARS[et])
        c.need(n * size, key)
        c.pos += n * size
    return LongArray(et, n, start)


def read_header(path: str | Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor infos; long arrays (the vocabulary) are skipped.

    Raises:
        ModelNotFoundError: no such file.
        GGUFError: not a GGUF, an unsupported version, or a header that is truncated or corrupt.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"no such file: {p}")
    with p.open("rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise GGUFError(f"{p} is not a GGUF file ({size} bytes); convert it with `llamalocal convert`")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != GGUF_MAGIC:
                raise GGUFError(f"{p} is not a GGUF file (starts with {bytes(buf[:4])!r}); "
                                "convert it with `llamalocal convert`")
            return _parse(_Cursor(buf, p), p, size)


def _parse(c: _Cursor, p: Path, size: int) -> GGUFHeader:
    c.pos = 4
    version = c.u32("version")
    if version not in (2, 3):
        raise GGUFError(f"{p} is GGUF version {version}; llamalocal reads versions 2 and 3")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    # every entry takes at least 8 + 4 bytes: a count beyond that is a corrupt header, not a loop to run
    if n_kv * 12 > size or n_tensors * 24 > size:
        raise GGUFError(f"{p}: its header claims {n_kv} metadata entries and {n_tensors} tensors, more than a "
                        f"{size}-byte file can hold; the file is corrupt")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        fields[key] = _value(c, _value_type(c, key), key)
    tensors_raw = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        n_dims = c.u32(name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{p}: tensor {name!r} has {n_dims} dimensions; the file is corrupt")
        shape = tuple(c.u64(name) for _ in range(n_dims))
        t = c.u32(name)
        offset = c.u64(name)
        try:
            qtype = GGMLQuantizationType(t)
        except ValueError:
            raise GGUFError(f"{p}: tensor {name!r} has unknown ggml type {t}; the file is corrupt") from None
        tensors_raw.append((name, shape, qtype, offset))
    alignment = fields.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{p}: general.alignment {alignment!r} is not a power of two; the file is corrupt")
    data = -(-c.pos // alignment) * alignment
    tensors = [TensorInfo(name, shape, qtype, data + off) for name, shape, qtype, off in tensors_raw]
    return GGUFHeader(path=p, version=version, file_bytes=size, fields=fields, tensors=tensors, data_offset=data)


def header_values(path: str | Path, keys: list[str]) -> dict[str, Any] | None:
    """The scalar and string values of `keys` in a GGUF header (absent keys and arrays left out);
    None if the file is not a readable GGUF."""
    try:
        fields = read_header(path).fields
    except (GGUFError, ModelNotFoundError):
        return None
    return {k: fields[k] for k in keys if k in fields and not isinstance(fields[k], LongArray | list)}
