"""convert.checklist: md5 lists in Meta's download folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import llamalocal.convert.checklist as checklist
from llamalocal.convert.checklist import read_checklist, verify_checklist
from llamalocal.errors import BadInputError, ChecksumError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "fixtures" / "meta-tiny"
needs_shared = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} (torch-written fixtures) not present")


def _folder(tmp_path: Path, files: dict[str, bytes], listing: str = "checklist.chk", star: bool = False) -> Path:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sep = " *" if star else "  "
    (tmp_path / listing).write_text("".join(f"{hashlib.md5(d).hexdigest()}{sep}{n}\n" for n, d in files.items()))
    return tmp_path


FILES = {"consolidated.00.pth": b"a" * 5000, "consolidated.01.pth": b"b" * 3000, "params.json": b'{"dim": 8}'}


def test_verifies_and_reports_progress(tmp_path):
    d = _folder(tmp_path, FILES)
    seen: list[int] = []
    assert verify_checklist(d, progress=seen.append) == list(FILES)
    assert sum(seen) == sum(len(b) for b in FILES.values())


def test_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(checklist, "CHUNK", 1024)
    d = _folder(tmp_path, FILES)
    seen: list[int] = []
    verify_checklist(d, files=["consolidated.00.pth"], progress=seen.append)
    assert seen == [1024] * 4 + [5000 - 4096]


def test_mismatch_names_the_file(tmp_path):
    d = _folder(tmp_path, FILES)
    (d / "consolidated.01.pth").write_bytes(b"b" * 2999)  # one byte short
    with pytest.raises(ChecksumError, match="consolidated.01.pth: md5 .* does not match checklist.chk"):
        verify_checklist(d)
    verify_checklist(d, files=["consolidated.00.pth", "params.json"])  # the others are fine


def test_missing_listed_file(tmp_path):
    d = _folder(tmp_path, FILES)
    (d / "consolidated.00.pth").unlink()
    with pytest.raises(BadInputError, match="consolidated.00.pth listed in checklist.chk but missing"):
        verify_checklist(d)


def test_file_not_in_the_list(tmp_path):
    d = _folder(tmp_path, FILES)
    with pytest.raises(BadInputError, match="consolidated.02.pth not listed"):
        verify_checklist(d, files=["consolidated.02.pth"])


def test_binary_mode_upper_case_and_blank_lines(tmp_path):
    d = _folder(tmp_path, FILES, listing="tokenizer_checklist.chk", star=True)
    p = d / "tokenizer_checklist.chk"
    p.write_text(p.read_text().upper().replace("CONSOLIDATED", "consolidated").replace("PARAMS.JSON", "params.json")
                 .replace(".PTH", ".pth") + "\n\n")
    assert read_checklist(p)["params.json"] == hashlib.md5(FILES["params.json"]).hexdigest()
    assert verify_checklist(d, checklist="tokenizer_checklist.chk") == list(FILES)


@pytest.mark.parametrize("line, message", [
    ("not an md5 line", "not an md5sum line"),
    (f"{'0' * 32}  ../etc/passwd", "points outside its folder"),
])
def test_malformed_checklist(tmp_path, line, message):
    (tmp_path / "checklist.chk").write_text(line + "\n")
    with pytest.raises(BadInputError, match=message):
        verify_checklist(tmp_path)


def test_missing_checklist(tmp_path):
    with pytest.raises(BadInputError, match="checklist.chk does not exist"):
        verify_checklist(tmp_path)


@needs_shared
@pytest.mark.parametrize("folder, listing", [("tiny-v1", "checklist.chk"), ("tiny-v2", "checklist.chk"),
                                             (".", "tokenizer_checklist.chk")])
def test_real_fixture_checklists(folder, listing):
    names = verify_checklist(TINY / folder, checklist=listing)
    assert names and all((TINY / folder / n).is_file() for n in names)
