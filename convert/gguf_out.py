"""Writing one GGUF file, tensor data streamed in blocks, published atomically.

gguf-py's GGUFWriter writes the header, metadata and tensor infos; tensor data is then
appended here block by block (through direct_io, past the page cache) so no tensor is ever whole
in memory. The file is written under a hidden partial name beside the target and renamed only
after everything is on disk, so an error, a full disk or Ctrl-C never leaves a file that looks
complete.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from llamalocal.convert.direct_io import AppendWriter
from llamalocal.convert.errors import BadInputError, DiskSpaceError, LlamalocalError


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """OS errors while writing `path` as one line for the user (the caller deletes the partial file)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(f"the disk holding {path.parent} filled up while writing {path.name}; nothing was "
                                 "kept. Free some space or choose another --outfile") from None
        if isinstance(e, PermissionError):
            raise BadInputError(f"cannot write in {path.parent} (permission denied); choose another --outfile") from None
        raise LlamalocalError(f"writing {path.name} failed: {e.strerror or e}; nothing was kept") from None


class StreamingGGUFWriter:
    """header -> metadata -> tensor infos -> tensor data in declared order -> publish."""

    def __init__(self, final_path: Path, arch: str = "llama") -> None:
        self.final_path = Path(final_path)
        self.tmp_path = partial_path(self.final_path)
        self.gguf = gguf.GGUFWriter(None, arch)
        self._order: list[tuple[str, int]] = []
        self._next = 0
        self._written = 0  # bytes of the current tensor so far
        self._out: AppendWriter | None = None

    # -- declaring -------------------------------------------------------------------------
    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, nbytes: int) -> None:
        # shape is numpy order (rows, cols); gguf-py reverses it into ggml's ne[] order
        self.gguf.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._order.append((name, nbytes))

    # -- writing ---------------------------------------------------------------------------
    def open(self) -> None:
        """Create the partial file and write everything before the tensor data."""
        with _writing(self.final_path):
            self.gguf.write_header_to_file(self.tmp_path)
            self.gguf.write_kv_data_to_file()
            self.gguf.write_ti_data_to_file()
            fout = self.gguf.fout[0]  # type: ignore[index]
            self.gguf.write_padding(fout, fout.tell())
            start = fout.tell()
            self.gguf.close()
            self._out = AppendWriter(self.tmp_path, start)

    def _pad(self) -> None:
        assert self._out is not None
        self._out.zeros(-self._out.position % self.gguf.data_alignment)

    def write(self, name: str, block: np.ndarray | bytes) -> None:
        """Append a block of the tensor `name`; tensors must come in declared order."""
        if self._out is None:
            raise RuntimeError("open() first")
        expected, nbytes = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {expected!r})")
        size = block.nbytes if isinstance(block, np.ndarray) else len(block)
        self._written += size
        if self._written > nbytes:
            raise RuntimeError(f"{name}: {self._written} bytes written, {nbytes} declared")
        with _writing(self.final_path):
            self._out.write(block)
            if self._written == nbytes:
                self._pad()
                self._next += 1
                self._written = 0

    def finish(self) -> Path:
        """Write the rest, fsync, close and rename to the final name. Returns the final path."""
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} tensors written")
        assert self._out is not None
        with _writing(self.final_path):
            self._out.close()
            self._out = None
            os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        """Close and delete the partial file (safe to call more than once)."""
        if self._out is not None:
            self._out.abort()
            self._out = None
        self.gguf.close()
        self.tmp_path.unlink(missing_ok=True)
