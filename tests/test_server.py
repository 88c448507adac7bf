"""`llamalocal serve`: the real server in a subprocess on a free loopback port, driven by the
real `openai` client (and by raw HTTP for the bodies a client library would never send)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
CTX = 512
PARALLEL = 4
STARTUP_TIMEOUT_S = 60
THREADS = "1"  # the test machines are small and shared: spinning ggml threads on a busy CPU crawl

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e '.[server]')")


# ---------------------------------------------------------------------------------------------
# A server subprocess and plain-HTTP helpers
# ---------------------------------------------------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    gguf: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(gguf: Path, log: Path, *extra: str, ctx: int = CTX, parallel: int = PARALLEL) -> Server:
    """`llamalocal serve GGUF --port 0 ...`; returns once /v1/models answers."""
    cmd = [sys.executable, "-m", "llamalocal", "serve", str(gguf), "--port", "0", "--ctx", str(ctx),
           "--threads", THREADS, "--api-key", KEY, "--parallel", str(parallel), *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    port = None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            if port is None:
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", log.read_text(errors="replace"))
                port = int(m.group(1)) if m else None
            if port is not None:
                try:
                    status, _ = request(port, "GET", "/v1/models")
                    if status == 200:
                        return Server(proc, port, log, gguf)
                except OSError:
                    pass  # bound but not listening yet
            time.sleep(0.2)
        raise AssertionError(f"server not ready within {STARTUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def request(port: int, method: str, path: str, body: bytes | str | None = None, key: str | None = KEY,
            timeout: float = 60, content_type: str | None = "application/json") -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": content_type} if content_type else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def open_stream(port: int, body: dict, path: str = "/v1/completions"
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST a streaming request and return once its status line and headers are in."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    return conn, conn.getresponse()


def first_event(resp: http.client.HTTPResponse) -> bytes:
    while True:
        line = resp.readline()
        if not line or line.startswith(b"data: "):
            return line


def assert_serving(server: Server) -> None:
    """The process is alive and a small completion comes back whole."""
    assert server.proc.poll() is None, server.log_text()
    r = server.client().completions.create(model="any", prompt="Once", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 4


def greedy(server: Server, prompt: str, n: int, stream: bool = False) -> str:
    c = server.client()
    if stream:
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model="any", prompt=prompt, max_tokens=n, temperature=0, stream=True))
    return c.completions.create(model="any", prompt=prompt, max_tokens=n, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def gguf(converted) -> Path:
    return converted("tiny-v1", "q8_0")


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory) -> Iterator[Server]:
    s = start_server(gguf, tmp_path_factory.mktemp("serve") / "server.log")
    try:
        yield s
    finally:
        stop(s.proc)


# ---------------------------------------------------------------------------------------------
# The OpenAI surface, through the openai client
# ---------------------------------------------------------------------------------------------

def test_startup_logs_the_plan_and_the_address(server):
    log = server.log_text()
    assert "listening on http://127.0.0.1:" in log
    plan = subprocess.run([sys.executable, "-m", "llamalocal", "plan", str(server.gguf), "--ctx", str(CTX),
                           "--threads", THREADS], cwd=REPO, capture_output=True, timeout=60)
    assert plan.returncode == 0, plan.stderr.decode(errors="replace")
    # the same placement text as `llamalocal plan` (aside: free memory, which moves, and plan's
    # own note on where its hardware description came from)
    lines = [ln for ln in plan.stdout.decode().splitlines()
             if ln.strip() and "available" not in ln and not ln.startswith("hardware:")]
    assert lines and all(ln in log for ln in lines), (lines, log)
    assert f"context {CTX} tokens" in log and "chat format: plain" in log
    assert "Traceback" not in log


def test_lists_the_model(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [server.gguf.stem]


def test_chat_completion_plain_and_streamed_agree(server):
    c = server.client()
    messages = [{"role": "system", "content": "Speak briefly."}, {"role": "user", "content": "Who is the king?"}]
    r = c.chat.completions.create(model="any", messages=messages, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.prompt_tokens < CTX and 0 < r.usage.completion_tokens <= 24
    assert r.model == server.gguf.stem  # the served model's name, whatever the request said
    chunks = list(c.chat.completions.create(model="any", messages=messages, max_tokens=24, temperature=0,
                                            stream=True))
    assert len(chunks) >= 2
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert streamed == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_text_completion_plain_and_streamed_agree(server):
    r = server.client().completions.create(model="any", prompt="The king", max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens <= 12
    assert greedy(server, "The king", 12, stream=True) == r.choices[0].text


def test_temperature_zero_is_deterministic_and_equals_generate(server):
    prompt, n = "The king", 24
    first = greedy(server, prompt, n)
    assert greedy(server, "Something else to move the cache", 8)  # a different prompt in between
    assert greedy(server, prompt, n) == first
    out = subprocess.run(
        [sys.executable, "-m", "llamalocal", "generate", str(server.gguf), "-p", prompt, "-n", str(n),
         "--temp", "0", "--ctx", str(CTX), "--threads", THREADS],
        cwd=REPO, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    # the same tokens, decoded the same way (bytes that are not UTF-8 as U+FFFD, in both)
    assert out.stdout.decode("utf-8") == first


def test_wrong_or_missing_key_gets_401(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.status_code == 401
    for key in ("wrong", None):
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", json.dumps({"prompt": "hi"}))):
            status, reply = request(server.port, method, path, body, key=key)
            assert status == 401, (key, path, reply)
            assert reply["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------------------------
# Bounded: bad bodies, over-long prompts, absurd max_tokens, disconnects, a full queue
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,needle", [
    ("/v1/completions", '{"prompt": "hi", ', "not valid JSON"),
    ("/v1/chat/completions", "\xff\xfe not json", "not valid JSON"),
    ("/v1/completions", "[1, 2]", "invalid request"),
    ("/v1/completions", '{"prompt": "hi", "temperature": "hot"}', "temperature"),
    ("/v1/chat/completions", '{"messages": "hello"}', "messages"),
    ("/v1/chat/completions", '{"messages": []}', "last message"),
    ("/v1/completions", '{"prompt": ["one", "two"]}', "one prompt"),
])
def test_malformed_body_gets_400_json_and_server_keeps_serving(server, path, body, needle):
    status, reply = request(server.port, "POST", path, body.encode("latin-1"))
    assert status == 400, reply
    assert needle in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"
    assert_serving(server)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_prompt_longer_than_context_gets_400(server, stream, kind):
    c = server.client()
    long_text = "the king is dead " * CTX
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            c.chat.completions.create(model="any", messages=[{"role": "user", "content": long_text}],
                                      max_tokens=8, stream=stream)
        else:
            c.completions.create(model="any", prompt=long_text, max_tokens=8, stream=stream)
    assert e.value.status_code == 400
    assert e.value.body["code"] == "context_length_exceeded"
    assert_serving(server)


@pytest.mark.parametrize("stream", [False, True])
def test_absurd_max_tokens_gets_400(server, stream):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="any", prompt="The king", max_tokens=10**9, stream=stream)
    assert e.value.status_code == 400
    assert "max_tokens" in e.value.body["message"]
    # the whole remaining context is allowed (admitted: it starts streaming), one more token is not
    n_prompt = c.completions.create(model="any", prompt="The king", max_tokens=1).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="any", prompt="The king", max_tokens=CTX - n_prompt + 1)
    conn, resp = open_stream(server.port, {"prompt": "The king", "max_tokens": CTX - n_prompt})
    try:
        assert resp.status == 200
        assert first_event(resp).startswith(b"data: {")
    finally:
        conn.close()
    assert_serving(server)


def test_disconnecting_clients_free_their_slots(server):
    # more abandoned streams than there are slots: a slot (or the model lock) kept by a gone
    # client would leave the server answering 503 (or hanging) below
    for _ in range(PARALLEL + 2):
        conn, resp = open_stream(server.port, {"prompt": "The king", "max_tokens": 0, "temperature": 0})
        assert resp.status == 200
        assert first_event(resp).startswith(b"data: {")  # generation has started
        conn.sock.shutdown(2)
        conn.close()
    deadline = time.monotonic() + 30
    while True:
        status, reply = request(server.port, "POST", "/v1/completions",
                                json.dumps({"prompt": "Once", "max_tokens": 4, "temperature": 0}))
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, reply
    assert_serving(server)


def test_requests_beyond_parallel_get_503_and_the_rest_complete(server):
    held = []
    try:
        for _ in range(PARALLEL):  # admitted: one generating, the others waiting for the model
            conn, resp = open_stream(server.port, {"prompt": "The king", "max_tokens": 100, "temperature": 0})
            assert resp.status == 200
            held.append((conn, resp))
        status, reply = request(server.port, "POST", "/v1/completions", json.dumps({"prompt": "hi"}))
        assert status == 503, reply
        assert "busy" in reply["error"]["message"]
        # every admitted stream runs to its end and ends with [DONE]
        for _conn, resp in held:
            events = [line for line in resp.read().split(b"\n") if line.startswith(b"data: ")]
            assert events[-1] == b"data: [DONE]"
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        for conn, _ in held:
            conn.close()
    assert_serving(server)


def test_concurrent_requests_get_their_own_answers(server):
    prompts = ["The king", "My lord", "Good morrow", "What say you"]
    expected = {p: greedy(server, p, 4) for p in prompts}
    results: dict[tuple[str, bool], str] = {}
    errors: list[BaseException] = []

    def ask(p: str, stream: bool) -> None:
        # back to back, as a client does: a slot must be free again as soon as an answer is in
        try:
            answers = [greedy(server, p, 4, stream=stream) for _ in range(5)]
            results[(p, stream)] = answers[0] if len(set(answers)) == 1 else f"differed: {answers}"
        except BaseException as e:  # reported below, with the others
            errors.append(e)

    # exactly PARALLEL clients: none may be turned away, none may get another's text
    pairs = [(p, s) for p in prompts for s in (False, True)][:PARALLEL]
    threads = [threading.Thread(target=ask, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == {(p, s): expected[p] for p, s in pairs}
    assert_serving(server)


# ---------------------------------------------------------------------------------------------
# Start-up and shutdown
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_stops_the_server_cleanly_with_a_stream_open(gguf, tmp_path, sig, code):
    s = start_server(gguf, tmp_path / "server.log")
    try:
        conn, resp = open_stream(s.port, {"prompt": "The king", "max_tokens": 0})
        assert resp.status == 200
        s.proc.send_signal(sig)
        s.proc.wait(30)
        conn.close()
    finally:
        stop(s.proc)
    assert s.proc.returncode == code, s.log_text()
    assert "Traceback" not in s.log_text()
    if sig == signal.SIGTERM:
        assert "server stopped" in s.log_text()


def test_taken_port_is_a_clear_error(gguf, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "llamalocal", "serve", str(gguf), "--port", str(port),
                              "--ctx", str(CTX), "--threads", THREADS], cwd=REPO, capture_output=True, timeout=120)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr.decode()


# ---------------------------------------------------------------------------------------------
# Chat prompts are `llamalocal chat`'s, token for token
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["inst", "plain"])
def test_chat_prompt_tokens_equal_llamalocal_chat(gguf, template):
    import llama_cpp

    from llamalocal.chat import Turn, encode, format_dialog
    from llamalocal.server.prompts import chat_tokens
    from llamalocal.server.requests import CHAT, parse_request

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who is the king?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Richard."}]},
                {"role": "developer", "content": "Answer in English."},  # a system message, joined to the first
                {"role": "user", "content": "And the queen?"}]
    req = parse_request(CHAT, {"messages": messages})
    got = chat_tokens(llm, template, req.messages)
    want = encode(llm, format_dialog(template, "Be brief.\nAnswer in English.", [Turn("Who is the king?", "Richard.")],
                                     "And the queen?"))
    assert got == want
    assert got.count(llm.token_bos()) == (2 if template == "inst" else 1)


def test_chat_answer_equals_llamalocal_chat(server):
    """The same greedy answer, token for token, as `llamalocal chat` gives in-process."""
    import llama_cpp

    from llamalocal.chat import ChatSession
    from llamalocal.runner import Sampling

    messages = [{"role": "system", "content": "Speak briefly."}, {"role": "user", "content": "Who is the king?"}]
    r = server.client().chat.completions.create(model="any", messages=messages, max_tokens=32, temperature=0)
    llm = llama_cpp.Llama(str(server.gguf), n_ctx=CTX, n_threads=1, verbose=False)
    try:
        session = ChatSession(llm, "plain", system="Speak briefly.", max_tokens=32, sampling=Sampling(temp=0))
        assert "".join(session.respond("Who is the king?")) == r.choices[0].message.content
    finally:
        llm.close()


def test_is_loopback():
    from llamalocal.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
