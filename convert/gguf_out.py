"""Writing one GGUF file, tensor data streamed in blocks, published atomically.

gguf-py's GGUFWriter writes the header, metadata and tensor infos; tensor data is then
appended here block by block so no tensor is ever whole in memory. The file is written under
a hidden partial name beside the target and renamed only after everything is on disk, so an
error, a full disk or Ctrl-C never leaves a file that looks complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


class StreamingGGUFWriter:
    """header -> metadata -> tensor infos -> tensor data in declared order -> publish."""

    def __init__(self, final_path: Path, arch: str = "llama") -> None:
        self.final_path = Path(final_path)
        self.tmp_path = partial_path(self.final_path)
        self.gguf = gguf.GGUFWriter(None, arch)
        self._order: list[tuple[str, int]] = []
        self._next = 0
        self._written = 0  # bytes of the current tensor so far
        self._opened = False

    # -- declaring -------------------------------------------------------------------------
    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, nbytes: int) -> None:
        # shape is numpy order (rows, cols); gguf-py reverses it into ggml's ne[] order
        self.gguf.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._order.append((name, nbytes))

    # -- writing ---------------------------------------------------------------------------
    def open(self) -> None:
        """Create the partial file and write everything before the tensor data."""
        self.gguf.write_header_to_file(self.tmp_path)
        self.gguf.write_kv_data_to_file()
        self.gguf.write_ti_data_to_file()
        self._opened = True
        self._pad()

    @property
    def _fout(self):
        assert self.gguf.fout is not None
        return self.gguf.fout[0]

    def _pad(self) -> None:
        self.gguf.write_padding(self._fout, self._fout.tell())

    def write(self, name: str, block: np.ndarray | bytes) -> None:
        """Append a block of the tensor `name`; tensors must come in declared order."""
        if not self._opened:
            raise RuntimeError("open() first")
        expected, nbytes = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {expected!r})")
        data = block.tobytes() if isinstance(block, np.ndarray) else block
        self._written += len(data)
        if self._written > nbytes:
            raise RuntimeError(f"{name}: {self._written} bytes written, {nbytes} declared")
        self._fout.write(data)
        if self._written == nbytes:
            self._pad()
            self._next += 1
            self._written = 0

    def finish(self) -> Path:
        """Flush, fsync, close and rename to the final name. Returns the final path."""
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} tensors written")
        self._fout.flush()
        os.fsync(self._fout.fileno())
        self.gguf.close()
        os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        """Close and delete the partial file (safe to call more than once)."""
        self.gguf.close()
        self.tmp_path.unlink(missing_ok=True)
