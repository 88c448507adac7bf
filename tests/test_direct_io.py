"""convert.direct_io: byte ranges read and appended exactly, with and without direct I/O."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from llamalocal.convert import direct_io, native
from llamalocal.convert.direct_io import ALIGN, AppendWriter, BlockReader, aligned_empty


def cached_fraction(fd: int, offset: int, length: int) -> float | None:
    """The fraction of the file's pages holding [offset, offset + length) in the page cache."""
    residency = native.Residency(fd, 0)  # no whole-file mapping: asks about this range alone
    vec = residency.pages(offset, length)
    return None if vec is None else (len(vec) - vec.count(0)) / len(vec)


RANGES = [(0, 1), (0, ALIGN), (1, ALIGN), (ALIGN - 1, 2), (5000, 3 * ALIGN + 17), (12345, 0), (0, 40000)]


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 40000, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def test_aligned_empty_is_page_aligned():
    for n in (0, 1, 4097, 3 * 2**20):
        buf = aligned_empty(n)
        assert buf.size == n and buf.dtype == np.uint8
        assert buf.ctypes.data % ALIGN == 0
        buf[:] = 7  # writable


@pytest.mark.parametrize("direct", [True, False])
def test_reads_any_range(data_file, direct):
    path, data = data_file
    with BlockReader(path, direct=direct) as r:
        if not direct:
            assert not r.direct
        for offset, n in RANGES:
            buf = aligned_empty(BlockReader.buffer_size(n))
            assert r.read(offset, n, buf).tobytes() == data[offset:offset + n], (offset, n)


@pytest.mark.parametrize("direct", [True, False])
def test_read_past_the_end_is_eof(data_file, direct):
    path, _ = data_file
    with BlockReader(path, direct=direct) as r, pytest.raises(EOFError):
        r.read(39990, 20, aligned_empty(BlockReader.buffer_size(20)))


