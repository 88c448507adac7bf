"""llamalocal.chat: Meta's templates, history trimming, the REPL, and `chat` driven through a pty."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from llamalocal.chat import (
    PLAIN_PREAMBLE,
    ChatSession,
    Segment,
    StopFilter,
    Turn,
    encode,
    format_dialog,
    pick_template,
    repl,
)
from llamalocal.errors import BadInputError
from llamalocal.runner import Sampling, context_size, load_model

GREEDY = Sampling(temp=0)


@pytest.fixture(scope="module")
def tiny_gguf(converted) -> Path:
    return converted("tiny-v1", "q8_0")


@pytest.fixture(scope="module")
def llm(tiny_gguf):
    return load_model(tiny_gguf, n_ctx=256, n_gpu_layers=0).llm


# ---------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------

def test_inst_template_is_metas_format():
    turns = [Turn("Hi there ", "Hello! "), Turn("What is 2+2?", "4")]
    segs = format_dialog("inst", "Be brief.", turns, " And 3+3? ")
    assert segs == [
        Segment("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! ", bos=True, eos=True),
        Segment("[INST] What is 2+2? [/INST] 4 ", bos=True, eos=True),
        Segment("[INST] And 3+3? [/INST]", bos=True, eos=False),
    ]


def test_inst_system_prompt_moves_to_first_kept_turn():
    segs = format_dialog("inst", "SYS", [], "only")
    assert segs == [Segment("[INST] <<SYS>>\nSYS\n<</SYS>>\n\nonly [/INST]", bos=True)]
    assert format_dialog("inst", None, [], "q") == [Segment("[INST] q [/INST]", bos=True)]


def test_plain_template():
    segs = format_dialog("plain", None, [Turn("a", "b")], "c")
    assert segs == [Segment(f"{PLAIN_PREAMBLE}\n\nUser: a\nAssistant: b\nUser: c\nAssistant:", bos=True)]
    assert format_dialog("plain", "Custom.", [], "c")[0].text.startswith("Custom.\n\nUser: c")


def test_unknown_template_is_bad_input():
    with pytest.raises(BadInputError):
        format_dialog("chatml", None, [], "x")
    with pytest.raises(BadInputError):
        pick_template("chatml", None, Path("m.gguf"))


@pytest.mark.parametrize(("override", "name", "file", "expected"), [
    (None, "llama-2-7b-chat", "model-q4_0.gguf", "inst"),
    (None, "llama-2-13b", "llama-2-13b-chat-q4_0.gguf", "inst"),
    (None, "llama-2-7b", "llama-2-7b-q4_0.gguf", "plain"),
    (None, "7B", "7B-q4_0.gguf", "plain"),
    ("inst", "7B", "7B-q4_0.gguf", "inst"),
    ("plain", "llama-2-7b-chat", "x.gguf", "plain"),
])
def test_pick_template(override, name, file, expected):
    template, why = pick_template(override, name, Path(file))
    assert template == expected
    assert why


def test_encode_tokens_match_metas_chat_completion(llm, tiny_checkpoints):
    """The ids equal what Meta's chat_completion builds with sentencepiece: per turn
    encode(bos=True, eos=True), each piece with its own dummy-prefix space."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoints / "tokenizer.model"))
    dialog = [("good morrow, sir", "what news?"), ("the king is dead", "long live the king")]
    system, pending = "Speak as a player.", "who shall reign?"

    # Meta's llama/generation.py chat_completion, written out
    users = [u for u, _ in dialog] + [pending]
    users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
    want: list[int] = []
    for u, (_, a) in zip(users[:-1], dialog, strict=True):
        want += [sp.bos_id()] + sp.encode(f"[INST] {u.strip()} [/INST] {a.strip()} ") + [sp.eos_id()]
    want += [sp.bos_id()] + sp.encode(f"[INST] {users[-1].strip()} [/INST]")

    got = encode(llm, format_dialog("inst", system, [Turn(u, a) for u, a in dialog], pending))
    assert got == want


# ---------------------------------------------------------------------------------------------
# stop strings
# ---------------------------------------------------------------------------------------------

def test_stop_filter_holds_back_a_split_stop_string():
    f = StopFilter(("\nUser:",))
    shown = "".join(f.feed(p) for p in ["Hello", " there\n", "Us", "er: next"])
    assert shown == "Hello there"
    assert f.stopped


def test_stop_filter_releases_a_false_alarm():
    f = StopFilter(("\nUser:",))
    shown = "".join(f.feed(p) for p in ["a\n", "Use", "ful"]) + f.flush()
    assert shown == "a\nUseful"
    assert not f.stopped


def test_stop_filter_without_stops_passes_through():
    f = StopFilter(())
    assert f.feed("\nUser:") == "\nUser:"


# ---------------------------------------------------------------------------------------------
# history within the context
# ---------------------------------------------------------------------------------------------

def test_history_drops_oldest_turns_with_a_notice(llm):
    notices: list[str] = []
    s = ChatSession(llm, "inst", system="Be brief.", reserve=64, on_notice=notices.append)
    long_answer = "and so the play goes on " * 6
    s.turns = [Turn(f"question number {i}", long_answer) for i in range(8)]
    ids = s.prompt_tokens("the last question")
    assert len(ids) + 64 <= context_size(llm)
    assert 0 < len(s.turns) < 8
    assert s.turns[-1].user == "question number 7"  # the newest are kept
    assert s.turns[0].user != "question number 0"
    assert len(notices) == 1 and "dropped" in notices[0] and str(context_size(llm)) in notices[0]
    # the system prompt survives in the first kept turn
    assert ids[: len(encode(llm, [Segment("[INST] <<SYS>>", bos=True)]))] == \
        encode(llm, [Segment("[INST] <<SYS>>", bos=True)])


