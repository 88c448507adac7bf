"""The child runner the hostile tests rely on (tests/hostile.py): the fork server and a fresh
`python` per run give the same results, and the limits, the timeout and the peak RSS are real."""

from __future__ import annotations

import hostile
import pytest
from hostile import assert_refused, run_convert

base_model, model = hostile.base_model, hostile.model  # fixtures


@pytest.fixture(params=["fork_server", "subprocess"])
def backend(request, monkeypatch):
    if request.param == "subprocess":
        monkeypatch.setenv("HOSTILE_SUBPROCESS", "1")
    return request.param


def test_both_backends_agree_on_a_refusal(model, monkeypatch):
    (model / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    forked = run_convert(model)
    monkeypatch.setenv("HOSTILE_SUBPROCESS", "1")
    fresh = run_convert(model)
    assert (forked.code, forked.stderr, forked.stdout) == (fresh.code, fresh.stderr, fresh.stdout)
    for r in (forked, fresh):
        assert_refused(r, "not a torch checkpoint")
        assert 20 < r.max_rss_mib < 150, r.describe()


def test_a_conversion_runs_to_the_end(model, backend):
    r = run_convert(model, timeout=120)
    assert r.code == 0 and r.stderr == "", r.describe()
    assert hostile.leftovers(model.parent) == [str(model / "ggml-model-q4_0.gguf")]


def test_the_address_space_limit_holds(model, backend):
    """With a 40 MiB address space the interpreter cannot even hold the converter: it fails."""
    r = run_convert(model, address_space=40 * 2**20)
    assert r.code != 0 and r.code != 2, r.describe()


def test_the_timeout_kills(model, backend):
    # a command that never ends by itself (a worker serves until stopped): a tiny conversion can
    # finish inside any timeout short enough to test
    r = hostile.run_cli(["worker", "--port", "0", "--threads", "1"], timeout=1.0)
    assert r.timed_out and r.code is None, r.describe()


def test_peak_rss_is_the_childs_own(model, backend):
    """Memory the child really touches shows up; the test process's own size does not."""
    ballast = bytearray(300 * 2**20)  # the test process grows by 300 MiB ...
    ballast[::4096] = b"x" * len(ballast[::4096])
    (model / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    r = run_convert(model)
    assert r.max_rss_mib < 150, r.describe()  # ... which no child inherits in its peak
    del ballast
