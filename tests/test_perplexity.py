"""Perplexity as llama-perplexity defines it: windows, BOS, second-half scoring, stderr, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_available

from llamalocal.cli import main
from llamalocal.errors import BadInputError
from llamalocal.perplexity import Running, log_softmax, perplexity, perplexity_of, plan_chunks, token_nll

# ---------------------------------------------------------------------------------------------
# the statistics, against direct formulas


def test_running_matches_direct_formulas():
    rng = np.random.default_rng(1)
    nll = rng.gamma(2.0, 1.5, size=1000)
    run = Running()
    for part in np.array_split(nll, 7):
        run.add(part)
    assert run.count == 1000
    assert run.ppl() == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    # standard error of the mean nll (population variance over count - 1), carried through exp
    se = math.sqrt(nll.var() / (len(nll) - 1))
    assert run.ppl_stderr() == pytest.approx(math.exp(nll.mean()) * se, rel=1e-9)


def test_log_softmax_and_nll():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1000.0]], dtype=np.float32)
    lp = log_softmax(logits)
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0)
    assert lp[0, 2] == pytest.approx(3 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    assert np.isfinite(lp).all()  # no overflow for a huge logit
    assert token_nll(lp, np.array([2, 2])) == pytest.approx([-lp[0, 2], 0.0])


def test_plan_chunks():
    assert plan_chunks(1000, 100, None) == 10
    assert plan_chunks(1000, 100, 3) == 3
    assert plan_chunks(1000, 100, 50) == 10
    with pytest.raises(BadInputError, match="at least 200"):
        plan_chunks(199, 100, None)
    with pytest.raises(BadInputError, match="even"):
        plan_chunks(1000, 101, None)


# ---------------------------------------------------------------------------------------------
# on converted models


def _reference_ppl(llm, tokens, n_ctx, n_chunks):
    """The definition, written independently with Llama.eval + its logits_all scores."""
    bos = llm.token_bos()
    first = n_ctx // 2
    nll = []
    for i in range(n_chunks):
        window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        window[0] = bos
        llm.reset()
        llm.eval(window)
        scores = np.array(llm.scores[:n_ctx], dtype=np.float64)
        for pos in range(first, n_ctx - 1):
            row = scores[pos]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            nll.append(lse - row[tokens[i * n_ctx + pos + 1]])
    return math.exp(float(np.mean(nll))), len(nll)


def test_matches_an_independent_implementation(converted, heldout_text):
    from llamalocal.runner import load_model

    path = converted("tiny-v1", "q8_0")
    n_ctx = 64
    loaded = load_model(path, n_ctx=n_ctx, n_batch=n_ctx, n_gpu_layers=0, logits_all=True)
    try:
        res = perplexity_of(loaded.llm, heldout_text, n_ctx=n_ctx, chunks=3)
        tokens = loaded.llm.tokenize(heldout_text.encode(), add_bos=True, special=False)
        ref, count = _reference_ppl(loaded.llm, tokens, n_ctx, 3)
    finally:
        loaded.llm.close()
    assert res.chunks == 3
    assert res.tokens == count == 3 * (n_ctx - 1 - n_ctx // 2)
    assert res.text_tokens == len(tokens)
    assert res.ppl == pytest.approx(ref, rel=1e-4)
    assert res.ppl_stderr > 0


def test_windows_longer_than_a_batch(converted, heldout_text):
    """A window decoded in several batches (n_batch < n_ctx) scores the same as in one."""
    from llamalocal.runner import load_model

    path = converted("tiny-v1", "q8_0")
    ppl = []
    for n_batch in (64, 16):
        loaded = load_model(path, n_ctx=64, n_batch=n_batch, n_gpu_layers=0)
        try:
            ppl.append(perplexity_of(loaded.llm, heldout_text, n_ctx=64, chunks=3).ppl)
        finally:
            loaded.llm.close()
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)


def test_progress_reports_the_running_estimate(converted, heldout_text):
    seen = []
    res = perplexity(converted("tiny-v1", "q8_0"), heldout_text, n_ctx=64, chunks=3, n_gpu_layers=0,
                     progress=lambda done, total, ppl, se: seen.append((done, total, ppl)))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[-1][2] == pytest.approx(res.ppl)


@pytest.mark.slow
def test_quantization_order_on_heldout_text(converted, heldout_text):
    """More bits, lower perplexity: f32 <= q8_0 <= q4_0 <= q2_K on text the models never saw.

    q8_0 is nearly lossless: on these 4.5M-parameter models it lands within ±0.03 % of f32, on
    either side depending on which windows are scored (measured: +0.02 % at ctx 64 × 40 chunks,
    -0.02 % at ctx 128 over the whole text), so that one step allows 0.05 %.
    """
    if not shared_available():
        pytest.skip("synthetic fallback model (random weights): its perplexity ordering is noise")
    ppl = {p: perplexity(converted("tiny-v1", p), heldout_text, n_ctx=64, chunks=40, n_gpu_layers=0).ppl
           for p in ("f32", "q8_0", "q4_0", "q2_k")}
    assert ppl["f32"] <= ppl["q8_0"] * (1 + 5e-4), ppl
    assert ppl["q8_0"] <= ppl["q4_0"] <= ppl["q2_k"], ppl
    assert ppl["q2_k"] > ppl["f32"] * 1.01  # q2_K's loss is real, not a rounding difference


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture()
def text_file(tmp_path, heldout_text):
    p = tmp_path / "heldout.txt"
    p.write_text(heldout_text)
    return p


def test_cli_json(converted, text_file):
    path = converted("tiny-v1", "q4_0")
    r = CliRunner().invoke(main, ["perplexity", str(path), "-f", str(text_file), "--ctx", "64", "--chunks", "2",
                                  "-ngl", "0", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"model", "ppl", "ppl_stderr", "nll", "n_ctx", "chunks", "tokens", "text_tokens", "seconds"} <= set(data)
    assert data["n_ctx"] == 64 and data["chunks"] == 2 and data["tokens"] == 2 * 31
    assert data["ppl"] == pytest.approx(math.exp(data["nll"]))
    assert 1 < data["ppl"] < 2048 * 4


def test_cli_text_output(converted, text_file):
    path = converted("tiny-v1", "q4_0")
    r = CliRunner().invoke(main, ["perplexity", str(path), "-f", str(text_file), "--ctx", "64", "--chunks", "2",
                                  "-ngl", "0"])
    assert r.exit_code == 0, r.output
    assert "PPL = " in r.stdout and "2 chunks of 64 tokens" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--ctx", "1024"], "needs at least"),  # the text is shorter than two windows
    (["--ctx", "63"], "even"),
])
def test_cli_bad_input_exits_2(converted, tmp_path, args, message):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 20)
    path = converted("tiny-v1", "q4_0")
    r = CliRunner().invoke(main, ["perplexity", str(path), "-f", str(short), "-ngl", "0", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_cli_missing_files_exit_2(converted, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf at all" * 10)
    text = tmp_path / "t.txt"
    text.write_text("x " * 100)
    r = CliRunner().invoke(main, ["perplexity", str(not_gguf), "-f", str(text)])
    assert r.exit_code == 2, r.output
    r = CliRunner().invoke(main, ["perplexity", str(converted("tiny-v1", "q4_0")), "-f", str(tmp_path / "no.txt")])
    assert r.exit_code == 2, r.output
    assert "no text file" in r.output