def test_history_that_fits_is_kept_silently(llm):
    notices: list[str] = []
    s = ChatSession(llm, "plain", reserve=32, on_notice=notices.append)
    s.turns = [Turn("hi", "hello")]
    s.prompt_tokens("how are you")
    assert s.turns == [Turn("hi", "hello")] and notices == []


def test_message_larger_than_context_is_refused(llm):
    s = ChatSession(llm, "plain", reserve=8)
    with pytest.raises(BadInputError, match="context"):
        s.prompt_tokens("word " * 400)


def test_respond_streams_and_records_the_turn(llm):
    s = ChatSession(llm, "plain", sampling=GREEDY, max_tokens=12)
    answer = "".join(s.respond("Who goes there?"))
    assert s.turns == [Turn("Who goes there?", answer)]
    assert s.last_stats is not None and 0 < s.last_stats.n_generated <= 12
    assert "\nUser:" not in answer
    # same history, same greedy answer
    s2 = ChatSession(llm, "plain", sampling=GREEDY, max_tokens=12)
    assert "".join(s2.respond("Who goes there?")) == answer


# ---------------------------------------------------------------------------------------------
# the REPL, in-process
# ---------------------------------------------------------------------------------------------

def _scripted(lines: list[str | type[BaseException]]):
    it = iter(lines)

    def read(prompt: str) -> str:
        item = next(it, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item()
        return item

    return read


def test_repl_commands_and_eof(llm):
    s = ChatSession(llm, "plain", sampling=GREEDY, max_tokens=8)
    out, err = io.StringIO(), io.StringIO()
    repl(s, read=_scripted(["First question", "/reset", "", KeyboardInterrupt, "Second question"]),
         out=out, err=err)
    assert [t.user for t in s.turns] == ["Second question"]  # /reset forgot the first
    assert "[history cleared]" in err.getvalue()
    assert "Ctrl-D" in err.getvalue()  # Ctrl-C at the prompt does not leave
    assert len(re.findall(r"^\[\d+ tokens, [0-9.]+ tokens/s", err.getvalue(), re.M)) == 2  # one per answer


def test_repl_exit_command(llm):
    s = ChatSession(llm, "plain", sampling=GREEDY, max_tokens=4)
    repl(s, read=_scripted(["/exit", "never read"]), out=io.StringIO(), err=io.StringIO())
    assert s.turns == []


# ---------------------------------------------------------------------------------------------
# `llamalocal chat` in a pseudo-terminal
# ---------------------------------------------------------------------------------------------

class Pty:
    """A child process on a pseudo-terminal, read with a deadline (no pexpect here)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                # a shell that starts a job in the background (as CI may) leaves SIGINT ignored, and an
                # ignored signal stays ignored across exec: give the child a terminal's default
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.buf = b""

    def read_until(self, pattern: str, timeout: float = 20.0) -> str:
        """Everything read up to and including `pattern` (a regex); what follows stays buffered."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                head, self.buf = self.buf[: m.end()], self.buf[m.end():]
                return head.decode("utf-8", "replace")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.buf.decode('utf-8', 'replace')}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"child exited while waiting for {pattern!r}; got:\n"
                                         f"{self.buf.decode('utf-8', 'replace')}")
                self.buf += chunk

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):  # drain, so the child never blocks on a full pty
                    os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        self.kill()
        raise AssertionError("child did not exit")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.mark.slow
def test_chat_in_a_pty_answers_resets_interrupts_and_leaves(tiny_gguf):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")
    argv = [sys.executable, "-m", "llamalocal", "chat", str(tiny_gguf), "--template", "plain",
            "--ctx", "2048", "--n-gpu-layers", "0", "--threads", "1", "--temp", "0.9", "--seed", "1"]
    child = Pty(argv, env)
    try:
        child.read_until(r"Ctrl-C stops an answer", timeout=30)
        child.read_until(r"> ")
        child.send("Who are you?\n")
        first = child.read_until(r"\[\d+ tokens, [0-9.]+ tokens/s[^\]]*\]")
        assert re.search(r"\S", first.split("Who are you?", 1)[-1])  # some answer text came back

        child.read_until(r"> ")
        child.send("/reset\n")
        child.read_until(r"\[history cleared\]")

        # a long answer (to the end of a 2048-token context), stopped by Ctrl-C once it streams
        child.read_until(r"> ")
        child.send("Tell me a very long story.\n")
        child.read_until(r"story\.\r?\n")
        child.read_until(r"\S")  # the answer has started
        child.send("\x03")
        stopped = child.read_until(r"\[[^\]]*tokens/s[^\]]*\]")
        assert "stopped by Ctrl-C" in stopped, stopped

        # the session survived: it still answers
        child.read_until(r"> ")
        child.send("And then?\n")
        child.read_until(r"\[\d+ tokens, [0-9.]+ tokens/s[^\]]*\]")

        child.read_until(r"> ")
        child.send("\x04")
        assert child.wait() == 0
    finally:
        child.kill()
