"""Writing one GGUF file, tensor data streamed in blocks, published atomically.

gguf-py's GGUFWriter writes the header, metadata and tensor infos; tensor data is then
appended here block by block (through direct_io, past the page cache) so no tensor is ever whole
in memory. The file is written under a hidden partial name beside the target and renamed only
after everything is on disk, so an error, a full disk or Ctrl-C never leaves a file that looks
complete.

The output's folder is often the model folder, which came from strangers: whatever already has
the partial name is never followed or reused. The partial file is created with O_CREAT | O_EXCL |
O_NOFOLLOW (a planted symlink cannot redirect the write to another file) and locked while it is
written; a stale partial is removed only if it is provably one of ours (a regular file of this
user, one link, a GGUF header or nothing, and no live converter holding its lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import gguf
import numpy as np

from llamalocal.convert.direct_io import AppendWriter
from llamalocal.convert.errors import BadInputError, DiskSpaceError, LlamalocalError


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


_MAGIC = b"GGUF"
_CREATE = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def _not_ours(path: Path, why: str) -> BadInputError:
    return BadInputError(f"{path} already exists and {why}, so it is not a partial file llamalocal left; "
                         "remove it yourself or choose another --outfile")


def _remove_stale(path: Path) -> None:
    """Remove a partial file a killed conversion left, only if it is provably ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _not_ours(path, "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a regular file")
    if st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise _not_ours(path, "belongs to another user" if st.st_uid != os.geteuid() else "has other hard links")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise _not_ours(path, "changed while it was checked")
        head = os.pread(fd, len(_MAGIC), 0)
        if head != _MAGIC[:len(head)]:
            raise _not_ours(path, "is not a GGUF file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(f"another llamalocal convert is writing {path} now; wait for it to finish or "
                                "choose another --outfile") from None
        os.unlink(path)
    finally:
        os.close(fd)


def create_partial(path: Path) -> int:
    """A new, empty, locked file at `path` (a read-write descriptor), never anything that was there.

    An interrupt (Ctrl-C, SIGTERM) can land between any two steps: once the file exists it is
    removed here, unless the descriptor itself was lost before it was stored, in which case the file
    is empty, unlocked and ours, and the writer's abort() removes it as a stale partial."""
    _remove_stale(path)
    fd = None
    try:
        fd = os.open(path, _CREATE, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
    except FileExistsError:
        raise _not_ours(path, "appeared while this conversion started") from None
    except BaseException:
        if fd is not None:
            os.close(fd)
            path.unlink(missing_ok=True)
        raise
    return fd


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
        self._fd: int | None = None  # the partial file, created by open(); its lock lives as long as it
        self._creating = False

    # -- declaring -------------------------------------------------------------------------
    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, nbytes: int) -> None:
        # shape is numpy order (rows, cols); gguf-py reverses it into ggml's ne[] order
        self.gguf.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._order.append((name, nbytes))

    # -- writing ---------------------------------------------------------------------------
    def open(self) -> None:
        """Create the partial file and write everything before the tensor data."""
        with _writing(self.final_path):
            self._creating = True
            self._fd = create_partial(self.tmp_path)
            # gguf-py writes the header through a file object on our descriptor, never by name
            self.gguf.fout = [os.fdopen(os.dup(self._fd), "wb")]
            self.gguf.state = gguf.WriterState.EMPTY
            self.gguf.write_header_to_file()
            self.gguf.write_kv_data_to_file()
            self.gguf.write_ti_data_to_file()
            fout = self.gguf.fout[0]
            self.gguf.write_padding(fout, fout.tell())
            start = fout.tell()
            self.gguf.close()
            self._out = AppendWriter(self.tmp_path, start, fd=self._fd)

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
            self._close_fd()
        return self.final_path

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def abort(self) -> None:
        """Close and delete the partial file, if this writer created it (safe to call more than once)."""
        if self._out is not None:
            self._out.abort()
            self._out = None
        with suppress(OSError):
            self.gguf.close()
        if self._fd is not None:
            self.tmp_path.unlink(missing_ok=True)  # ours: created with O_EXCL and locked until now
            self._close_fd()
        elif self._creating:  # interrupted while creating it: remove it if it is provably ours
            with suppress(BadInputError, OSError):
                _remove_stale(self.tmp_path)
        self._creating = False
