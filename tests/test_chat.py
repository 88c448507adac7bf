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


# ---------------------------------------------------------------------------------------------
# Llama 3: Meta's ChatFormat, the GGUF's chat template, long tokens
# ---------------------------------------------------------------------------------------------

# (system, finished turns, pending message, whether a prompt built as one text and tokenized once
# can match Meta: not when a content starts with a newline (it joins the header's "\n\n" token) or
# holds special-token text (parsed there, text to Meta))
LLAMA3_DIALOGS = [
    (None, [], "Hello!", True),
    ("You are a helpful assistant.", [], "What is the capital of France?", True),
    ("Be brief.", [("hi", "Hello! How can I help?"), ("2+2?", "4")], "and 3+3?", True),
    (None, [("  spaced  ", " answer with spaces "), ("line\nbreaks\n\n", "```python\nprint(1)\n```")],
     "tabs\tand    runs", True),
    ("Système : répondez en français 🇫🇷", [("日本語で", "はい、わかりました。")], "    indented\n    code", True),
    (None, [("\nstarts with a newline", "ok")], "fine", False),
    (None, [], "<|eot_id|><|start_header_id|>system<|end_header_id|> is only text here", False),
]


def _meta_messages(system, turns, pending):
    from llama_models.datatypes import RawMessage, StopReason

    msgs = [RawMessage(role="system", content=system)] if system else []
    for u, a in turns:
        msgs += [RawMessage(role="user", content=u),
                 RawMessage(role="assistant", content=a, stop_reason=StopReason.end_of_turn)]
    return msgs + [RawMessage(role="user", content=pending)]


def _openai_messages(system, turns, pending):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": pending}]


@pytest.fixture(scope="module")
def meta_chat(llama3_tokenizer):
    pytest.importorskip("tiktoken")
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer(llama3_tokenizer))


@pytest.fixture(scope="module")
def llama3_vocab(llama3_tokenizer, tmp_path_factory):
    """Vocab-only Llama-3 GGUFs as the converter writes them: {"base": path, "instruct": path}."""
    from test_tokenizer import vocab_only_gguf

    d = tmp_path_factory.mktemp("llama3-chat")
    for kind in ("base", "instruct"):
        vocab_only_gguf(llama3_tokenizer, d / f"{kind}.gguf", instruct=kind == "instruct")
    return {"base": d / "base.gguf", "instruct": d / "instruct.gguf"}


@pytest.fixture(scope="module")
def llama3_llm(llama3_vocab):
    import llama_cpp

    return llama_cpp.Llama(str(llama3_vocab["instruct"]), vocab_only=True, verbose=False)


@pytest.mark.parametrize(("system", "turns", "pending", "as_text"), LLAMA3_DIALOGS)
def test_llama3_tokens_are_metas_chat_format(llama3_llm, meta_chat, system, turns, pending, as_text):
    want = meta_chat.encode_dialog_prompt(_meta_messages(system, turns, pending)).tokens
    got = encode(llama3_llm, format_dialog("llama3", system, [Turn(u, a) for u, a in turns], pending))
    assert got == want


