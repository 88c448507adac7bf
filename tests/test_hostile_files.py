"""Hostile checkpoints, class "file system": what a model folder holds under a file's name may be
a symlink planted where the converter writes its partial output (the victim would be overwritten
with the GGUF), a FIFO (the read would wait for ever), a symlink to /dev/zero (the read would never
end), a socket or a directory. The partial file is created O_CREAT | O_EXCL | O_NOFOLLOW and only
a stale partial that is provably ours is removed; inputs must be regular files."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys

import hostile
import pytest
from hostile import assert_refused, leftovers, run_convert

base_model, model = hostile.base_model, hostile.model  # fixtures

PARTIAL = ".ggml-model-q4_0.gguf.partial"
PRECIOUS = b"the user's precious file\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(PRECIOUS)
    return path


def test_writing_through_a_planted_symlink_is_real(tmp_path, victim):
    """Control: opening the partial name for writing the ordinary way (as gguf-py's writer does)
    follows the link and truncates the victim."""
    link = tmp_path / PARTIAL
    link.symlink_to(victim)
    with open(link, "wb") as f:
        f.write(b"GGUF")
    assert victim.read_bytes() == b"GGUF"


def test_planted_partial_symlink_is_not_followed(model, victim):
    (model / PARTIAL).symlink_to(victim)
    assert_refused(run_convert(model), PARTIAL, "is a symlink")
    assert victim.read_bytes() == PRECIOUS
    assert (model / PARTIAL).is_symlink()  # not ours: left as it was


def test_planted_dangling_symlink_is_not_followed(model, tmp_path):
    target = tmp_path / "created-by-the-link.txt"
    (model / PARTIAL).symlink_to(target)
    assert_refused(run_convert(model), "is a symlink")
    assert not target.exists()


def test_planted_hard_link_is_not_reused(model, victim):
    os.link(victim, model / PARTIAL)
    assert_refused(run_convert(model), "has other hard links")
    assert victim.read_bytes() == PRECIOUS


@pytest.mark.parametrize("content", [b"", b"GG", b"GGUF\x03\x00\x00\x00 a partial llamalocal left"])
def test_stale_partial_of_ours_is_replaced(model, content):
    """A killed conversion's leftover (a regular file of ours with a GGUF header, or nothing yet)."""
    (model / PARTIAL).write_bytes(content)
    r = run_convert(model, timeout=120)
    assert r.code == 0, r.describe()
    assert leftovers(model.parent) == [str(model / "ggml-model-q4_0.gguf")]


def test_other_file_under_the_partial_name_is_kept(model):
    (model / PARTIAL).write_bytes(PRECIOUS)
    assert_refused(run_convert(model), "is not a GGUF file")
    assert (model / PARTIAL).read_bytes() == PRECIOUS


def test_directory_under_the_partial_name(model):
    (model / PARTIAL).mkdir()
    assert_refused(run_convert(model), "is not a regular file")


def test_partial_of_a_live_conversion_is_left_alone(model):
    """Another converter holds its partial file's lock: this one says so and touches nothing."""
    path = model / PARTIAL
    path.write_bytes(b"GGUF")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert_refused(run_convert(model), "another llamalocal convert is writing")
        assert path.read_bytes() == b"GGUF"
    finally:
        os.close(fd)


def test_planted_output_symlink_is_replaced_not_followed(model, victim):
    out = model / "ggml-model-q4_0.gguf"
    out.symlink_to(victim)
    assert_refused(run_convert(model), "already exists", "--force")
    r = run_convert(model, "--force", timeout=120)
    assert r.code == 0, r.describe()
    assert victim.read_bytes() == PRECIOUS
    assert out.is_file() and not out.is_symlink() and out.read_bytes()[:4] == b"GGUF"


# ---------------------------------------------------------------------------------------------
# Special files as inputs
# ---------------------------------------------------------------------------------------------

def _fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _dev_zero(path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _directory(path):
    path.unlink(missing_ok=True)
    path.mkdir()


def _socket(path):
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    _socket.keep = sock  # type: ignore[attr-defined]  # open until the test ends


SPECIAL = {"fifo": (_fifo, "FIFO"), "dev_zero": (_dev_zero, "character device"),
           "directory": (_directory, "directory"), "socket": (_socket, "consolidated.00.pth")}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_special_shard(model, kind):
    make, needle = SPECIAL[kind]
    make(model / "consolidated.00.pth")
    assert_refused(run_convert(model), "consolidated.00.pth", needle, max_seconds=10)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
@pytest.mark.parametrize("name", ["params.json", "../tokenizer.model", "checklist.chk", "../tokenizer_checklist.chk"])
def test_special_small_input(model, name, kind):
    make, needle = SPECIAL[kind]
    make(model / name)
    r = run_convert(model, verify=name.endswith(".chk"))
    if name.endswith("tokenizer.model"):
        needle = "no tokenizer.model"  # looked for as a regular file, and not found
    assert_refused(r, needle, max_seconds=10)


def test_checklist_listing_a_fifo(model):
    _fifo(model / "extra.bin")
    with open(model / "checklist.chk", "a") as f:
        f.write(f"{'0' * 32}  extra.bin\n")
    assert_refused(run_convert(model, verify=True), "extra.bin", "FIFO", max_seconds=10)


def test_shard_symlinked_to_a_regular_file_converts(model, tmp_path):
    """Links to plain files are fine (a download manager's cache keeps blobs and links to them)."""
    blob = tmp_path / "blob"
    (model / "consolidated.00.pth").rename(blob)
    (model / "consolidated.00.pth").symlink_to(blob)
    r = run_convert(model, timeout=120)
    assert r.code == 0, r.describe()


def test_open_input_never_blocks_on_a_fifo(tmp_path):
    """Directly: opening a FIFO for reading returns at once (O_NONBLOCK) and is refused."""
    code = ("import sys; from llamalocal.convert.inputs import open_input; from llamalocal.errors import "
            "BadInputError\ntry:\n open_input(sys.argv[1])\nexcept BadInputError as e:\n print(e)")
    _fifo(tmp_path / "f")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True, timeout=20)
    assert "is a FIFO (named pipe), not a regular file" in r.stdout, r
