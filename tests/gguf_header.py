"""A quick GGUF header reader for tests of Llama-3 files.

gguf-py's GGUFReader makes a numpy view per array element, which takes many seconds on a
Llama-3 header (128256 tokens, 280147 merges). This reads the same fields by the GGUF spec
(ggml's docs/gguf.md) with struct, keeping long arrays as their length only, and gives each
tensor's type, shape and data as a numpy array (f32 tensors). tests/test_llama3_cli.py checks it
against gguf-py on one file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
LONG = 1000  # arrays longer than this keep only their length


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first), as gguf-py reports it
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class Header:
    fields: dict[str, object]
    tensors: dict[str, Tensor]
    data_start: int
    path: Path

    def f32(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        assert t.ggml_type == 0, f"{name} is not f32"
        n = int(np.prod(t.shape))
        return np.fromfile(self.path, dtype="<f4", count=n, offset=self.data_start + t.offset)


def read(path: str | Path) -> Header:
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(t: int):
        nonlocal pos
        if t == STRING:
            return string()
        if t == ARRAY:
            et, n = take("<I"), take("<Q")
            if et in _SCALARS and n > LONG:
                pos += n * struct.calcsize(_SCALARS[et])
                return ("array", n)
            items = [value(et) for _ in range(n)]
            return ("array", n) if n > LONG else items
        return take(_SCALARS[t])

    assert data[:4] == b"GGUF", "not a GGUF file"
    pos = 4
    take("<I")  # version
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("<Q") for _ in range(take("<I")))
        tensors[name] = Tensor(name, dims, take("<I"), take("<Q"))
    align = int(fields.get("general.alignment", 32))  # type: ignore[arg-type]
    return Header(fields, tensors, (pos + align - 1) // align * align, Path(path))