@pytest.mark.parametrize(("system", "turns", "pending", "as_text"), [d for d in LLAMA3_DIALOGS if d[3]])
def test_llama3_gguf_chat_template_gives_metas_tokens(llama3_llm, meta_chat, system, turns, pending, as_text):
    """The GGUF's tokenizer.chat_template, rendered as llama-cpp-python (and LM Studio, llama-server
    --jinja) renders it and tokenized with special tokens parsed, gives Meta's ids."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    want = meta_chat.encode_dialog_prompt(_meta_messages(system, turns, pending)).tokens
    jinja = Jinja2ChatFormatter(template=llama3_llm.metadata["tokenizer.chat_template"],
                                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    formatted = jinja(messages=_openai_messages(system, turns, pending))
    assert formatted.added_special
    assert llama3_llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True) == want


def test_llama_cpp_recognises_the_llama3_chat_template(llama3_llm):
    """llama-server without --jinja formats by llama.cpp's built-in templates, chosen by looking at
    the GGUF's: ours must be taken for Llama 3 and give the same text (it trims each content)."""
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama3_llm.metadata["tokenizer.chat_template"]
    messages = _openai_messages("Be brief.", [("hi", "Hello! How can I help?")], "and 3+3?")
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buf, len(buf))
    assert n > 0  # -1: not recognised
    jinja = Jinja2ChatFormatter(template=template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert "<|begin_of_text|>" + buf.raw[:n].decode() == jinja(messages=messages).prompt  # BOS: added by tokenizing


def test_llama2_gguf_chat_template_gives_the_inst_tokens(llm):
    """The template written for spm instruct models renders Meta's [INST] format."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from llamalocal.convert.tokenizer import LLAMA2_CHAT_TEMPLATE

    jinja = Jinja2ChatFormatter(template=LLAMA2_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    for system, turns, pending in [(None, [], "who goes there?"), ("Speak as a player.", [("good morrow", "what news?"),
                                   ("the king is dead", "long live the king")], "who shall reign?")]:
        prompt = jinja(messages=_openai_messages(system, turns, pending)).prompt
        want = encode(llm, format_dialog("inst", system, [Turn(u, a) for u, a in turns], pending))
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == want


def test_pick_template_reads_the_gguf_header(llama3_vocab):
    import llama_cpp

    meta = {k: llama_cpp.Llama(str(p), vocab_only=True, verbose=False).metadata for k, p in llama3_vocab.items()}
    assert pick_template(None, "Llama3.1-8B-Instruct", Path("x.gguf"), meta["instruct"])[0] == "llama3"
    assert pick_template(None, "Meta-Llama-3.1-8B", Path("x.gguf"), meta["base"])[0] == "plain"
    no_template = {k: v for k, v in meta["instruct"].items() if k != "tokenizer.chat_template"}
    assert pick_template(None, "x", Path("x.gguf"), no_template)[0] == "llama3"  # eos is <|eot_id|>
    assert pick_template(None, "Llama3.1-8B-Instruct", Path("x.gguf"), meta["base"])[0] == "llama3"
    assert pick_template("plain", None, Path("x.gguf"), meta["instruct"])[0] == "plain"
    assert pick_template(None, "llama-2-7b-chat", Path("x.gguf"), {"tokenizer.ggml.pre": "default"})[0] == "inst"
    assert pick_template(None, "7B", Path("x.gguf"), {"tokenizer.chat_template": "[INST] {{ x }}"})[0] == "inst"
    # without the header given (the server's call), it is read from the file
    assert pick_template(None, "x", llama3_vocab["instruct"])[0] == "llama3"
    assert pick_template(None, "Meta-Llama-3.1-8B", llama3_vocab["base"])[0] == "plain"


def test_header_values_reads_the_header(llama3_vocab, tmp_path):
    from llamalocal.gguf_header import header_values

    keys = ["tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.tokens", "no.such.key"]
    assert header_values(llama3_vocab["instruct"], keys) == {
        "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.add_bos_token": True}  # arrays and absent keys left out
    (tmp_path / "not.gguf").write_bytes(b"nope" * 10)
    assert header_values(tmp_path / "not.gguf", keys) is None


@pytest.fixture(scope="module")
def long_token_model(llama3_tokenizer, tmp_path_factory):
    """A one-layer f32 GGUF with the real Llama-3 vocabulary (instruct keys) whose weights make
    greedy decoding emit, after any ordinary token, three tokens longer than 32 bytes (a
    `//----` rule, a run of spaces, a `####` rule) and then <|eot_id|>.

    Attention and FFN weights are zero, so each position's output is its own token's embedding:
    ordinary tokens embed as e0, the chain's tokens as e1, e2, e3; output row k of the chain reads
    the previous one's e, and <|eot_id|>'s reads e3."""
    import gguf
    import numpy as np

    from llamalocal.convert.tiktoken_bpe import read_ranks
    from llamalocal.convert.tokenizer import add_to_gguf, load_vocab

    ranked = read_ranks(llama3_tokenizer.read_bytes(), llama3_tokenizer)
    long_ids = [i for i, t in enumerate(ranked) if len(t) > 32]
    rule = [i for i in long_ids if ranked[i].startswith(b"//-")][0]
    spaces = [i for i in long_ids if not ranked[i].strip()][0]
    hashes = [i for i in long_ids if set(ranked[i]) == {ord("#")}][0]
    chain = [rule, spaces, hashes]

    vocab = load_vocab(llama3_tokenizer)
    n_vocab, d = len(vocab), 32
    emb = np.zeros((n_vocab, d), np.float32)
    emb[:, 0] = 1
    out = np.zeros((n_vocab, d), np.float32)
    for k, t in enumerate(chain, start=1):
        emb[t] = 0
        emb[t, k] = 1
        out[t, k - 1] = 1
    out[vocab.eot_id, len(chain)] = 1

    path = tmp_path_factory.mktemp("long-tokens") / "long-tokens-Instruct.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("long-tokens-Instruct")
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(d)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(d)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_to_gguf(w, vocab, instruct=True)
    ones, zeros = np.ones(d, np.float32), np.zeros((d, d), np.float32)
    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", out)
    for name, t in [("attn_norm", ones), ("attn_q", zeros), ("attn_k", zeros), ("attn_v", zeros),
                    ("attn_output", zeros), ("ffn_norm", ones), ("ffn_gate", zeros), ("ffn_up", zeros),
                    ("ffn_down", zeros)]:
        w.add_tensor(f"blk.0.{name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, b"".join(ranked[t] for t in chain).decode("utf-8"), chain


def test_long_tokens_survive_generate_and_chat(long_token_model):
    import llama_cpp
    from click.testing import CliRunner

    from llamalocal.cli import main

    path, text, chain = long_token_model
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    # the bug guarded against: llama-cpp-python's own detokenize loses every one of them
    assert all(llm.detokenize([t]) == b"" for t in chain)
    del llm

    flags = ["--temp", "0", "--threads", "1", "--ctx", "256", "--n-gpu-layers", "0"]
    r = CliRunner().invoke(main, ["generate", str(path), "-p", "Once upon a time", "-n", "16", *flags])
    assert r.exit_code == 0, r.output
    assert r.stdout == text  # all three, whole, then <|eot_id|> ended it
    assert "generated 3 tokens" in r.stderr and "stop: eos" in r.stderr

    r = CliRunner().invoke(main, ["chat", str(path), "-n", "16", *flags], input="Hello\n")
    assert r.exit_code == 0, r.output
    assert "template: llama3" in r.stderr
    assert text in r.stdout
    assert "[3 tokens" in r.stderr  # the answer ended at <|eot_id|>


def test_llama3_chat_session_prompt_is_metas(long_token_model, meta_chat):
    """The session the REPL drives sends Meta's ids, and the answer ends at <|eot_id|>."""
    import llama_cpp

    path, text, _ = long_token_model
    s = ChatSession(llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False), "llama3",
                    system="Be brief.", sampling=GREEDY)
    s.turns = [Turn("hi", "hello")]
    assert s.prompt_tokens("again") == meta_chat.encode_dialog_prompt(
        _meta_messages("Be brief.", [("hi", "hello")], "again")).tokens
    assert "".join(s.respond("again")) == text.lstrip()
    assert s.last_stats is not None and s.last_stats.stop == "eos"
