"""`llamalocal plan / requirements / doctor` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llamalocal.cli import main


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def model(tmp_path):
    from test_model_desc import write_gguf

    (tmp_path / "models").mkdir()
    return write_gguf(tmp_path / "models" / "tiny.gguf", n_layers=2, n_ctx=512)


@pytest.mark.parametrize("cmd", ["plan", "requirements", "doctor"])
def test_help(runner, cmd):
    r = runner.invoke(main, [cmd, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


def test_plan_json(runner, model):
    r = runner.invoke(main, ["plan", str(model), "--ctx", "256", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["n_layers"] == 2 and j["fits"] in ("cpu", "gpu", "partial") and j["n_ctx"] == 256
    cpu = j["devices"][-1]
    assert cpu["kind"] == "cpu" and cpu["total_bytes"] > cpu["weights_bytes"] > 0


def test_plan_by_name_and_newest(runner, model):
    r = runner.invoke(main, ["plan", "tiny", "--models-dir", str(model.parent), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["plan", "--models-dir", str(model.parent)])
    assert r.exit_code == 0 and "layers" in r.stdout and "hardware: detected" in r.stdout


def test_plan_hypothetical(runner, model):
    r = runner.invoke(main, ["plan", str(model), "--gpu-mem", "8GiB", "--ram", "16GB", "--json"])
    j = json.loads(r.stdout)
    assert j["fits"] == "gpu" and j["n_gpu_layers"] == 3 and j["devices"][0]["kind"] == "gpu"
    assert j["devices"][0]["budget_bytes"] == 8 * 2**30 - 512 * 2**20
    r = runner.invoke(main, ["plan", str(model), "--unified", "8GB", "--json"])
    assert json.loads(r.stdout)["devices"][0]["kind"] == "unified"
    r = runner.invoke(main, ["plan", str(model), "--gpu-mem", "lots"])
    assert r.exit_code == 2


def _one_line_error(r):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error:")


def test_missing_model(runner, tmp_path):
    _one_line_error(runner.invoke(main, ["plan", str(tmp_path / "none.gguf")]))


def test_not_gguf(runner, tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello")
    _one_line_error(runner.invoke(main, ["plan", str(p)]))


def test_truncated(runner, model):
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    _one_line_error(runner.invoke(main, ["plan", str(model)]))


def test_impossible_layers(runner, model):
    _one_line_error(runner.invoke(main, ["plan", str(model), "--gpu-mem", "8GiB", "-ngl", "50"]))


def test_layers_that_do_not_fit_and_force(runner, model):
    args = ["plan", str(model), "--gpu-mem", "513MiB", "-ngl", "3"]
    _one_line_error(runner.invoke(main, args))
    r = runner.invoke(main, args + ["--force"])
    assert r.exit_code == 0 and "warning" in r.stderr


def test_ctx_too_large(runner, model):
    _one_line_error(runner.invoke(main, ["plan", str(model), "--ctx", "4096"]))


def test_requirements_json(runner):
    r = runner.invoke(main, ["requirements", "--gpu-mem", "24GiB", "--ram", "64GiB", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert len(rows) == 50  # 10 models x 5 presets
    for row in rows:
        assert {"model", "quant", "file_bytes", "n_layers", "n_gpu_layers", "fits"} <= row.keys()
    by = {(row["model"], row["quant"]): row for row in rows}
    assert by[("LLaMA 13B", "q4_0")]["fits"] == "gpu"
    assert by[("LLaMA 65B", "q4_0")]["fits"] == "partial"
    assert by[("LLaMA 65B", "f16")]["fits"] == "no"
    assert by[("Llama-3.2 1B", "q4_0")]["fits"] == "gpu" and by[("Llama-3.1 405B", "q2_k")]["fits"] == "no"


def test_requirements_table(runner):
    r = runner.invoke(main, ["requirements", "--unified", "8GiB", "--ctx", "2048"])
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert any("7B" in ln and "q4_0" in ln and "all on GPU" in ln for ln in lines)
    assert any("65B" in ln and "f16" in ln and "page from disk" in ln for ln in lines)


def test_doctor(runner):
    r = runner.invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0
    j = json.loads(r.stdout)
    assert j["backend_support"]["CPU"] is True and j["devices"]
    r = runner.invoke(main, ["doctor"])
    assert r.exit_code == 0 and "backends in this build" in r.stdout


def test_reinstall_command():
    from llamalocal.cli.plan_cmd import reinstall_command

    # the cached wheel goes first (pip would reuse it whatever CMAKE_ARGS says), and RPC is always on
    assert reinstall_command("-DGGML_CUDA=on") == (
        'pip cache remove llama_cpp_python; CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on" pip install '
        '--force-reinstall --no-deps llama-cpp-python==0.3.36')
