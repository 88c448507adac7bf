"""Opening the files of a downloaded model folder without trusting what they are.

A model folder comes from strangers, so a name that should be a file may be anything: a FIFO
(opening it for reading waits for a writer forever), a symlink to /dev/zero (reading it never
ends), a socket or a directory. Every input is opened here: with O_NONBLOCK, so the open itself
returns at once whatever the name is, then fstat says what was opened, and only a regular file
is kept. Reads are bounded by the file's real size, and small files (params.json, checklists,
tokenizer.model) by a cap no real one approaches. Symlinks to regular files are fine (a download
manager's cache, a shard linked from elsewhere).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from llamalocal.convert.errors import BadInputError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def open_input(path: str | Path, error: type[BadInputError] = BadInputError) -> int:
    """A read-only descriptor of the regular file at `path` (symlinks followed).

    Raises:
        `error` (BadInputError or a subclass): missing, unreadable, or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except PermissionError:
        raise error(f"{path} is not readable (permission denied)") from None
    except (OSError, ValueError) as e:  # a symlink loop, a socket (ENXIO), a NUL in the name ...
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise error(f"{path} cannot be opened ({why}); a model folder holds plain files") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} is {_kind(st.st_mode)}, not a regular file; a model folder holds plain files")
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_input(path: str | Path, limit: int, error: type[BadInputError] = BadInputError) -> bytes:
    """The whole of a small regular file, refused if it holds more than `limit` bytes."""
    fd = open_input(path, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path} is {size} bytes; a real one is far smaller (at most {limit}), so this is "
                        "not the file it is named after")
        parts, got = [], 0
        while got <= limit:  # the size may change under us: read to the end, but never past the cap
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if got > limit:
            raise error(f"{path} grew past {limit} bytes while being read")
        return b"".join(parts)
    finally:
        os.close(fd)


def same_file(fd: int, other: int) -> bool:
    """Whether two descriptors are the same file (a second descriptor opened by name, say)."""
    a, b = os.fstat(fd), os.fstat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
