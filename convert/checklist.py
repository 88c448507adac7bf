"""Verifying Meta's `checklist.chk` / `tokenizer_checklist.chk` (md5sum format) before converting.

Each line is `<md5>  <name>` (or `<md5> *<name>`, md5sum's binary mode), names relative to the
file's folder. Files are read in 8 MiB chunks past the page cache (direct_io), the next chunk read
while this one is hashed, so memory stays flat for 16 GB shards; shards are hashed in parallel,
one per core (md5 itself is serial).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from llamalocal.convert.direct_io import BlockReader, aligned_empty
from llamalocal.convert.errors import BadInputError, ChecksumError
from llamalocal.convert.inputs import read_input

CHUNK = 8 * 2**20
MAX_CHECKLIST_BYTES = 1 << 20  # Meta's lists a dozen files in under 1 KB
_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


def read_checklist(path: Path) -> dict[str, str]:
    """name -> md5 (lower case) from an md5sum-format file."""
    if not path.exists():
        raise BadInputError(f"{path} does not exist; pass --no-verify to skip the md5 check")
    try:
        text = read_input(path, MAX_CHECKLIST_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not a text md5 list (md5sum format); download it again") from None
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _LINE.match(line.rstrip("\r"))
        if m is None:
            raise BadInputError(f"{path}:{n}: not an md5sum line (`<md5>  <name>`): {line[:80]!r}")
        md5, name = m.group(1).lower(), m.group(2)
        if "\0" in name:
            raise BadInputError(f"{path}:{n}: a file name with a NUL character; not an md5sum list, download it again")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BadInputError(f"{path}:{n}: {name!r} points outside its folder")
        sums[name] = md5
    return sums


class Cancelled(Exception):
    """Hashing stopped because the caller set its `cancel` event."""


def md5_file(path: Path, progress: Callable[[int], object] | None = None,
             stop: Callable[[], bool] | None = None) -> str:
    """The file's md5 as hex, read once in CHUNK-sized pieces; `stop()` turning true between
    chunks ends it with Cancelled. Cached pieces are hashed where they lie in the page cache
    (BlockReader.fetch: no copy), the others read past the cache, the next piece fetched while
    this one is hashed."""
    h = hashlib.md5(usedforsecurity=False)
    buffers = [aligned_empty(BlockReader.buffer_size(CHUNK)) for _ in range(2)]
    with BlockReader(path) as reader, ThreadPoolExecutor(1) as ahead:
        size = reader.size  # of what was opened (a regular file: BlockReader refuses anything else)

        def fetch(offset: int) -> tuple[int, np.ndarray, bool]:
            """(offset, the chunk there, whether it is lent by the reader rather than copied)"""
            return offset, *reader.fetch(offset, min(CHUNK, size - offset), buffers[offset // CHUNK % 2])

        def give_back(fetched: Future[tuple[int, np.ndarray, bool]]) -> None:
            offset, chunk, lent = fetched.result()
            if lent:
                reader.release(offset, chunk.size)

        nxt = ahead.submit(fetch, 0) if size else None
        try:
            while nxt is not None:
                if stop is not None and stop():
                    raise Cancelled(str(path))
                current = nxt
                offset, chunk, _ = current.result()
                end = offset + chunk.size
                nxt = ahead.submit(fetch, end) if end < size else None
                try:
                    h.update(chunk.data)  # releases the GIL: the next chunk is fetched meanwhile
                finally:
                    give_back(current)
                if progress is not None:
                    progress(chunk.size)
        finally:
            if nxt is not None:  # stopped early: the fetch in flight ends before its buffer goes away
                with contextlib.suppress(Exception):
                    give_back(nxt)
    return h.hexdigest()


def verify_checklist(directory: str | Path, files: list[str] | None = None,
                     progress: Callable[[int], object] | None = None,
                     checklist: str = "checklist.chk", cancel: threading.Event | None = None) -> list[str]:
    """Check files in `directory` against the md5 sums in `directory/checklist`.

    Args:
        directory: the folder holding the checklist and the files it lists.
        files: only these names (each must be listed); default every listed file.
        progress: called with the byte count of each chunk hashed, for a progress bar.
        checklist: the list's file name (`tokenizer_checklist.chk` beside tokenizer.model).
        cancel: set it from another thread to stop hashing (raises Cancelled).
    Returns:
        The names verified, in checklist order.
    Raises:
        ChecksumError: a file's md5 differs (names the file).
        BadInputError: the checklist is missing or malformed, a listed file is missing, or a
            name in `files` is not listed.
    """
    directory = Path(directory)
    sums = read_checklist(directory / checklist)
    if files is None:
        names = list(sums)
    else:
        unlisted = [f for f in files if f not in sums]
        if unlisted:
            raise BadInputError(f"{', '.join(unlisted)} not listed in {directory / checklist}; "
                                "cannot verify it (pass --no-verify to skip the md5 check)")
        names = [n for n in sums if n in set(files)]
    missing = [n for n in names if not (directory / n).exists()]  # a FIFO or a device is refused when read
    if missing:
        raise BadInputError(f"{directory}: {', '.join(missing)} listed in {checklist} but missing; "
                            "download the missing files")
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            progress(n)  # type: ignore[misc]

    halt = threading.Event()  # one mismatch stops hashing the other files

    def stopped() -> bool:
        return halt.is_set() or (cancel is not None and cancel.is_set())

    def check(name: str) -> None:
        got = md5_file(directory / name, report if progress is not None else None, stopped)
        if got != sums[name]:
            raise ChecksumError(f"{directory / name}: md5 {got} does not match {checklist} ({sums[name]}); "
                                "the file is damaged or incomplete, download it again")

    with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1))) as pool:
        try:
            for done in as_completed([pool.submit(check, n) for n in names]):
                done.result()  # the first mismatch found ends it
        except BaseException:
            halt.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return names
