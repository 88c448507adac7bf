"""verified: a download hashed once is not hashed again until it changes."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from click.testing import CliRunner

from llamalocal.cli import main
from llamalocal.convert import checklist, verified
from llamalocal.convert.convert import convert
from llamalocal.errors import ChecksumError


@pytest.fixture
def model(tiny_checkpoints, tmp_path, monkeypatch):
    """A private copy of tiny-v2 + tokenizer, and a private record of verified files."""
    root = tmp_path / "dl"
    root.mkdir()
    shutil.copytree(tiny_checkpoints / "tiny-v2", root / "tiny-v2")
    for f in ("tokenizer.model", "tokenizer_checklist.chk"):
        shutil.copy(tiny_checkpoints / f, root / f)
    monkeypatch.setenv(verified.CACHE_ENV, str(tmp_path / "cache"))
    return root / "tiny-v2"


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files md5_file actually reads."""
    seen: list[str] = []
    real = checklist.md5_file

    def spy(path, *a, **kw):
        seen.append(os.path.basename(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(checklist, "md5_file", spy)
    return seen


def test_second_conversion_hashes_nothing(model, tmp_path, hashed):
    first = convert(model, "q8_0", tmp_path / "a.gguf")
    assert sorted(hashed) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert any("checked by md5 now" in n for n in first.notes)
    hashed.clear()
    second = convert(model, "q4_0", tmp_path / "b.gguf")
    assert hashed == []
    assert any("3 of 3 files taken as verified" in n or "2 of 2 files taken as verified" in n for n in second.notes)
    assert not any("checked by md5 now" in n for n in second.notes)


def test_touched_or_rewritten_files_are_hashed_again(model, tmp_path, hashed):
    convert(model, "q8_0", tmp_path / "a.gguf")
    params = model / "params.json"
    st = os.stat(params)
    os.utime(params, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    hashed.clear()
    convert(model, "q8_0", tmp_path / "b.gguf")
    assert hashed == ["params.json"]

    # same size, same mtime restored, different bytes: the ctime still tells
    shard = model / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    st = os.stat(shard)
    data[-100] ^= 0xFF
    time.sleep(0.01)
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_size == st.st_size and os.stat(shard).st_mtime_ns == st.st_mtime_ns
    hashed.clear()
    with pytest.raises(ChecksumError):
        convert(model, "q8_0", tmp_path / "c.gguf")
    assert "consolidated.00.pth" in hashed
    assert not (tmp_path / "c.gguf").exists()


def test_a_checklist_with_another_md5_is_not_taken_on_trust(model, tmp_path, hashed):
    convert(model, "q8_0", tmp_path / "a.gguf")
    chk = model / "checklist.chk"
    lines = chk.read_text().splitlines()
    lines = [("0" * 32 + line[32:]) if line.endswith("params.json") else line for line in lines]
    chk.write_text("\n".join(lines) + "\n")
    hashed.clear()
    with pytest.raises(ChecksumError, match="params.json"):
        convert(model, "q8_0", tmp_path / "b.gguf")
    assert hashed == ["params.json"]


def test_verify_flag_hashes_everything_and_the_summary_says_why(model, tmp_path, hashed):
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(model), "--q8_0", "-o", str(tmp_path / "a.gguf")])
    assert r.exit_code == 0, r.output
    hashed.clear()
    r = runner.invoke(main, ["convert", str(model), "--q8_0", "-o", str(tmp_path / "b.gguf")])
    assert r.exit_code == 0, r.output
    assert hashed == [] and "taken as verified" in r.output and "unchanged since" in r.output
    r = runner.invoke(main, ["convert", str(model), "--q8_0", "--verify", "-o", str(tmp_path / "c.gguf")])
    assert r.exit_code == 0, r.output
    assert sorted(hashed) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    r = runner.invoke(main, ["convert", str(model), "--q8_0", "--verify", "--no-verify", "-o", str(tmp_path / "d.gguf")])
    assert r.exit_code == 2


def test_a_damaged_record_is_ignored(model, tmp_path, hashed):
    convert(model, "q8_0", tmp_path / "a.gguf")
    (verified.cache_dir() / verified.RECORD).write_text("{not json")
    hashed.clear()
    convert(model, "q8_0", tmp_path / "b.gguf")
    assert len(hashed) == 3


def test_quantizing_yields_to_md5_only_while_it_runs():
    """Blocks read while md5 runs go to threads niced +10 (Linux); after it, to threads at the
    caller's priority (niceness cannot be lowered again, so these are other threads)."""
    import os
    import sys
    import threading
    from concurrent.futures import Future

    import pytest

    from llamalocal.convert.convert import _Hashing, _lower_thread_priority

    md5: Future = Future()
    hashing = _Hashing([md5])
    assert hashing.running
    md5.set_result([])
    assert not hashing.running
    assert not _Hashing([]).running  # nothing to hash: --no-verify, or all verified before
    if sys.platform != "linux":
        pytest.skip("per-thread niceness is Linux's")
    seen: dict[str, int] = {}

    def worker() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        _lower_thread_priority()
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - before

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["delta"] == min(10, 19 - main_before)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_concurrent_records_lose_nothing(tmp_path):
    """Two checklists are hashed on two threads, and conversions may run side by side: every
    remember() lands in the record."""
    import threading

    record = tmp_path / "cache" / verified.RECORD
    files = []
    for i in range(16):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x" * i)
        files.append(f)
    threads = [threading.Thread(target=verified.remember, args=({f: f"{i:032x}"}, record))
               for i, f in enumerate(files)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(verified.verified_on(f, f"{i:032x}", record) for i, f in enumerate(files))
