"""--temp 0 on every CLI path (generate, chat) is plain argmax over llama.cpp's logits: no
repeat penalty, no top-k/top-p, unless a penalty is asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llamalocal.chat import Turn, encode, format_dialog
from llamalocal.cli import main
from llamalocal.convert import native

PROMPT = "KING HENRY:\nOnce more unto the"
QUESTION = "Who goes there, and what is thy name?"
N = 48
FLAGS = ["--threads", "1", "--ctx", "256", "--n-gpu-layers", "0"]


@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted("tiny-v1", "q8_0")


@pytest.fixture(scope="module")
def llm(model):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(model), n_ctx=256, n_threads=1, logits_all=True, verbose=False)


def argmax_text(llm, prompt: list[int], n: int) -> str:
    """Greedy decoding written out: evaluate, take the largest logit, feed it back."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if native.is_eog(llm.model, token):
            break
        out.append(token)
        llm.eval([token])
    return b"".join(native.token_piece(llm.model, t) for t in out).decode("utf-8", "replace")


def test_generate_temp0_is_argmax(model, llm):
    want = argmax_text(llm, llm.tokenize(PROMPT.encode(), add_bos=True, special=False), N)
    r = CliRunner().invoke(main, ["generate", str(model), "-p", PROMPT, "-n", str(N), "--temp", "0", *FLAGS])
    assert r.exit_code == 0, r.output
    assert r.stdout == want
    # a penalty, when asked for, is applied, and changes this continuation: the check above has teeth
    r = CliRunner().invoke(main, ["generate", str(model), "-p", PROMPT, "-n", str(N), "--temp", "0",
                                  "--repeat-penalty", "1.5", *FLAGS])
    assert r.exit_code == 0, r.output
    assert r.stdout != want


def test_chat_temp0_is_argmax(model, llm):
    prompt = encode(llm, format_dialog("inst", None, [], QUESTION))
    want = argmax_text(llm, prompt, N).lstrip()
    r = CliRunner().invoke(main, ["chat", str(model), "--template", "inst", "-n", str(N), "--temp", "0", *FLAGS],
                           input=QUESTION + "\n")
    assert r.exit_code == 0, r.output
    assert want and f"{want}\n" in r.stdout


def test_chat_second_turn_temp0_is_argmax(model, llm):
    """The history (the first answer, as shown) and the next answer, still argmax."""
    first = argmax_text(llm, encode(llm, format_dialog("inst", None, [], QUESTION)), N).lstrip()
    second = argmax_text(llm, encode(llm, format_dialog("inst", None, [Turn(QUESTION, first)], "Say more.")), N)
    r = CliRunner().invoke(main, ["chat", str(model), "--template", "inst", "-n", str(N), "--temp", "0", *FLAGS],
                           input=f"{QUESTION}\nSay more.\n")
    assert r.exit_code == 0, r.output
    assert f"{first}\n" in r.stdout and f"{second.lstrip()}\n" in r.stdout
