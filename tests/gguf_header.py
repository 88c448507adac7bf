"""Test helper: a GGUF header through llamalocal.gguf_header (which skips the 128k-token Llama-3
vocabulary instead of reading it, as gguf-py's reader does for seconds), shaped for the Llama-3
tests: fields with long arrays as ("array", length), tensors by name, f32 tensor data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamalocal.gguf_header import LongArray, read_header


@dataclass(frozen=True)
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
    h = read_header(path)
    fields = {k: (("array", v.count) if isinstance(v, LongArray) else v) for k, v in h.fields.items()}
    tensors = {t.name: Tensor(t.name, t.shape, int(t.type), t.offset - h.data_offset) for t in h.tensors}
    return Header(fields, tensors, h.data_offset, Path(path))
