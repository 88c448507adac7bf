"""Files already verified against checklist.chk, remembered so they are not hashed again.

Converting one download to a second preset would otherwise re-hash all of it (13 GB for 7B,
130 GB for 65B). After a file's md5 matched, its identity — resolved path, size, mtime, ctime,
inode and device, as git's index records a file — is stored with that md5 in the user's cache.
A later check takes the file as verified only if every one of those is unchanged and the
checklist still lists the same md5; touching, rewriting, replacing or moving the file makes it
hashed again. `--verify` ignores the record.

The record is a small JSON file: $LLAMALOCAL_CACHE/verified.json (default
$XDG_CACHE_HOME/llamalocal, else ~/.cache/llamalocal), written atomically. Its read-modify-write
is serialised, between the two hashing threads of one conversion and between conversions running
side by side (a lock file), so no run's entries are lost to another's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_ENV = "LLAMALOCAL_CACHE"
RECORD = "verified.json"
_VERSION = 1
_LOCK = threading.Lock()


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llamalocal"


@dataclass(frozen=True)
class Stamp:
    """What identifies a file's contents without reading them."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def _load(record: Path) -> dict[str, dict]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}  # no record yet, or a damaged one: nothing is taken as verified
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def verified_on(path: Path, md5: str, record: Path | None = None) -> str | None:
    """When `path` was verified to have `md5` (an ISO date), if it has not changed since; else None."""
    entry = _load(record or cache_dir() / RECORD).get(_key(path))
    if not isinstance(entry, dict):
        return None
    try:
        now = Stamp.of(path)
    except OSError:
        return None
    if entry.get("md5") != md5.lower() or entry.get("stamp") != asdict(now):
        return None
    return str(entry.get("when", "earlier"))


def remember(files: dict[Path, str], record: Path | None = None) -> None:
    """Record that each of `files` (path -> md5) matched its checklist just now. Best effort: a
    cache that cannot be written only means hashing again next time."""
    record = record or cache_dir() / RECORD
    with contextlib.suppress(OSError), _LOCK:
        record.parent.mkdir(parents=True, exist_ok=True)
        with _locked(record.with_name(record.name + ".lock")):
            _update(record, files)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path` where the platform has one (POSIX)."""
    try:
        import fcntl
    except ImportError:  # Windows: the in-process lock is all there is
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _update(record: Path, files: dict[Path, str]) -> None:
    entries = _load(record)
    when = datetime.date.today().isoformat()
    for path, md5 in files.items():
        entries[_key(path)] = {"md5": md5.lower(), "stamp": asdict(Stamp.of(path)), "when": when}
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".verified.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _VERSION, "files": entries}, f)
        os.replace(tmp, record)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
