"""Verifying Meta's `checklist.chk` / `tokenizer_checklist.chk` (md5sum format) before converting.

Each line is `<md5>  <name>` (or `<md5> *<name>`, md5sum's binary mode), names relative to the
file's folder. Files are hashed in 8 MiB chunks, so memory stays flat for 16 GB shards.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from llamalocal.errors import BadInputError, ChecksumError

CHUNK = 8 * 2**20
_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


def read_checklist(path: Path) -> dict[str, str]:
    """name -> md5 (lower case) from an md5sum-format file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist; pass --no-verify to skip the md5 check") from None
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
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BadInputError(f"{path}:{n}: {name!r} points outside its folder")
        sums[name] = md5
    return sums


def md5_file(path: Path, progress: Callable[[int], object] | None = None) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def verify_checklist(directory: str | Path, files: list[str] | None = None,
                     progress: Callable[[int], object] | None = None,
                     checklist: str = "checklist.chk") -> list[str]:
    """Check files in `directory` against the md5 sums in `directory/checklist`.

    Args:
        directory: the folder holding the checklist and the files it lists.
        files: only these names (each must be listed); default every listed file.
        progress: called with the byte count of each chunk hashed, for a progress bar.
        checklist: the list's file name (`tokenizer_checklist.chk` beside tokenizer.model).
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
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise BadInputError(f"{directory}: {', '.join(missing)} listed in {checklist} but missing; "
                            "download the missing files")
    for name in names:
        got = md5_file(directory / name, progress)
        if got != sums[name]:
            raise ChecksumError(f"{directory / name}: md5 {got} does not match {checklist} ({sums[name]}); "
                                "the file is damaged or incomplete, download it again")
    return names
