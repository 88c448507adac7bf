"""Hostile checkpoints, class "signals": SIGTERM (a service manager, `kill`, a closing container) or
SIGHUP (the terminal went away) in the middle of writing used to leave the `.partial` file. They
now clean up as Ctrl-C does: exit 128 + the signal, nothing left. Under nohup (SIGHUP ignored) the
conversion carries on and finishes."""

from __future__ import annotations

import signal
import time

import pytest
from hostile import finish, leftovers, start_cli


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A model that takes a few seconds to convert to q2_K, so a signal lands mid-write."""
    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    p = ModelParams(dim=512, n_layers=8, n_heads=8, multiple_of=256, norm_eps=1e-6)
    return build_sample(tmp_path_factory.mktemp("slow") / "models", "m", SampleSpec(params=p, vocab_size=400,
                                                                                    dtype="f32"))


def _signal_mid_write(model_dir, sig, ignore=()):
    child = start_cli(["convert", model_dir, "--q2_k", "--no-verify", "--force", "--threads", "1"], ignore=ignore)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(model_dir.glob(".*.partial")) and not child.done():
        time.sleep(0.01)
    child.send_signal(sig)
    return finish(child)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write_leaves_nothing(slow_model, sig):
    for p in leftovers(slow_model):
        raise AssertionError(f"left over from an earlier test: {p}")
    r = _signal_mid_write(slow_model, sig)
    if r.code == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert r.signal is None and r.code == 128 + sig, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    assert "Terminated" in r.stderr
    assert leftovers(slow_model) == []


def test_sighup_ignored_under_nohup_lets_it_finish(slow_model):
    r = _signal_mid_write(slow_model, signal.SIGHUP, ignore=(signal.SIGHUP,))
    assert r.code == 0, r.describe()
    assert leftovers(slow_model) == [str(slow_model / "ggml-model-q2_k.gguf")]
    (slow_model / "ggml-model-q2_k.gguf").unlink()


def test_handlers_are_restored_after_a_conversion(tmp_path):
    """convert() installs its handlers for its own duration only."""
    from llamalocal.convert.convert import _signals_as_exceptions
    from llamalocal.errors import Terminated

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as e, _signals_as_exceptions():
        signal.raise_signal(signal.SIGTERM)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
