"""bench: llama-bench's pp / tg definitions, the bandwidth bound, --json, exit codes."""

from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

from llamalocal.bench import Rate, bench, bytes_per_token, copy_bandwidth
from llamalocal.cli import main
from llamalocal.errors import BadInputError
from llamalocal.model_desc import read_model_desc

RATE_KEYS = {"n_tokens", "mean", "sd", "samples"}
KEYS = {"threads", "n_gpu_layers", "model_bytes", "bytes_per_token", "n_params", "pp", "tg", "bandwidth_gbs",
        "tg_bound", "tg_fraction_of_bound"}


def test_rate_is_mean_and_sample_sd_of_per_run_rates():
    r = Rate.of(512, [0.5, 0.25, 1.0])
    assert r.samples == [1024, 2048, 512]
    assert r.mean == pytest.approx(statistics.mean(r.samples))
    assert r.sd == pytest.approx(statistics.stdev(r.samples))
    assert Rate.of(128, [0.5]).sd == 0.0  # one run: no spread, as llama-bench prints


def test_bytes_per_token_reads_one_embedding_row(converted):
    desc = read_model_desc(converted("tiny-v1", "q4_0"))
    per_token = bytes_per_token(desc)
    assert per_token == desc.weights_bytes - desc.token_embd_bytes + desc.token_embd_bytes // desc.n_vocab
    assert 0 < per_token < desc.weights_bytes


def test_copy_bandwidth_is_positive():
    assert copy_bandwidth(threads=2, mib=8, repetitions=2) > 0.1  # GB/s; any machine copies faster


def test_bench_small(converted):
    path = converted("tiny-v1", "q4_0")
    r = bench(path, threads=1, n_gpu_layers=0, n_prompt=32, n_gen=8, repetitions=2, bandwidth_mib=8)
    assert r.threads == 1 and r.n_gpu_layers == 0
    assert r.pp is not None and r.tg is not None
    assert (r.pp.n_tokens, r.tg.n_tokens) == (32, 8)
    for rate in (r.pp, r.tg):
        assert len(rate.samples) == 2 and all(s > 0 for s in rate.samples)
        assert rate.mean > 0 and rate.sd >= 0
    desc = read_model_desc(path)
    assert r.n_params == desc.n_params
    assert r.bytes_per_token == bytes_per_token(desc)
    assert r.bandwidth_gbs > 0
    assert r.tg_bound == pytest.approx(r.bandwidth_gbs * 1e9 / r.bytes_per_token)
    assert r.tg_fraction_of_bound == pytest.approx(r.tg.mean / r.tg_bound)


def test_bench_skips_a_test_of_size_zero(converted):
    r = bench(converted("tiny-v1", "q4_0"), threads=1, n_gpu_layers=0, n_prompt=0, n_gen=4, repetitions=1,
              bandwidth_mib=0)
    assert r.pp is None and r.tg is not None
    assert r.bandwidth_gbs is None and r.tg_fraction_of_bound is None


def test_bench_bad_sizes(converted):
    with pytest.raises(BadInputError, match="nothing to measure"):
        bench(converted("tiny-v1", "q4_0"), n_prompt=0, n_gen=0)


def test_cli_json(converted):
    path = converted("tiny-v1", "q4_0")
    r = CliRunner().invoke(main, ["bench", str(path), "--threads", "1", "-ngl", "0", "-p", "16", "-n", "4",
                                  "-r", "2", "--bandwidth-mib", "8", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == KEYS | {"model"}
    assert set(data["pp"]) == RATE_KEYS and set(data["tg"]) == RATE_KEYS
    assert data["pp"]["n_tokens"] == 16 and data["tg"]["n_tokens"] == 4
    assert data["pp"]["mean"] > 0 and data["tg"]["mean"] > 0 and data["threads"] == 1


def test_cli_text(converted):
    r = CliRunner().invoke(main, ["bench", str(converted("tiny-v1", "q4_0")), "--threads", "1", "-ngl", "0",
                                  "-p", "16", "-n", "4", "-r", "1", "--bandwidth-mib", "8"])
    assert r.exit_code == 0, r.output
    assert "pp16" in r.stdout and "tg4" in r.stdout and "bound" in r.stdout


def test_cli_bad_input_exits_2(converted, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(converted("tiny-v1", "q4_0")), "-p", "0", "-n", "0"])
    assert r.exit_code == 2 and "nothing to measure" in r.output
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["bench", str(converted("tiny-v1", "q4_0")), "-r", "0"])
    assert r.exit_code == 2
