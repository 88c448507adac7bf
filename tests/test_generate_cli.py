"""`llamalocal generate` (and `chat`'s flags) through click's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llamalocal.cli import main

PROMPT = "KING HENRY:\nOnce more unto the"


@pytest.fixture(scope="module")
def q8(converted) -> Path:
    return converted("tiny-v1", "q8_0")


def run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), input=stdin)


def generate(model: Path, *extra: str, stdin: str | None = None):
    return run("generate", str(model), "--threads", "1", "--ctx", "256", *extra, stdin=stdin)


@pytest.mark.parametrize("verb", ["chat", "generate"])
def test_help(verb):
    r = run(verb, "--help")
    assert r.exit_code == 0, r.output
    for flag in ("--n-gpu-layers", "--ctx", "--threads", "--temp", "--top-p", "--top-k", "--repeat-penalty",
                 "--seed", "--cache-type", "--mlock", "--force"):
        assert flag in r.stdout
    if verb == "chat":
        assert "--system" in r.stdout and "--template" in r.stdout


def test_greedy_stdout_is_the_completion_alone_and_deterministic(q8):
    import llama_cpp

    a = generate(q8, "-p", PROMPT, "-n", "32", "--temp", "0")
    b = generate(q8, "-p", PROMPT, "-n", "32", "--temp", "0")
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout and a.stdout.strip()

    direct = llama_cpp.Llama(model_path=str(q8), n_ctx=256, n_threads=1, verbose=False)
    ref = direct(PROMPT, max_tokens=32, temperature=0)["choices"][0]["text"]
    # nothing but the completion: no plan, no timing, no added newline. (Random-weight sample models
    # emit bytes that are not UTF-8, which llama-cpp-python drops and we print as U+FFFD.)
    assert a.stdout.replace("\ufffd", "") == ref.replace("\ufffd", "")

    # the plan and the timing went to stderr
    assert "layers" in a.stderr and "tokens/s" in a.stderr


def test_prompt_from_stdin(q8):
    a = generate(q8, "-p", "-", "-n", "8", "--temp", "0", stdin=PROMPT)
    b = generate(q8, "-p", PROMPT, "-n", "8", "--temp", "0")
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout


def test_seeded_sampling_repeats(q8):
    a = generate(q8, "-p", PROMPT, "-n", "16", "--temp", "1.0", "--seed", "42")
    b = generate(q8, "-p", PROMPT, "-n", "16", "--temp", "1.0", "--seed", "42")
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout


def test_n_limits_the_tokens(q8):
    r = generate(q8, "-p", PROMPT, "-n", "3", "--temp", "0")
    assert r.exit_code == 0, r.output
    assert "generated 3 tokens" in r.stderr or "stop: eos" in r.stderr


def test_explicit_cpu_placement_and_q8_cache(q8):
    r = generate(q8, "-p", PROMPT, "-n", "4", "--temp", "0", "--n-gpu-layers", "0", "--cache-type", "q8_0")
    assert r.exit_code == 0, r.output
    assert "0 layers on the GPU" in r.stderr


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2
# ---------------------------------------------------------------------------------------------

def _one_line_error(r) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.output
    return errors[0]


def test_missing_model(tmp_path):
    msg = _one_line_error(run("generate", str(tmp_path / "missing.gguf"), "-p", "x"))
    assert "missing.gguf" in msg


def test_not_a_gguf(tmp_path):
    p = tmp_path / "weights.gguf"
    p.write_text("not a model\n" * 100)
    assert "not a GGUF" in _one_line_error(run("generate", str(p), "-p", "x"))


def test_truncated_gguf(q8, tmp_path):
    p = tmp_path / "cut.gguf"
    data = q8.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(run("generate", str(p), "-p", "x"))
    assert "cut.gguf" in msg


def test_impossible_gpu_layers(q8):
    msg = _one_line_error(run("generate", str(q8), "-p", "x", "--n-gpu-layers", "500"))
    assert "500" in msg


def test_context_beyond_the_model(q8):
    msg = _one_line_error(run("generate", str(q8), "-p", "x", "--ctx", "1000000"))
    assert "1000000" in msg


def test_prompt_larger_than_the_context(q8):
    msg = _one_line_error(run("generate", str(q8), "-p", "to be or not to be " * 100, "--ctx", "64"))
    assert "context" in msg


def test_bad_gpu_layers_value(q8):
    r = run("generate", str(q8), "-p", "x", "--n-gpu-layers", "lots")
    assert r.exit_code == 2 and "lots" in r.stderr


def test_chat_with_a_missing_model(tmp_path):
    msg = _one_line_error(run("chat", str(tmp_path / "nope.gguf")))
    assert "nope.gguf" in msg


# a process that runs the `llamalocal` program and, at Python's teardown, prints a marker
_WITH_TEARDOWN_MARKER = ("import atexit, sys; atexit.register(lambda: print('TEARDOWN', file=sys.stderr)); "
                         "sys.argv = ['llamalocal', *sys.argv[1:]]; from llamalocal.cli import entry; entry()")


def _program(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _WITH_TEARDOWN_MARKER, *args], capture_output=True, text=True,
                          timeout=300)


def test_a_finished_generate_skips_the_teardown_and_keeps_its_output(q8):
    # the model is not freed at exit (work for nobody), but everything written is there
    r = _program("generate", str(q8), "--threads", "1", "--ctx", "256", "-p", PROMPT, "-n", "16", "--temp", "0")
    assert r.returncode == 0, r.stderr
    inproc = generate(q8, "-p", PROMPT, "-n", "16", "--temp", "0")
    assert r.stdout == inproc.stdout and r.stdout.strip()
    assert "tokens/s" in r.stderr  # the last line, after the completion
    assert "TEARDOWN" not in r.stderr


def test_failures_and_other_commands_exit_normally(q8, tmp_path):
    r = _program("generate", str(q8), "--ctx", "99999999", "-p", "x")
    assert r.returncode == 2 and "TEARDOWN" in r.stderr and "Error:" in r.stderr
    r = _program("--help")
    assert r.returncode == 0 and "TEARDOWN" in r.stderr
    r = _program("generate", str(tmp_path / "missing.gguf"), "-p", "x")
    assert r.returncode != 0 and "TEARDOWN" in r.stderr


def test_models_are_not_held_under_clirunner(q8):
    # the program holds its model to a fast exit; in-process callers (tests) must get it freed
    import llamalocal.cli as cli

    r = generate(q8, "-p", PROMPT, "-n", "2", "--temp", "0")
    assert r.exit_code == 0, r.output
    assert cli._kept == [] and not cli._armed
