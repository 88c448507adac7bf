"""`compare` shows a preset with and without an importance matrix side by side."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the models")

from llamalocal.cli import main  # noqa: E402
from llamalocal.compare import compare  # noqa: E402
from llamalocal.convert.convert import convert  # noqa: E402
from llamalocal.convert.imatrix_file import write_imatrix  # noqa: E402
from llamalocal.imatrix import compute_imatrix  # noqa: E402

CTX = 64


@pytest.fixture(scope="module")
def files(tiny_checkpoints, converted, heldout_text, tmp_path_factory):
    """f32 base, q2_k plain and q2_k calibrated on the first half of the held-out text; the second
    half is for evaluating."""
    d = tmp_path_factory.mktemp("cmp")
    half = len(heldout_text) // 2
    calib = heldout_text[:half]
    r = compute_imatrix(converted("tiny-v1", "f16"), calib, dataset="calib-half.txt", n_ctx=128, chunks=16,
                        n_gpu_layers=0)
    imx = write_imatrix(d / "tiny-v1.imatrix.gguf", r.imatrix)
    plain = converted("tiny-v1", "q2_k")
    calibrated = convert(tiny_checkpoints / "tiny-v1", "q2_k", d / "tiny-v1-q2_k-imatrix.gguf", imatrix=imx).path
    evaluation = d / "eval.txt"
    evaluation.write_text(heldout_text[half:])
    return converted("tiny-v1", "f32"), plain, calibrated, evaluation


def test_rows_say_which_file_is_calibrated(files):
    base, plain, calibrated, evaluation = files
    result = compare(base, [plain, calibrated], evaluation.read_bytes(), n_ctx=CTX, chunks=8, n_gpu_layers=0,
                     tg_tokens=0)
    rows = {r.model: r for r in result.rows}
    assert rows[str(plain)].imatrix is None and rows[str(plain)].label == "q2_k"
    assert rows[str(calibrated)].imatrix == "calib-half.txt" and rows[str(calibrated)].label == "q2_k+imatrix"
    assert rows[str(base)].imatrix is None
    assert rows[str(plain)].bits_per_weight == rows[str(calibrated)].bits_per_weight  # same types
    # (whether calibration helps is measured, not asserted: scripts/bench_imatrix.py's table)


def test_table_and_json(files):
    base, plain, calibrated, evaluation = files
    r = CliRunner().invoke(main, ["compare", str(base), str(plain), str(calibrated), "-f", str(evaluation),
                                  "--ctx", str(CTX), "--chunks", "2", "--tg-tokens", "0", "-ngl", "0"])
    assert r.exit_code == 0, r.output
    assert "q2_k+imatrix" in r.output and "q2_k " in r.output
    r = CliRunner().invoke(main, ["compare", str(base), str(calibrated), "-f", str(evaluation), "--ctx", str(CTX),
                                  "--chunks", "2", "--tg-tokens", "0", "-ngl", "0", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert [row["imatrix"] for row in rows] == [None, "calib-half.txt"]
