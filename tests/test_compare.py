"""compare: KL divergence and top-1 agreement against a base file, the table, --json, --plot."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_available

from llamalocal.cli import main
from llamalocal.compare import compare
from llamalocal.errors import BadInputError

CTX, CHUNKS = 64, 4


@pytest.fixture(scope="module")
def result(converted, heldout_text):
    """f32 as base against itself (a second load of the same file), q8_0, q4_0 and q2_K."""
    files = [converted("tiny-v1", p) for p in ("f32", "q4_0", "f32", "q2_k", "q8_0")]
    return compare(files[0], files[1:], heldout_text.encode(), n_ctx=CTX, chunks=CHUNKS, n_gpu_layers=0,
                   tg_tokens=4)


def _row(result, file_type, base=False):
    return next(r for r in result.rows if r.file_type.lower().startswith(file_type) and r.is_base == base)


def test_a_file_against_itself(result):
    base, same = _row(result, "f32", base=True), _row(result, "f32")
    assert same.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert same.top1 == 1.0
    assert same.ppl == base.ppl and same.ppl_delta == 0.0


def test_rows_sorted_by_size_with_sensible_columns(result):
    sizes = [r.size_bytes for r in result.rows]
    assert sizes == sorted(sizes, reverse=True)
    assert result.rows[0].is_base  # the two f32 rows tie; the base comes first
    assert len(result.rows) == 5
    assert result.tokens == CHUNKS * (CTX - 1 - CTX // 2) and result.chunks == CHUNKS
    f32, q8, q4, q2 = (_row(result, t) for t in ("f32", "q8_0", "q4_0", "q2_k"))
    assert f32.bits_per_weight == pytest.approx(32, rel=0.02)
    assert 8.5 <= q8.bits_per_weight < 9.5  # 8.5 for q8_0 blocks; the small norms stay f32
    assert q2.bits_per_weight < q4.bits_per_weight < q8.bits_per_weight
    for r in result.rows:
        assert r.kl_mean >= 0 and 0 <= r.top1 <= 1
        assert r.tg_tps is not None and r.tg_tps > 0
        assert r.ppl_delta == pytest.approx(r.ppl - f32.ppl)


def test_fewer_bits_drift_further_from_base(result):
    """KL from the f32 distributions grows as bits shrink, and top-1 agreement falls."""
    q8, q4, q2 = (_row(result, t) for t in ("q8_0", "q4_0", "q2_k"))
    assert 0 < q8.kl_mean < q4.kl_mean < q2.kl_mean
    if shared_available():  # trained weights; random synthetic ones may agree by chance
        assert q8.top1 >= q4.top1 >= q2.top1
        assert q2.top1 < 1.0


def test_kl_matches_a_direct_computation(converted, heldout_text):
    """KL(base ‖ other) recomputed from the two models' logits in plain numpy, one window."""
    from llamalocal.perplexity import load_for_scoring, score_windows, tokenize

    base_p, other_p = converted("tiny-v1", "f32"), converted("tiny-v1", "q4_0")
    logits = []
    for p in (base_p, other_p):
        loaded = load_for_scoring(p, n_ctx=CTX, n_gpu_layers=0)
        try:
            toks = tokenize(loaded.llm, heldout_text)
            logits.append(next(score_windows(loaded.llm, toks, CTX, 1)).logits.astype(np.float64))
        finally:
            loaded.llm.close()
    pb = np.exp(logits[0]) / np.exp(logits[0]).sum(axis=1, keepdims=True)
    po = np.exp(logits[1]) / np.exp(logits[1]).sum(axis=1, keepdims=True)
    kl = (pb * np.log(pb / po)).sum(axis=1).mean()
    top1 = (logits[0].argmax(1) == logits[1].argmax(1)).mean()
    res = compare(base_p, [other_p], heldout_text.encode(), n_ctx=CTX, chunks=1, n_gpu_layers=0, tg_tokens=0)
    row = _row(res, "q4_0")
    assert row.kl_mean == pytest.approx(kl, rel=1e-3)
    assert row.top1 == pytest.approx(top1)
    assert row.tg_tps is None


def test_bad_input(converted, heldout_text, tmp_path):
    base = converted("tiny-v1", "f32")
    with pytest.raises(BadInputError, match="at least one other"):
        compare(base, [], heldout_text.encode())
    with pytest.raises(BadInputError, match="no such model"):
        compare(base, [tmp_path / "nope.gguf"], heldout_text.encode())


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture()
def text_file(tmp_path, heldout_text):
    p = tmp_path / "heldout.txt"
    p.write_text(heldout_text)
    return p


def test_cli_json_table_and_plot(converted, text_file, tmp_path):
    base, q4 = converted("tiny-v1", "f32"), converted("tiny-v1", "q4_0")
    png = tmp_path / "tradeoff.png"
    args = ["compare", str(base), str(q4), "-f", str(text_file), "--ctx", "64", "--chunks", "2", "-ngl", "0",
            "--tg-tokens", "4"]
    r = CliRunner().invoke(main, [*args, "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"base", "n_ctx", "chunks", "tokens", "rows"} <= set(data)
    assert data["base"] == str(base) and data["n_ctx"] == 64 and data["chunks"] == 2
    keys = {"model", "file_type", "size_bytes", "n_params", "bits_per_weight", "ppl", "ppl_stderr", "ppl_delta",
            "ppl_delta_pct", "kl_mean", "kl_stderr", "top1", "tg_tps", "is_base", "imatrix"}
    assert [set(row) for row in data["rows"]] == [keys, keys]
    assert [row["is_base"] for row in data["rows"]] == [True, False]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "type", "size", "bpw"]
    assert base.name in lines[1] and "base" in lines[1]
    assert q4.name in lines[2] and "%" in lines[2]


def test_cli_plot_without_matplotlib(converted, text_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    base = converted("tiny-v1", "f32")
    r = CliRunner().invoke(main, ["compare", str(base), str(base), "-f", str(text_file),
                                  "--plot", str(tmp_path / "x.png")])
    assert r.exit_code == 1
    assert "llamalocal[plot]" in r.output


def test_cli_bad_input_exits_2(converted, text_file, tmp_path):
    base = converted("tiny-v1", "f32")
    r = CliRunner().invoke(main, ["compare", str(base), "-f", str(text_file)])  # no OTHER
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["compare", str(base), str(tmp_path / "missing.gguf"), "-f", str(text_file)])
    assert r.exit_code == 2, r.output
    r = CliRunner().invoke(main, ["compare", str(base), str(base), "-f", str(text_file),
                                  "--plot", str(tmp_path / "chart.jpg")])
    assert r.exit_code == 2 and "PNG" in r.output
