"""Hostile checkpoints, class "terminal": a newline or an ANSI escape sequence in a tensor name, a
storage key, a checklist line or a folder name used to reach the terminal raw, so a file could
print a fake "Wrote ..." line, recolour or clear the screen. Every message goes through
llamalocal.cli.printable: one line, control characters escaped."""

from __future__ import annotations

import hostile
import numpy as np
import pytest
from hostile import assert_refused, run_cli, run_convert, s, state, tensor, write_shard

from llamalocal.cli import MAX_MESSAGE_CHARS, printable

base_model, model = hostile.base_model, hostile.model  # fixtures

SPOOF = "w\nWrote /home/you/llama/ggml-model-q4_0.gguf (q4_0): 6.74B parameters\x1b[2K\x1b[1A\r"


@pytest.mark.parametrize("text, shown", [
    ("plain: a/b c.pth", "plain: a/b c.pth"),
    ("é ü 中文 — fine", "é ü 中文 — fine"),
    ("two\nlines", "two\\nlines"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("tab\there\rcr", "tab\\there\\rcr"),
    ("bell\x07 nul\x00 del\x7f", "bell\\x07 nul\\x00 del\\x7f"),
    ("c1 \x9b2J", "c1 \\x9b2J"),  # the 8-bit CSI
    ("rtl \u202eexe.txt", "rtl \\u202eexe.txt"),  # a bidi override flips what follows
    ("ls \u2028 ps \u2029", "ls \\u2028 ps \\u2029"),
    ("not utf-8: \udcff\udcfe", "not utf-8: \\xff\\xfe"),  # surrogateescape'd bytes of a file name
])
def test_printable(text, shown):
    assert printable(text) == shown


def test_printable_cuts_a_huge_message():
    out = printable("x" * 10**6)
    assert len(out) < MAX_MESSAGE_CHARS + 50 and out.endswith("more characters)")


def _assert_not_spoofed(message: str) -> None:
    assert "\x1b" not in message and "\r" not in message
    assert "\\nWrote" in message  # the fake line is visible as what it is, inside the one error line


def test_tensor_name_with_a_fake_line(model):
    """A tensor whose message prints its name as is (an unsupported dtype)."""
    write_shard(model, state((s(SPOOF), tensor(cls="IntStorage", numel=4))), {"0": bytes(16)})
    _assert_not_spoofed(assert_refused(run_convert(model), "dtype torch.int32", clean=(model.parent,)))


def test_unknown_tensor_name_with_a_fake_line(model):
    """A well-formed shard whose extra tensor has the fake line as its name."""
    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.torch_save import save_state_dict

    f = model / "consolidated.00.pth"
    with open_checkpoint(f) as ck:
        sd = {n: ck.rows(n) for n in ck.tensors}
    sd[SPOOF] = np.zeros(4, np.float32)
    f.unlink()
    save_state_dict(f, sd)
    message = assert_refused(run_convert(model), "unknown tensor names", clean=(model.parent,))
    assert "\x1b" not in message


def test_storage_key_with_escapes(model):
    write_shard(model, state((s("w"), tensor(key="0\x1b]0;pwned\x07\n"))), {})
    message = assert_refused(run_convert(model), "is missing", clean=(model.parent,))
    assert "\x1b" not in message and "\x07" not in message


def test_checklist_line_with_escapes(model):
    with open(model / "checklist.chk", "a") as f:
        f.write("not an md5 \x1b[2J\x1b[H cleared your screen\n")
    message = assert_refused(run_convert(model, verify=True), "not an md5sum line", clean=(model.parent,))
    assert "\x1b" not in message


def test_folder_name_with_escapes_in_warnings_and_summary(model):
    """A successful conversion prints a warning (no checklist) and the summary with the folder's name
    in them: escaped too."""
    odd = model.parent / "7B\x1b[31m\nWrote nothing"
    model.rename(odd)
    (odd / "checklist.chk").unlink()
    r = run_cli(["convert", odd, "--q4_0"], timeout=120)
    assert r.code == 0, r.describe()
    text = r.stderr
    assert "\x1b[31m" not in text
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.startswith(("Warning", "Wrote"))]
    assert len(lines) == 2 and all("7B\\x1b[31m\\nWrote nothing" in ln for ln in lines), r.describe()


def test_a_c_librarys_own_print_does_not_add_a_line(model):
    """ggml_validate_row_data fprintf()s each bad block it finds; the CLI's own line says it."""
    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.torch_save import save_state_dict

    f = model / "consolidated.00.pth"
    with open_checkpoint(f) as ck:
        sd = {n: ck.rows(n) for n in ck.tensors}
    sd["layers.1.attention.wk.weight"][3, 5] = 3e38  # finite in f32; its q8_0 block scale is not in f16
    f.unlink()
    save_state_dict(f, sd, dtype="f32")
    r = hostile.run_cli(["convert", model, "--q8_0", "--quiet", "--no-verify"])
    assert_refused(r, "layers.1.attention.wk.weight", "overflow to infinity", clean=(model.parent,))
