"""`llamalocal imatrix` and `convert --calibrate` from the command line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the model")

import gguf  # noqa: E402

from llamalocal.cli import main  # noqa: E402
from llamalocal.convert.imatrix_file import read_imatrix  # noqa: E402


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture
def text_file(heldout_text, tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(heldout_text)
    return p


def test_writes_gguf_and_legacy_dat(converted, text_file, tmp_path):
    model = converted("tiny-v1", "f16")
    code, out = run("imatrix", model, "-f", text_file, "-o", tmp_path / "m.gguf", "--ctx", 64, "--chunks", 2,
                    "--threads", 2)
    assert code == 0, out
    assert "Wrote" in out and "28 weights, 2 chunks of 64 tokens" in out
    imx = read_imatrix(tmp_path / "m.gguf")
    assert len(imx.entries) == 28 and imx.chunk_count == 2 and imx.datasets == [str(text_file)]
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.type"].contents() == "imatrix"

    code, out = run("imatrix", model, "-f", text_file, "-o", tmp_path / "m.dat", "--ctx", 64, "--chunks", 2, "-q")
    assert code == 0 and out == "", out
    assert read_imatrix(tmp_path / "m.dat").legacy
    code, out = run("imatrix", model, "-f", text_file, "-o", tmp_path / "x.bin", "--ctx", 64, "--chunks", 1, "-q",
                    "--output-format", "dat")
    assert code == 0 and read_imatrix(tmp_path / "x.bin").legacy


def test_refuses_to_overwrite_and_short_text(converted, text_file, tmp_path):
    model = converted("tiny-v1", "f16")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    code, out = run("imatrix", model, "-f", text_file, "-o", target, "--ctx", 64, "--chunks", 1)
    assert code == 2 and "already exists" in out and target.read_bytes() == b"keep me"
    code, out = run("imatrix", model, "-f", text_file, "-o", target, "--ctx", 64, "--chunks", 1, "--force", "-q")
    assert code == 0 and read_imatrix(target).chunk_count == 1

    short = tmp_path / "short.txt"
    short.write_text("Not nearly enough text.")
    code, out = run("imatrix", model, "-f", short, "-o", tmp_path / "s.gguf")
    # (the placement plan comes first, as for `perplexity`: the text is tokenized by the model)
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and "needs at least 1024" in errors[0] and "Traceback" not in out, out
    assert not (tmp_path / "s.gguf").exists()
    code, out = run("imatrix", model, "-f", tmp_path / "missing.txt", "-o", tmp_path / "s.gguf")
    assert code == 2 and "no text file" in out


@pytest.mark.parametrize("save_partial", [False, True])
def test_ctrl_c_keeps_the_completed_chunks_only_when_asked(converted, text_file, tmp_path, monkeypatch, save_partial):
    from llamalocal import imatrix as mod

    real = mod.compute_imatrix

    def interrupted(*args, **kwargs):
        done = real(*args, **{**kwargs, "chunks": 2})
        raise mod.Interrupted(done)

    monkeypatch.setattr(mod, "compute_imatrix", interrupted)
    target = tmp_path / "m.gguf"
    args = ["imatrix", converted("tiny-v1", "f16"), "-f", text_file, "-o", target, "--ctx", 64]
    code, out = run(*args, *(["--save-partial"] if save_partial else []))
    assert code == 130, out
    if save_partial:
        assert "wrote the 2 completed chunks" in out and read_imatrix(target).chunk_count == 2
    else:
        assert "nothing written" in out and not target.exists()
    assert list(tmp_path.glob(".*partial")) == []


def test_a_real_sigint_mid_run(converted, text_file, tmp_path):
    """SIGINT lands while llama.cpp computes (in the eval callback, in Python): exit 130, no traceback,
    and --save-partial keeps the windows completed before it."""
    target = tmp_path / "m.gguf"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamalocal", "imatrix", str(converted("tiny-v1", "f32")), "-f", str(text_file),
         "-o", str(target), "--ctx", "64", "--threads", "1", "--save-partial"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), b"")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and b"chunk" not in b"".join(err) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.skip("the run finished before the signal could be sent")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=5)
    text = b"".join(err).decode(errors="replace")
    # 348 windows: still running when the signal came, so exit 0 would be an interrupt lost in the callback
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert "Interrupted" in text
    if target.exists():
        assert read_imatrix(target).chunk_count >= 1
    assert list(tmp_path.glob(".*partial")) == []


# ---------------------------------------------------------------------------------------------
# convert --calibrate


@pytest.fixture
def checkpoint(tiny_checkpoints, tmp_path):
    """A private copy of tiny-v1 (calibration writes beside the checkpoint)."""
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints / "tiny-v1", root / "tiny-v1")
    shutil.copy(tiny_checkpoints / "tokenizer.model", root / "tokenizer.model")
    if (tiny_checkpoints / "tokenizer_checklist.chk").exists():
        shutil.copy(tiny_checkpoints / "tokenizer_checklist.chk", root / "tokenizer_checklist.chk")
    return root / "tiny-v1"


def test_calibrate_makes_a_base_then_reuses_the_imatrix(checkpoint, text_file, tmp_path):
    out = tmp_path / "cal.gguf"
    code, log = run("convert", checkpoint, "--q4_k_m", "--calibrate", text_file, "--calibrate-chunks", 2, "-o", out)
    assert code == 0, log
    assert "converting to q8_0 first" in log and "GiB" in log  # says so, and what it costs
    assert (checkpoint / "ggml-model-q8_0.gguf").is_file()
    imx_file = checkpoint / "imatrix-calib-2chunks.gguf"
    assert read_imatrix(imx_file).chunk_count == 2
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["quantize.imatrix.file"].contents() == str(imx_file)
    assert fields["quantize.imatrix.dataset"].contents() == str(text_file)
    assert "imatrix for 28 tensors" in log
    # the imatrix is the newest .gguf beside the checkpoint, but "the newest model" is still a model
    from llamalocal.paths import resolve_gguf

    assert resolve_gguf(checkpoint) == checkpoint / "ggml-model-q8_0.gguf"

    before = imx_file.stat().st_mtime_ns
    code, log = run("convert", checkpoint, "--q3_k_m", "--calibrate", text_file, "--calibrate-chunks", 2,
                    "-o", tmp_path / "again.gguf")
    assert code == 0, log
    assert "using the imatrix made earlier" in log and imx_file.stat().st_mtime_ns == before
    assert "converting to" not in log  # the q8_0 made the first time is there now


def test_calibrate_uses_an_f16_beside_the_checkpoint(checkpoint, text_file, tmp_path):
    code, log = run("convert", checkpoint, "--f16", "-q")
    assert code == 0, log
    code, log = run("convert", checkpoint, "--iq2_xs", "--calibrate", text_file, "--calibrate-chunks", 2,
                    "-o", tmp_path / "iq2.gguf")
    assert code == 0, log
    assert "converting to" not in log and "ggml-model-f16.gguf" in log
    assert not (checkpoint / "ggml-model-q8_0.gguf").exists()


def test_calibrate_refuses_early(checkpoint, text_file, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    code, log = run("convert", checkpoint, "--q4_k_m", "--calibrate", text_file, "-o", out)
    assert code == 2 and "already exists" in log and not (checkpoint / "ggml-model-q8_0.gguf").exists()
    code, log = run("convert", checkpoint, "--f16", "--calibrate", text_file, "-o", tmp_path / "y.gguf")
    assert code == 2 and "quantized presets" in log
    code, log = run("convert", checkpoint, "--q4_k_m", "--calibrate", text_file, "--imatrix", text_file)
    assert code == 2 and "not both" in log
    code, log = run("convert", checkpoint, "--q4_k_m", "--calibrate", tmp_path / "nope.txt", "-o", tmp_path / "z.gguf")
    assert code == 2 and "no text file" in log and not (checkpoint / "ggml-model-q8_0.gguf").exists()
