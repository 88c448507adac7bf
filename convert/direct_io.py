"""Streaming file I/O that goes around the page cache where the OS allows it.

A conversion reads every checkpoint byte once and writes every output byte once; neither is read
again soon. Through the page cache each 4 KiB costs a fresh cache page both ways (and the kernel
evicts whatever else the user had cached to make room: a 65B checkpoint is 130 GB). With O_DIRECT
the disk moves data straight between the file and a few aligned buffers that are reused for the
whole run. Where direct I/O is not available (macOS, tmpfs, some network filesystems)
the same calls fall back to ordinary reads and writes, and the kernel is told to drop what we have
finished with.

Pages that are already in the page cache (a checkpoint just downloaded or read a minute ago) are
not read from disk again: `BlockReader` copies them from the cache, or lends them without a copy
through a mapping of the file while it holds a read lease on it (Linux), so that nobody can
truncate the file under the mapping without waiting for us first.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from llamalocal.convert import native
from llamalocal.convert.errors import BadInputError
from llamalocal.convert.inputs import open_input, same_file

ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned; 4 KiB suits every disk
_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_empty(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer (an anonymous map: its pages come from the OS on first touch)."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes]


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _direct_refused(e: OSError) -> bool:
    """A filesystem that takes the O_DIRECT flag but not the I/O itself."""
    return e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Tell the kernel we are done with these file pages (a hint; no-op where unsupported)."""
    if hasattr(os, "posix_fadvise") and length > 0:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _open_direct(path: Path, flags: int, like: int) -> int | None:
    """A second descriptor with O_DIRECT on the file `like` is open on, or None where the OS or
    filesystem (tmpfs, ...) has none. It is opened by name, so it is kept only if it is that same
    file (O_NONBLOCK: whatever the name has become, the open returns at once)."""
    if not _DIRECT:
        return None
    try:
        fd = os.open(path, flags | _DIRECT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    if not same_file(fd, like):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd


def _take_lease(fd: int) -> bool:
    """A read lease on the open file (Linux): from then on, whoever opens it for writing or
    truncates it waits (up to the kernel's lease-break-time, 45 s by default) until we let go,
    and we can see that they wait. Refused where someone has it open for writing (a download
    still running), where we do not own it, and on filesystems without leases."""
    if sys.platform != "linux":
        return False
    import fcntl

    try:
        # a lease break is announced by a signal, SIGIO unless told otherwise, which would kill
        # the process; SIGURG is ignored unless handled, and the break is seen by asking
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except (OSError, AttributeError):
        return False
    return True


def _lease_kept(fd: int) -> bool:
    """Whether our read lease on `fd` is still whole (no one is waiting to write or truncate)."""
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


def _drop_lease(fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def _no_cache_hint(fd: int) -> None:
    """macOS has no O_DIRECT; F_NOCACHE asks it not to keep this file's pages."""
    if sys.platform == "darwin":
        import fcntl

        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

class BlockReader:
    """Reads byte ranges of one file into caller-owned buffers, from any thread.

    The pages of a range that are in the page cache are copied from there (memory speed, cache left
    as it was); the others are read with direct I/O (disk speed, the cache left alone).

    `read(offset, nbytes, buf)` fills `buf` (at least `buffer_size(nbytes)` bytes, from
    `aligned_empty`) and returns the view of `buf` holding exactly those bytes.

    `view(offset, nbytes)` lends a range whose pages are all cached without copying it: the
    page-cache pages themselves, read-only, through a mapping of the file, or None (then `read`).
    It does so only while the file holds a read lease, so that nobody can truncate it under a
    mapping (a mapped page past the end of a file is SIGBUS, not an error): someone who tries
    waits until every lent range is given back with `release(offset, nbytes)`, and nothing is lent
    from then on.
    """

    def __init__(self, path: str | Path, *, direct: bool = True,
                 error: type[BadInputError] = BadInputError) -> None:
        self.path = Path(path)
        self._fd = open_input(self.path, error)  # a regular file, or `error`: never a FIFO or a device
        self._direct_fd = _open_direct(self.path, os.O_RDONLY, self._fd) if direct else None
        if self._direct_fd is None:
            _no_cache_hint(self._fd)
        self._opened_size = os.fstat(self._fd).st_size
        self._residency = native.Residency(self._fd, self._opened_size) if self._direct_fd is not None else None
        self.cached_bytes = 0  # bytes found in the page cache and copied from there
        self.lent_bytes = 0  # bytes found in the page cache and lent by view()
        self._lock = threading.Lock()
        self._lent = 0  # views not given back yet
        self._closing = False
        # taken on the first view(): a reader that only copies never makes a writer wait
        self._leased: bool | None = None if self._residency is not None and self._residency.mapped else False

    def fetch(self, offset: int, nbytes: int, buf: np.ndarray) -> tuple[np.ndarray, bool]:
        """The bytes [offset, offset + nbytes): lent where `view` can lend them, else read into
        `buf` as `read` does, asking the page cache once for both. Returns (the bytes, whether
        they are lent: then `release` them)."""
        pages = self._residency.pages(offset, nbytes) if self._residency is not None else None
        lent = self.view(offset, nbytes, pages=pages)
        return (lent, True) if lent is not None else (self._read(offset, nbytes, buf, pages), False)

    def view(self, offset: int, nbytes: int, *, pages: bytes | None = None) -> np.ndarray | None:
        """The file's bytes [offset, offset + nbytes), read-only, straight from the page cache,
        if all of them are cached and the file is leased; None otherwise. Give it back with
        `release(offset, nbytes)` once done with it. `pages`: the range's residency, if asked
        already."""
        residency = self._residency
        if self._leased is False or residency is None or offset + nbytes > self._opened_size:
            return None
        with self._lock:
            if self._leased is None:
                self._leased = _take_lease(self._fd)
                if self._leased and os.fstat(self._fd).st_size != self._opened_size:  # shrunk before it held
                    _drop_lease(self._fd)
                    self._leased = False
            if not self._lease_holds():
                return None
            vec = pages if pages is not None else residency.pages(offset, nbytes)
            data = residency.view(offset, nbytes) if vec is not None and vec.count(0) == 0 else None
            if data is not None:
                self._lent += 1
                self.lent_bytes += nbytes
            return data

    def release(self, offset: int, nbytes: int) -> None:
        """Give back a range `view` lent (its pages leave this process's memory, not the cache)."""
        if self._residency is not None:
            self._residency.drop(offset, nbytes)
        with self._lock:
            self._lent -= 1
            self._lease_holds()  # let a waiting writer go on once nothing lent is in use
            if self._closing and self._lent == 0:
                self._close_now()

    def _lease_holds(self) -> bool:
        """Under the lock: whether views may be lent. A writer waiting for the lease ends it: at
        once when nothing is lent, else when the last view comes back."""
        if not self._leased:
            return False
        if _lease_kept(self._fd):
            return True
        if self._lent == 0:
            _drop_lease(self._fd)
            self._leased = False
        return False

    @property
    def direct(self) -> bool:
        """Whether reads that miss the page cache bypass it."""
        return self._direct_fd is not None

    @property
    def size(self) -> int:
        """The file's size now (of the file opened, whatever its name has become since)."""
        return os.fstat(self._fd).st_size

    @staticmethod
    def buffer_size(nbytes: int) -> int:
        """Bytes a buffer needs to receive `nbytes` from any offset (room to align both ends)."""
        return _round_up(nbytes) + ALIGN

    def read(self, offset: int, nbytes: int, buf: np.ndarray) -> np.ndarray:
        return self._read(offset, nbytes, buf, None)

    def _read(self, offset: int, nbytes: int, buf: np.ndarray, pages: bytes | None) -> np.ndarray:
        if self._direct_fd is None:
            self._fill(self._fd, buf, offset, offset, offset + nbytes, offset)
            _drop_cache(self._fd, offset, nbytes)
            return buf[:nbytes]
        # buf[i] holds file byte base + i with base aligned, so bytes copied from the cache (any
        # alignment) and direct reads (aligned) land in the same places and one range can mix both
        shift = offset % ALIGN
        base = offset - shift
        for start, stop, cached in self._runs(offset, nbytes, pages):
            if cached:
                # in the page cache (a just-downloaded or recently read checkpoint): copied from
                # there at memory speed, the cache left as the user had it
                self._fill(self._fd, buf, base, start, stop, offset)
                self.cached_bytes += stop - start
                continue
            if self._direct_fd is not None:
                try:
                    self._fill(self._direct_fd, buf, base, start - start % ALIGN, stop, offset, _round_up(stop))
                    continue
                except OSError as e:
                    if not _direct_refused(e):
                        raise
                    self._close_direct()
            self._fill(self._fd, buf, base, start, stop, offset)
            _drop_cache(self._fd, start, stop - start)
        return buf[shift:shift + nbytes]

    def _fill(self, fd: int, buf: np.ndarray, base: int, start: int, stop: int, asked: int,
              upto: int | None = None) -> None:
        """Read file bytes [start, upto or stop) into buf[start - base:]: EOFError (naming the
        range `asked` from) if the file ends before `stop`."""
        got = self._pread(fd, buf[start - base:(upto or stop) - base], start)
        if start + got < stop:
            raise EOFError(f"{self.path}: the file ends {stop - start - got} bytes short of {stop - asked} bytes "
                           f"at offset {asked}")

    def _runs(self, offset: int, nbytes: int, pages: bytes | None = None) -> list[tuple[int, int, bool]]:
        """[offset, offset + nbytes) cut into (start, stop, cached) runs of whole pages: the pages
        the page cache holds and those it does not (a warm file whose cache lost pages here and
        there to reclaim is mostly the first kind). All of it uncached where the OS cannot tell.
        `pages`: the range's residency, if asked already."""
        end = offset + nbytes
        residency = self._residency
        vec = pages if pages is not None else residency.pages(offset, nbytes) if residency is not None else None
        missing = vec.count(0) if vec is not None else 0
        if residency is None or vec is None or missing in (0, len(vec)):
            return [(offset, end, vec is not None and not missing)] if nbytes else []
        flags = np.frombuffer(vec, dtype=np.uint8) != 0
        edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
        page, first = residency.page, offset // residency.page
        bounds = [offset, *((first + int(e)) * page for e in edges), end]
        return [(a, b, bool(flags[0]) == (i % 2 == 0)) for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]

    @staticmethod
    def _pread(fd: int, view: np.ndarray, offset: int) -> int:
        """Fill `view` from `offset`; fewer bytes only at the end of the file."""
        mv = view.data.cast("B")
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def _close_direct(self) -> None:
        fd, self._direct_fd = self._direct_fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close the file; with views still lent, when the last one comes back (until then the
        mapping and the lease stay)."""
        with self._lock:
            if self._lent:
                self._closing = True
                return
            self._close_now()

    def _close_now(self) -> None:
        self._close_direct()
        if self._residency is not None:
            self._residency.close()
            self._residency = None
        if self._fd >= 0:
            os.close(self._fd)  # ends the lease
            self._fd = -1
        self._leased = False

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

class AppendWriter:
    """Appends to an existing file from `start` on, through one aligned staging buffer.

    Single-threaded. `close()` writes what is left, trims the file to the bytes written and
    fsyncs; `abort()` only closes.
    """

    def __init__(self, path: str | Path, start: int, *, staging: int = 8 * 2**20, direct: bool = True,
                 fd: int | None = None) -> None:
        self.path = Path(path)
        # `fd`: a read-write descriptor of `path` the caller created (kept open by the caller too)
        self._fd = os.dup(fd) if fd is not None else os.open(self.path, os.O_RDWR)
        self._direct_fd = _open_direct(self.path, os.O_WRONLY, self._fd) if direct else None
        if self._direct_fd is None:
            _no_cache_hint(self._fd)
        self._buf = aligned_empty(_round_up(max(staging, ALIGN)))
        # the staging buffer always starts at an aligned file offset: carry in the bytes already
        # written before `start` on its page
        self._base = start - start % ALIGN
        head = os.pread(self._fd, start - self._base, self._base) if start > self._base else b""
        if len(head) != start - self._base:
            raise EOFError(f"{self.path} is shorter than {start} bytes")
        self._fill = len(head)
        self._buf[:self._fill] = np.frombuffer(head, dtype=np.uint8)

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    @property
    def position(self) -> int:
        """File offset of the next byte written."""
        return self._base + self._fill

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        src = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        while src.size:
            n = min(src.size, self._buf.size - self._fill)
            self._buf[self._fill:self._fill + n] = src[:n]
            self._fill += n
            src = src[n:]
            if self._fill == self._buf.size:
                self._flush(self._fill)

    def zeros(self, n: int) -> None:
        while n:
            k = min(n, self._buf.size - self._fill)
            self._buf[self._fill:self._fill + k] = 0
            self._fill += k
            n -= k
            if self._fill == self._buf.size:
                self._flush(self._fill)

    def _flush(self, upto: int) -> None:
        """Write buf[:upto] (a multiple of ALIGN unless this is the tail) at `_base`."""
        view = self._buf[:upto].data
        if self._direct_fd is not None and upto % ALIGN == 0:
            try:
                self._pwrite(self._direct_fd, view, self._base)
            except OSError as e:
                if not _direct_refused(e):
                    raise
                os.close(self._direct_fd)
                self._direct_fd = None
            else:
                self._advance(upto)
                return
        self._pwrite(self._fd, view, self._base)
        _drop_cache(self._fd, self._base, upto)  # a no-op until written back; helps on the way
        self._advance(upto)

    def _advance(self, upto: int) -> None:
        keep = self._fill - upto
        if keep:
            self._buf[:keep] = self._buf[upto:self._fill]
        self._base += upto
        self._fill = keep

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def close(self) -> None:
        """Write the rest, cut the file at `position`, fsync, close."""
        end = self.position
        if self._fill:
            if self._direct_fd is not None:
                pad = _round_up(self._fill) - self._fill
                self._buf[self._fill:self._fill + pad] = 0
                self._fill += pad
                self._flush(self._fill)  # the padding is cut off below
            else:
                self._flush(self._fill)
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        self.abort()

    def abort(self) -> None:
        for attr in ("_direct_fd", "_fd"):
            fd = getattr(self, attr)
            if fd is not None and fd >= 0:
                os.close(fd)
            setattr(self, attr, None if attr == "_direct_fd" else -1)
