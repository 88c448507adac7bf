"""BlockReader.view: cached pages lent without a copy, and only while nobody can truncate the file.

A mapped page past the end of a file is SIGBUS, which would kill the converter without a word
and leave its partial output behind; a read lease makes a truncating (or writing) process wait
until every lent range is back. These tests truncate and open files from other processes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamalocal.convert.checklist import CHUNK, md5_file
from llamalocal.convert.direct_io import BlockReader, aligned_empty

MIB = 2**20
# what another process does to the file: returns once the kernel let it
TRUNCATE = "import os, sys; os.truncate(sys.argv[1], int(sys.argv[2]))"
OPEN_FOR_WRITING = "import os, sys; os.close(os.open(sys.argv[1], os.O_WRONLY))"


def _file(tmp_path: Path, nbytes: int, seed: int = 0) -> tuple[Path, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path = tmp_path / "shard.bin"
    path.write_bytes(data)  # just written: in the page cache
    return path, data


def _leased_reader(path: Path) -> BlockReader:
    r = BlockReader(path)
    lent = r.view(0, 1)  # the lease is taken on the first view
    if lent is not None:
        r.release(0, 1)
    if not r._leased:
        r.close()
        pytest.skip(f"no read lease on {path.parent} (not Linux, no O_DIRECT, or leases off): nothing is lent")
    return r


def _count_lends(monkeypatch) -> list[bool]:
    """From now on, one entry per BlockReader.view call: whether it lent the range."""
    lent: list[bool] = []
    real = BlockReader.view

    def counting(self, offset, n, **kw):
        got = real(self, offset, n, **kw)
        lent.append(got is not None)
        return got

    monkeypatch.setattr(BlockReader, "view", counting)
    return lent


def _other_process(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)])


def test_a_cached_range_is_lent_as_it_lies_in_the_page_cache(tmp_path):
    path, data = _file(tmp_path, 3 * MIB)
    with _leased_reader(path) as r:
        before = r.lent_bytes
        for offset, n in ((0, 3 * MIB), (7, 5000), (MIB - 1, MIB + 2)):
            lent = r.view(offset, n)
            assert lent is not None and not lent.flags.writeable
            assert lent.tobytes() == data[offset:offset + n]
            r.release(offset, n)
        assert r.lent_bytes - before == 3 * MIB + 5000 + MIB + 2 and r.cached_bytes == 0
        assert r.view(3 * MIB - 10, 11) is None  # past the end: read() says EOF
        with pytest.raises(EOFError):
            r.read(3 * MIB - 10, 11, aligned_empty(BlockReader.buffer_size(11)))


def test_a_range_with_pages_missing_is_not_lent(tmp_path):
    path, data = _file(tmp_path, 4 * MIB, seed=1)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # none of it cached
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead past what is read
        for at in (0, 2, 3):  # then all but MiB 1 read (and cached) again
            os.pread(f.fileno(), MIB, at * MIB)
    with _leased_reader(path) as r:
        vec = r._residency.pages(MIB, MIB)
        if vec is None or vec.count(0) == 0:
            pytest.skip("this filesystem cannot evict the pages; nothing to tell apart")
        assert r.view(MIB // 2, MIB) is None
        buf = aligned_empty(BlockReader.buffer_size(MIB))
        assert r.read(MIB // 2, MIB, buf).tobytes() == data[MIB // 2:3 * MIB // 2]  # read() serves it
        lent = r.view(2 * MIB, MIB)
        assert lent is not None and lent.tobytes() == data[2 * MIB:3 * MIB]
        r.release(2 * MIB, MIB)


def test_truncating_waits_until_every_lent_range_is_back(tmp_path):
    """The SIGBUS case: another process truncates the file while its bytes are lent. It waits;
    the lent bytes stay readable; once they are back it goes on, and nothing is lent after."""
    path, data = _file(tmp_path, 2 * MIB, seed=2)
    r = _leased_reader(path)
    lent = r.view(MIB, MIB)
    assert lent is not None
    truncating = _other_process(TRUNCATE, path, 100)
    try:
        time.sleep(1.0)
        assert truncating.poll() is None, "the truncation did not wait for the lease"
        assert path.stat().st_size == 2 * MIB
        assert hashlib.md5(lent).hexdigest() == hashlib.md5(data[MIB:]).hexdigest()  # no SIGBUS
        assert r.view(0, MIB) is None  # someone is waiting: nothing more is lent
        r.release(MIB, MIB)
        assert truncating.wait(timeout=20) == 0
    finally:
        truncating.kill()
        truncating.wait()
    assert path.stat().st_size == 100
    assert r.view(0, 50) is None  # the lease is gone for good
    with pytest.raises(EOFError):
        r.read(0, MIB, aligned_empty(BlockReader.buffer_size(MIB)))
    r.close()


def test_closing_with_ranges_lent_keeps_the_lease_until_they_are_back(tmp_path):
    path, data = _file(tmp_path, MIB, seed=3)
    r = _leased_reader(path)
    lent = r.view(0, MIB)
    assert lent is not None
    r.close()  # e.g. the converter unwinding while a worker still quantizes from it
    truncating = _other_process(TRUNCATE, path, 0)
    try:
        time.sleep(0.5)
        assert truncating.poll() is None
        assert lent.tobytes() == data
        r.release(0, MIB)  # the last one back: the file really closes now
        assert truncating.wait(timeout=20) == 0
    finally:
        truncating.kill()
        truncating.wait()


def test_nothing_is_lent_from_a_file_someone_is_writing(tmp_path):
    """A download still being written (or a file open in an editor): no lease, so every range is
    copied by read(), which reports a file that shrinks as EOF instead of dying of it."""
    path, data = _file(tmp_path, MIB, seed=4)
    writer = os.open(path, os.O_WRONLY)
    try:
        with BlockReader(path) as r:
            assert r.view(0, MIB) is None and not r._leased
            buf = aligned_empty(BlockReader.buffer_size(MIB))
            assert r.read(0, MIB, buf).tobytes() == data
    finally:
        os.close(writer)


def test_a_reader_that_only_copies_takes_no_lease(tmp_path):
    """Checkpoint.rows() and the index reads copy: an open checkpoint never makes a writer wait."""
    path, data = _file(tmp_path, MIB, seed=6)
    with BlockReader(path) as r:
        buf = aligned_empty(BlockReader.buffer_size(MIB))
        assert r.read(0, MIB, buf).tobytes() == data
        opener = _other_process(OPEN_FOR_WRITING, path)
        assert opener.wait(timeout=10) == 0
        assert r._leased is None  # not even tried


def test_md5_hashes_lent_chunks_and_leaves_no_lease_behind(tmp_path, monkeypatch):
    path, data = _file(tmp_path, 2 * CHUNK + 12345, seed=5)
    leased = _leased_reader_possible(path)
    lent = _count_lends(monkeypatch)
    assert md5_file(path) == hashlib.md5(data).hexdigest()
    if leased:
        assert lent == [True, True, True]  # three chunks, none copied
    opener = _other_process(OPEN_FOR_WRITING, path)
    assert opener.wait(timeout=10) == 0  # would wait 45 s for a lease left behind


def test_a_failed_conversion_gives_every_lent_block_back(tmp_path, monkeypatch):
    """A conversion that stops with blocks in flight (a damaged tensor) must not leave a lease on
    the shard: the next program to write the file would wait for the kernel's 45 s."""
    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.convert import convert
    from llamalocal.convert.errors import CheckpointError
    from llamalocal.convert.sample import SampleSpec, build_sample
    from llamalocal.convert.torch_save import save_state_dict

    monkeypatch.setenv("LLAMALOCAL_CACHE", str(tmp_path / "cache"))
    model = build_sample(tmp_path / "ck", "m", SampleSpec(n_shards=2))
    shard = model / "consolidated.01.pth"
    with open_checkpoint(shard) as ck:
        sd = {n: ck.rows(n, 0, info.shape[0]) for n, info in ck.tensors.items()}
    sd["layers.2.feed_forward.w2.weight"][-1, 3] = np.nan
    save_state_dict(shard, sd, dtype="f16")
    lent = _count_lends(monkeypatch)
    with pytest.raises(CheckpointError, match="w2.weight"):
        convert(model, "q8_0", tmp_path / "out.gguf", verify=False)
    assert any(lent) or not _leased_reader_possible(shard)
    for f in (model / "consolidated.00.pth", shard):
        opener = _other_process(OPEN_FOR_WRITING, f)
        assert opener.wait(timeout=10) == 0


