"""`llamalocal convert` from the command line: bad input gives one line, exit code 2, no file left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from llamalocal.cli import main
from llamalocal.convert.params import ModelParams
from llamalocal.convert.sample import SampleSpec, build_sample


@pytest.fixture
def sample(tmp_path):
    p = ModelParams(dim=64, n_layers=2, n_heads=2, multiple_of=32, norm_eps=1e-6)
    return build_sample(tmp_path / "models", "7B", SampleSpec(params=p, n_shards=2, vocab_size=400))


def run(*args, env=None):
    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return r.exit_code, r.output


def ggufs(folder):
    return sorted(p.name for p in folder.rglob("*") if ".gguf" in p.name)


def test_convert_by_name_under_models_dir(sample):
    code, out = run("convert", "7B", "--q4_0", "--models-dir", sample.parent, "--quiet")
    assert code == 0, out
    assert ggufs(sample) == ["ggml-model-q4_0.gguf"]


def test_models_dir_from_environment(sample):
    code, out = run("convert", "7B", "--type", "q8_0", "--quiet", env={"LLAMALOCAL_MODELS": str(sample.parent)})
    assert code == 0, out
    assert ggufs(sample) == ["ggml-model-q8_0.gguf"]


def test_summary_and_refuse_overwrite(sample, tmp_path):
    out_file = tmp_path / "x.gguf"
    code, out = run("convert", sample, "--f16", "-o", out_file)
    assert code == 0, out
    assert "bits/weight" in out and "parameters" in out
    before = out_file.stat().st_mtime_ns
    code, out = run("convert", sample, "--f16", "-o", out_file)
    assert code == 2 and "already exists" in out and "--force" in out
    assert out_file.stat().st_mtime_ns == before
    code, out = run("convert", sample, "--f16", "-o", out_file, "--force", "--quiet")
    assert code == 0


def _expect_bad(sample, needle, *extra):
    code, out = run("convert", sample, "--q4_0", "--quiet", *extra)
    assert code == 2, out
    assert needle in out, out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out
    assert ggufs(sample.parent) == []


def test_missing_params(sample):
    (sample / "params.json").unlink()
    _expect_bad(sample, "params.json", "--no-verify")


def test_missing_tokenizer(sample):
    (sample.parent / "tokenizer.model").unlink()
    _expect_bad(sample, "tokenizer.model", "--no-verify")


def test_missing_shard(sample):
    (sample / "consolidated.01.pth").unlink()
    (sample / "consolidated.00.pth").rename(sample / "consolidated.01.pth")
    _expect_bad(sample, "missing or misnamed", "--no-verify")


def test_shards_of_different_models(sample, tmp_path):
    p = ModelParams(dim=64, n_layers=3, n_heads=2, multiple_of=32, norm_eps=1e-6)
    other = build_sample(tmp_path / "other", "7B", SampleSpec(params=p, n_shards=2, vocab_size=400, seed=5))
    shutil.copy(other / "consolidated.01.pth", sample / "consolidated.01.pth")
    _expect_bad(sample, "not from the same model", "--no-verify")


def test_checksum_mismatch_names_the_file(sample):
    f = sample / "consolidated.01.pth"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    _expect_bad(sample, "consolidated.01.pth")


def test_truncated_shard(sample):
    f = sample / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_bad(sample, "consolidated.00.pth", "--no-verify")


def test_shapes_inconsistent_with_params(sample):
    params = json.loads((sample / "params.json").read_text())
    params["n_heads"] = 4
    params["n_kv_heads"] = 1
    (sample / "params.json").write_text(json.dumps(params))
    _expect_bad(sample, "params.json", "--no-verify")


def test_unknown_tensor_names(sample, tmp_path):
    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.torch_save import save_state_dict

    for f in sorted(sample.glob("consolidated.*.pth")):
        with open_checkpoint(f) as ck:
            sd = {n: ck.rows(n, 0, info.shape[0]) for n, info in ck.tensors.items()}
        sd["layers.0.attention.wz.weight"] = sd["layers.0.attention.wq.weight"]
        save_state_dict(f, sd, dtype="f16")
    _expect_bad(sample, "unknown tensor", "--no-verify")


@pytest.mark.parametrize("tensor", ["layers.1.feed_forward.w2.weight", "output.weight"])
def test_nan_weight_names_the_tensor(sample, tensor):
    """A damaged weight (NaN) in the second shard of a row- or column-parallel tensor is an input
    error naming the tensor, not a traceback or a silently broken file."""
    import numpy as np

    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.torch_save import save_state_dict

    f = sample / "consolidated.01.pth"
    with open_checkpoint(f) as ck:
        sd = {n: ck.rows(n, 0, info.shape[0]) for n, info in ck.tensors.items()}
    sd[tensor][-1, 3] = np.nan
    save_state_dict(f, sd, dtype="f16")
    _expect_bad(sample, f"{tensor}: rows", "--no-verify")


def test_malicious_pickle_is_refused_and_never_runs(sample, tmp_path):
    from llamalocal.convert.torch_save import write_raw_checkpoint

    marker = tmp_path / "pwned"
    payload = (b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"\x85R.")
    write_raw_checkpoint(sample / "consolidated.00.pth", payload)
    _expect_bad(sample, "os.system", "--no-verify")
    assert not marker.exists()


def test_no_partial_file_when_interrupted(sample, tmp_path, monkeypatch):
    """An error in the middle of writing (as Ctrl-C or a full disk would be) leaves no file behind."""
    import llamalocal.convert.convert as cc

    calls = {"n": 0}
    real = cc.quantize_block

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cc, "quantize_block", failing)
    with pytest.raises(KeyboardInterrupt):
        cc.convert(sample, "q8_0", tmp_path / "out.gguf", verify=False, threads=1)
    assert list(tmp_path.glob("*out.gguf*")) == []


def test_ctrl_c_exit_code_130_and_no_file(sample, tmp_path):
    """A real SIGINT to the CLI process while it writes: exit 130, nothing left."""
    import signal
    import time

    p = ModelParams(dim=512, n_layers=8, n_heads=8, multiple_of=256, norm_eps=1e-6)
    big = build_sample(tmp_path / "big", "m", SampleSpec(params=p, vocab_size=400, dtype="f32"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "llamalocal", "convert", str(big), "--q2_k", "--no-verify"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            # SIGINT may be inherited ignored (a background job in CI): restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not list(big.glob(".*partial")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("conversion finished before the signal arrived")
    assert proc.returncode == 130, err.decode()
    assert ggufs(big) == []


def test_help_teaches():
    code, out = run("convert", "--help")
    assert code == 0
    for flag in ["--q4_0", "--q4_k_m", "--q2_k", "--f16", "--outfile", "--force", "--no-verify", "--quiet", "--type"]:
        assert flag in out


def _peak_rss_of_convert(model_dir, out):
    from llamalocal.procstat import run_measured

    r = run_measured([sys.executable, "-m", "llamalocal", "convert", str(model_dir), "--q8_0", "--no-verify",
                      "--quiet", "-o", str(out)])
    assert r.returncode == 0, r.stderr
    return r.peak_rss


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """Streaming: a model 6x deeper (6x the bytes) converts within the same peak RSS."""
    spec = dict(dim=1024, n_heads=8, multiple_of=256, norm_eps=1e-6)
    small = build_sample(tmp_path / "s", "m", SampleSpec(params=ModelParams(n_layers=2, **spec), vocab_size=400))
    big = build_sample(tmp_path / "b", "m", SampleSpec(params=ModelParams(n_layers=12, **spec), vocab_size=400))
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.pth"))  # noqa: E731
    assert size(big) > 5 * size(small)
    rss_small = _peak_rss_of_convert(small, tmp_path / "s.gguf")
    rss_big = _peak_rss_of_convert(big, tmp_path / "b.gguf")
    print(f"peak RSS: {rss_small / 2**20:.0f} MiB ({size(small) / 2**20:.0f} MiB model), "
          f"{rss_big / 2**20:.0f} MiB ({size(big) / 2**20:.0f} MiB model)")
    assert rss_big < rss_small * 1.15 + 8 * 2**20, (rss_small / 2**20, rss_big / 2**20, size(big) / 2**20)


def test_not_enough_disk_is_refused_before_writing(sample, tmp_path, monkeypatch):
    import shutil as sh

    import llamalocal.convert.convert as cc

    real = sh.disk_usage
    monkeypatch.setattr(cc.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    code, out = run("convert", sample, "--q8_0", "--quiet", "--no-verify", "-o", tmp_path / "o.gguf")
    assert code == 1 and "GiB free" in out and "needs about" in out
    assert list(tmp_path.glob("*o.gguf*")) == []


def test_damage_that_breaks_the_weights_is_reported_as_the_md5_mismatch(sample):
    """With verification on, a shard damaged so that converting it also fails (here: a NaN) is
    reported as what it is, a download whose md5 does not match, naming the file."""
    import numpy as np

    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.torch_save import save_state_dict

    f = sample / "consolidated.01.pth"
    with open_checkpoint(f) as ck:
        sd = {n: ck.rows(n, 0, info.shape[0]) for n, info in ck.tensors.items()}
    sd["output.weight"][0, 0] = np.nan
    save_state_dict(f, sd, dtype="f16")
    _expect_bad(sample, "consolidated.01.pth: md5")


def test_disk_filling_up_mid_write_is_one_line_and_leaves_nothing(sample, tmp_path, monkeypatch):
    import errno

    calls = {"n": 0}

    def full(fd, data, offset):  # the header went through; the tensor data does not fit
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    code, out = run("convert", sample, "--f32", "--quiet", "--no-verify", "-o", tmp_path / "o.gguf")
    assert calls["n"] >= 1, "the tensor data was never written"
    assert code == 1 and "filled up" in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 1
    assert list(tmp_path.glob("*o.gguf*")) == []


def test_unwritable_output_folder_is_refused_first(sample, tmp_path, monkeypatch):
    import llamalocal.convert.convert as cc

    monkeypatch.setattr(cc.os, "access", lambda p, mode: False)
    code, out = run("convert", sample, "--q8_0", "--quiet", "-o", tmp_path / "o.gguf")
    assert code == 2 and "permission denied" in out, out


def test_one_progress_bar_counts_md5_and_output_bytes(sample, tmp_path):
    """md5 hashing runs alongside the conversion; the single bar's total is the bytes hashed plus
    the bytes written, and it ends exactly full."""
    from llamalocal.convert.convert import convert

    class Recorder:
        def __init__(self):
            self.stages, self.done = [], 0

        def stage(self, name, total_bytes):
            self.stages.append((name, total_bytes))

        def advance(self, nbytes, label=""):
            self.done += nbytes

    rec = Recorder()
    r = convert(sample, "q8_0", tmp_path / "o.gguf", progress=rec)
    hashed = sum((sample / f).stat().st_size for f in ["consolidated.00.pth", "consolidated.01.pth", "params.json"])
    hashed += (sample.parent / "tokenizer.model").stat().st_size
    written = sum(t.nbytes for t in r.tensors)
    assert rec.stages == [("md5 + writing o.gguf", hashed + written)]
    assert rec.done == hashed + written
