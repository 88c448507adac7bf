"""info (header, tensor types, plan) and list (the models directory)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from llamalocal.cli import main
from llamalocal.info import list_models, model_info
from llamalocal.model_desc import read_model_desc
from llamalocal.units import human_bytes

INFO_KEYS = {"path", "name", "arch", "file_type", "file_bytes", "n_params", "bits_per_weight", "n_layers", "n_embd",
             "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train", "tensor_type_bytes", "plan", "plan_text"}
LIST_KEYS = {"name", "path", "size_bytes", "file_type", "n_params", "modified"}


def test_model_info_fields(converted):
    path = converted("tiny-v1", "q4_0")
    mi = model_info(path)
    assert mi.arch == "llama" and mi.file_type == "q4_0"
    assert (mi.n_layers, mi.n_embd, mi.n_head, mi.n_head_kv, mi.n_ff) == (4, 256, 4, 4, 768)
    assert mi.file_bytes == path.stat().st_size
    assert mi.n_vocab == read_model_desc(path).n_vocab > 0
    # per-type byte counts add up to the weights, which fit in the file with its header
    assert sum(mi.tensor_type_bytes.values()) == read_model_desc(path).weights_bytes < mi.file_bytes
    assert "q4_0" in mi.tensor_type_bytes and "f32" in mi.tensor_type_bytes  # norms stay f32
    assert list(mi.tensor_type_bytes.values()) == sorted(mi.tensor_type_bytes.values(), reverse=True)
    assert 4.5 <= mi.bits_per_weight < 6.5  # q4_0 blocks are 4.5 bits; output.weight is q6_K
    assert mi.plan is not None and mi.plan_text.strip()


def test_info_of_a_gqa_model(converted):
    mi = model_info(converted("tiny-v2", "f16"), with_plan=False)
    assert (mi.n_head, mi.n_head_kv, mi.n_ff) == (4, 2, 1024)
    assert mi.plan is None and mi.plan_text == "not planned"


def test_cli_info_json_and_text(converted):
    path = converted("tiny-v1", "q8_0")
    r = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == INFO_KEYS
    assert data["file_type"] == "q8_0" and data["n_layers"] == 4 and isinstance(data["plan"], dict)
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 0, r.output
    for word in ("architecture", "llama", "q8_0", "tensor types:", "plan on this machine:"):
        assert word in r.stdout


def test_cli_info_bad_file_exits_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    r = CliRunner().invoke(main, ["info", str(bad)])
    assert r.exit_code == 2 and "GGUF" in r.output
    r = CliRunner().invoke(main, ["info", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 2


@pytest.fixture()
def models_dir(tmp_path, converted):
    """Two converted files (one in a model folder, as convert writes them) and a damaged one."""
    root = tmp_path / "models"
    (root / "7B").mkdir(parents=True)
    old = shutil.copy(converted("tiny-v1", "q4_0"), root / "tiny-q4_0.gguf")
    new = shutil.copy(converted("tiny-v1", "q8_0"), root / "7B" / "tiny-q8_0.gguf")
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    os.utime(old, (1_600_000_000, 1_600_000_000))
    os.utime(new, (1_700_000_000, 1_700_000_000))
    os.utime(root / "broken.gguf", (1_500_000_000, 1_500_000_000))
    (root / "notes.txt").write_text("not a model")
    return root


def test_list_models(models_dir):
    errors = []
    models = list_models(models_dir, on_error=lambda p, e: errors.append(p.name))
    assert [m.name for m in models] == [os.path.join("7B", "tiny-q8_0.gguf"), "tiny-q4_0.gguf", "broken.gguf"]
    assert [m.file_type for m in models] == ["q8_0", "q4_0", "unreadable"]
    assert models[0].size_bytes == (models_dir / "7B" / "tiny-q8_0.gguf").stat().st_size
    assert models[2].n_params is None and errors == ["broken.gguf"]


def test_cli_list(models_dir):
    r = CliRunner().invoke(main, ["list", "--models-dir", str(models_dir), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["models_dir"] == str(models_dir.resolve())
    assert [set(m) for m in data["models"]] == [LIST_KEYS] * 3
    assert data["models"][1]["file_type"] == "q4_0" and data["models"][1]["modified"].startswith("2020-09-1")
    r = CliRunner().invoke(main, ["list", "--models-dir", str(models_dir)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and "q8_0" in lines[0] and "MiB" in lines[0] and "unreadable" in lines[2]


def test_cli_list_empty_and_missing(tmp_path):
    r = CliRunner().invoke(main, ["list", "--models-dir", str(tmp_path)])
    assert r.exit_code == 0 and r.stdout == "" and "no .gguf files" in r.output
    r = CliRunner().invoke(main, ["list", "--models-dir", str(tmp_path), "--json"])
    assert json.loads(r.stdout)["models"] == []
    r = CliRunner().invoke(main, ["list", "--models-dir", str(tmp_path / "nowhere")])
    assert r.exit_code == 2


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3.5 * 1024**3) == "3.5 GiB"