def _leased_reader_possible(path: Path) -> bool:
    with BlockReader(path) as r:
        lent = r.view(0, 1)
        if lent is not None:
            r.release(0, 1)
        return bool(r._leased)


def test_a_shard_truncated_mid_conversion_is_an_error_not_a_crash(tmp_path, monkeypatch):
    """Someone re-downloads (truncates) a shard while it converts: the truncation waits for the
    blocks lent from it, the converter then reads the rest itself and finds the file short --
    CheckpointError and no output -- or had everything already and writes a correct file. Without
    the lease, the lent pages would be SIGBUS, killing this test process."""
    from llamalocal.convert.convert import convert
    from llamalocal.convert.errors import CheckpointError
    from llamalocal.convert.sample import SampleSpec, build_sample

    monkeypatch.setenv("LLAMALOCAL_CACHE", str(tmp_path / "cache"))
    model = build_sample(tmp_path / "ck", "m", SampleSpec())
    shard = model / "consolidated.00.pth"
    if not _leased_reader_possible(shard):
        pytest.skip(f"no read lease on {shard.parent}: nothing is lent, read() alone is tested elsewhere")
    size = shard.stat().st_size
    truncating: list[subprocess.Popen] = []

    class TruncateOnce:
        def stage(self, name: str, total_bytes: int) -> None:
            pass

        def advance(self, nbytes: int, label: str = "") -> None:
            if not truncating:  # the first tensor written: later ones are lent or about to be
                truncating.append(_other_process(TRUNCATE, shard, size // 2))
                time.sleep(1.0)  # it now waits for the lease, with blocks lent to the workers

    out = tmp_path / "out.gguf"
    try:
        convert(model, "q8_0", out, verify=False, progress=TruncateOnce())
        assert out.stat().st_size > 0  # read whole before the truncation went through
    except CheckpointError as e:
        assert "truncated" in str(e) and not out.exists()
    finally:
        for p in truncating:
            assert p.wait(timeout=20) == 0
    assert shard.stat().st_size == size // 2
    assert not list(tmp_path.glob(".out.gguf*"))  # no partial output left either way
