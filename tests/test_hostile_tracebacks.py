"""Hostile checkpoints, class "tracebacks": inputs that used to end in a Python traceback and exit
code 1 — zip records compressed or encrypted, bad version fields, negative offsets, names that
are not UTF-8, a tokenizer with no BOS piece, a folder whose name is not UTF-8. Each is now one
line, exit 2 (or, for the folder name, a normal conversion). A real bug still shows a traceback."""

from __future__ import annotations

import os
import struct

import hostile
import numpy as np
import pytest
from hostile import (
    assert_refused,
    central_entries,
    leftovers,
    patch_record,
    run_convert,
    s,
    shift_directory,
    state,
    tensor,
    write_shard,
)

base_model, model = hostile.base_model, hostile.model  # fixtures

F32x4 = {"0": np.arange(4, dtype="<f4").tobytes()}


def one_tensor_shard(model_dir):
    return write_shard(model_dir, state((s("w"), tensor())), F32x4)


@pytest.mark.parametrize("record", ["data.pkl", "data/0", "byteorder"])
@pytest.mark.parametrize("method", [1, 8, 9, 99])
def test_compressed_record(model, record, method):
    patch_record(one_tensor_shard(model), record, compress_type=method)
    assert_refused(run_convert(model), f"compressed (zip method {method})", clean=(model.parent,))


@pytest.mark.parametrize("record", ["data.pkl", "data/0"])
def test_encrypted_record(model, record):
    patch_record(one_tensor_shard(model), record, flag_bits=0x0809)
    assert_refused(run_convert(model), "encrypted", clean=(model.parent,))


@pytest.mark.parametrize("version", [63 + 1, 0xFFFF])
def test_version_needed_beyond_zipfile(model, version):
    patch_record(one_tensor_shard(model), "data.pkl", extract_version=version)
    assert_refused(run_convert(model), "consolidated.00.pth", clean=(model.parent,))


def test_negative_header_offsets(model):
    shift_directory(one_tensor_shard(model), 10**6)
    assert_refused(run_convert(model), "consolidated.00.pth", clean=(model.parent,))


def test_header_offset_past_the_end(model):
    patch_record(one_tensor_shard(model), "data/0", header_offset=0xFFFFFFF0)
    assert_refused(run_convert(model), "consolidated.00.pth", clean=(model.parent,))


@pytest.mark.parametrize("field, value, needle", [
    ("crc", 0x12345678, "CRC"),
    ("compress_size", 5, "two sizes differ"),
    ("file_size", 0x7FFFFFFF, "consolidated.00.pth"),
])
def test_pickle_record_fields(model, field, value, needle):
    patch_record(one_tensor_shard(model), "data.pkl", **{field: value})
    assert_refused(run_convert(model), needle, clean=(model.parent,))


def test_record_name_flagged_utf8_but_not(model):
    path = one_tensor_shard(model)
    data = bytearray(path.read_bytes())
    at = central_entries(bytes(data))["consolidated.00/version"]
    data[at + 46:at + 46 + 2] = b"\xff\xfe"  # flag bit 11 (UTF-8) is set on every torch record
    path.write_bytes(bytes(data))
    assert_refused(run_convert(model), "consolidated.00.pth", clean=(model.parent,))


def test_corrupt_zip64_extra(model):
    path = one_tensor_shard(model)
    data = bytearray(path.read_bytes())
    at = central_entries(bytes(data))["consolidated.00/data/0"]
    name_len, extra_len = struct.unpack_from("<HH", data, at + 28)
    struct.pack_into("<I", data, at + 24, 0xFFFFFFFF)  # "size is in the zip64 extra" ...
    struct.pack_into("<HH", data, at + 46 + name_len, 1, 2)  # ... which is 2 bytes long
    path.write_bytes(bytes(data))
    assert_refused(run_convert(model), "consolidated.00.pth", clean=(model.parent,))


def _tokenizer_without(model_dir, **ids) -> None:
    import io

    import sentencepiece as spm

    from llamalocal.convert.sample import _corpus, _quiet_stderr

    out = io.BytesIO()
    settings = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1) | ids
    with _quiet_stderr():
        spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=out, vocab_size=400,
                                       model_type="bpe", byte_fallback=True, num_threads=1, **settings)
    (model_dir.parent / "tokenizer.model").write_bytes(out.getvalue())


@pytest.mark.parametrize("missing, needle", [({"bos_id": -1}, "no BOS"), ({"eos_id": -1}, "no EOS")])
def test_tokenizer_without_bos_or_eos(model, missing, needle):
    _tokenizer_without(model, **missing)
    assert_refused(run_convert(model), "tokenizer.model", needle, clean=(model.parent,))


def test_folder_name_that_is_not_utf8(model):
    """A folder named with a byte that is not UTF-8 converts; the name is escaped where it is shown
    and replaced in the GGUF's general.name (which must be UTF-8)."""
    import gguf

    odd = model.parent / os.fsdecode(b"7B-\xff")
    model.rename(odd)
    r = hostile.run_cli(["convert", odd, "--q4_0", "--no-verify"], timeout=120)
    assert r.code == 0, r.describe()
    assert "Traceback" not in r.stderr
    wrote = [line for line in r.stderr.splitlines() if "Wrote" in line]
    assert len(wrote) == 1 and "7B-\\xff/ggml-model-q4_0.gguf" in wrote[0], r.describe()
    reader = gguf.GGUFReader(odd / "ggml-model-q4_0.gguf")
    field = reader.fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == "7B-\ufffd"


def test_bad_file_in_a_folder_that_is_not_utf8(model):
    odd = model.parent / os.fsdecode(b"7B-\xff\x1b[31m")
    model.rename(odd)
    (odd / "consolidated.00.pth").write_bytes(b"junk")
    message = assert_refused(run_convert(odd), "7B-\\xff\\x1b[31m", clean=(odd.parent,))
    assert "\x1b" not in message


def test_a_real_bug_still_shows_a_traceback(model, monkeypatch):
    """The one-line treatment is for the input's faults only: an exception that is not a
    LlamalocalError propagates (CliRunner keeps it; the real CLI prints its traceback, exit 1)."""
    from click.testing import CliRunner

    import llamalocal.convert.convert as cc
    from llamalocal.cli import main

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cc, "_plan_tensors", broken)
    r = CliRunner().invoke(main, ["convert", str(model), "--q4_0", "--no-verify", "--quiet"])
    assert isinstance(r.exception, ZeroDivisionError), r.output
    assert r.exit_code == 1
    assert leftovers(model.parent) == []