def test_falls_back_when_the_filesystem_refuses_direct_reads(data_file, monkeypatch):
    path, data = data_file
    r = BlockReader(path)
    if not r.direct:
        pytest.skip(f"{path.parent} does not take O_DIRECT at all; the buffered path is the one tested")
    real = os.preadv
    direct_fd = r._direct_fd

    def refuse(fd, buffers, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refuse)
    monkeypatch.setattr(r._residency, "pages", lambda offset, n: bytes(-(-n // ALIGN) + 1))  # as if cold
    buf = aligned_empty(BlockReader.buffer_size(9000))
    assert r.read(100, 9000, buf).tobytes() == data[100:9100]
    assert not r.direct
    r.close()


def test_cached_ranges_come_from_the_page_cache_cold_ones_from_disk(tmp_path):
    path = tmp_path / "blocks.bin"
    data = np.random.default_rng(1).integers(0, 256, 64 * ALIGN, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: evicted
        frac = cached_fraction(f.fileno(), 0, len(data))
    r = BlockReader(path)
    if not r.direct or frac is None or frac > 0:
        r.close()
        pytest.skip("this filesystem cannot evict the file's pages or take O_DIRECT; nothing to tell apart")
    buf = aligned_empty(BlockReader.buffer_size(len(data)))
    assert r.read(5, 20 * ALIGN, buf).tobytes() == data[5:5 + 20 * ALIGN]
    assert r.cached_bytes == 0  # cold: read directly, and still not cached afterwards
    with open(path, "rb") as f:
        assert cached_fraction(f.fileno(), 0, 20 * ALIGN) == 0.0
        f.seek(32 * ALIGN)
        f.read(16 * ALIGN)  # the user reads part of it: those pages are now cached
    assert r.read(33 * ALIGN + 7, 10 * ALIGN, buf).tobytes() == data[33 * ALIGN + 7:43 * ALIGN + 7]
    assert r.cached_bytes == 10 * ALIGN
    r.close()


@pytest.mark.parametrize("whole_file_mapped", [True, False], ids=["mapped-once", "mapped-per-read"])
def test_a_cached_range_with_pages_missing_reads_only_those_from_disk(tmp_path, whole_file_mapped):
    """A warm file whose cache lost pages here and there (reclaim): the cached pages are copied
    from the cache, the missing ones read around it, and the bytes are exact either way. The same
    where the file cannot be mapped whole for asking (an address-space limit)."""
    path = tmp_path / "holes.bin"
    mib = 2**20
    data = np.random.default_rng(2).integers(0, 256, 12 * mib, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # none of it cached
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead past what is read
        for at in (0, 3, 4, 5, 7, 8, 9, 10):  # then all but MiBs 1, 2, 6 and 11 read (and cached) again
            os.pread(f.fileno(), mib, at * mib)
        frac = cached_fraction(f.fileno(), 0, len(data))
    r = BlockReader(path)
    if not r.direct or frac != 8 / 12:
        r.close()
        pytest.skip("this filesystem cannot evict single pages or take O_DIRECT; nothing to tell apart")
    if not whole_file_mapped:
        r._residency.close()  # as if the whole-file mapping had failed
    holes = [(h * mib, (h + 1) * mib) for h in (1, 2, 6, 11)]
    for offset, n in ((7, len(data) - 7), (mib, ALIGN), (mib - 100, 5 * ALIGN), (3 * mib - 1, 4 * mib + 3),
                      (11 * mib + 5, mib - 5), (5 * mib, mib)):
        buf = aligned_empty(BlockReader.buffer_size(n))
        before = r.cached_bytes
        assert r.read(offset, n, buf).tobytes() == data[offset:offset + n], (offset, n)
        missing = sum(max(0, min(offset + n, hi) - max(offset, lo)) for lo, hi in holes)
        assert r.cached_bytes - before == n - missing, (offset, n)  # exactly the cached bytes came from the cache
    r.close()
    with open(path, "rb") as f:  # what was missing is still missing: read around the cache
        assert cached_fraction(f.fileno(), 6 * mib, mib) == 0.0


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("start", [0, 1000, ALIGN, 2 * ALIGN + 32])
def test_append_writer_keeps_what_is_there_and_trims(tmp_path, direct, start):
    path = tmp_path / "out.bin"
    head = bytes(range(256)) * (start // 256 + 1)
    path.write_bytes(head[:start] + b"\xee" * 100)  # bytes past `start` are overwritten or cut off
    rng = np.random.default_rng(start)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 4095, 3 * ALIGN, 7, 20000, 0, 33)]
    w = AppendWriter(path, start, staging=2 * ALIGN, direct=direct)  # small staging: many flushes
    expected = bytearray(head[:start])
    for i, p in enumerate(pieces):
        w.write(p if i % 2 else p.tobytes())
        expected += p.tobytes()
        w.zeros(i)
        expected += bytes(i)
        assert w.position == len(expected)
    w.close()
    assert path.read_bytes() == bytes(expected)


def test_append_writer_falls_back_when_direct_writes_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"header")
    w = AppendWriter(path, 6, staging=ALIGN)
    if not w.direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT at all; the buffered path is the one tested")
    real, direct_fd = os.pwrite, w._direct_fd

    def refuse(fd, data, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse)
    w.write(b"x" * 10000)
    w.close()
    assert path.read_bytes() == b"header" + b"x" * 10000


def test_no_direct_io_on_this_platform(tmp_path, monkeypatch, data_file):
    """Where the OS has no O_DIRECT (macOS), reads and writes go through ordinary calls."""
    monkeypatch.setattr(direct_io, "_DIRECT", 0)
    path, data = data_file
    with BlockReader(path) as r:
        assert not r.direct
        assert r.read(3, 5000, aligned_empty(BlockReader.buffer_size(5000))).tobytes() == data[3:5003]
    out = tmp_path / "o.bin"
    out.write_bytes(b"ab")
    w = AppendWriter(out, 2)
    assert not w.direct
    w.write(b"cd")
    w.close()
    assert out.read_bytes() == b"abcd"
