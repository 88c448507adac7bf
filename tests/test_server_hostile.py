"""`llamalocal serve` against clients that hold the key and misbehave (issue 14), one test group per
class of what a red team found: crashes, 500s, gate bypasses, starvation, latency, shutdown and
OpenAI semantics. Through the real `openai` client where a client library can send the request,
raw HTTP (and raw sockets) where only a hostile client would. After every request the server must
be alive, serving, and have answered the bad ones with a 4xx JSON error."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from test_server import KEY, Server, assert_serving, open_stream, request, start_server, stop

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

CTX = 2048
PARALLEL = 2
READ_TIMEOUT = 2.0
PER_CLIENT = 24
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def gguf(converted):
    return converted("tiny-v1", "q8_0")


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory) -> Iterator[Server]:
    s = start_server(gguf, tmp_path_factory.mktemp("hostile") / "server.log", "--read-timeout", str(READ_TIMEOUT),
                     "--connections-per-client", str(PER_CLIENT), ctx=CTX, parallel=PARALLEL)
    try:
        yield s
    finally:
        stop(s.proc)
    assert "Traceback" not in s.log_text()


@pytest.fixture(scope="module")
def vocab(gguf):
    """llama-cpp-python's own view of the model's vocabulary: the reference for token ids and text."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def assert_json_error(status: int, reply: dict | str, expected: int, needle: str = "") -> None:
    assert status == expected, (status, reply)
    assert isinstance(reply, dict) and isinstance(reply["error"]["message"], str), reply
    assert needle in reply["error"]["message"], reply


def completion(server: Server, **body) -> tuple[int, dict | str]:
    return request(server.port, "POST", "/v1/completions", json.dumps({"prompt": "The king", "max_tokens": 4, **body}))


def chat_messages(text: str = "Who is the king?") -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# crash: grammars that llama.cpp answers with NULL, an abort, a stack overflow or an endless loop
# ---------------------------------------------------------------------------------------------

BAD_GRAMMARS = {
    "parse error": "root ::= [a-",
    "undefined rule": "root ::= missing",
    "left recursion": 'root ::= root "a" | "b"',
    "no root": 'start ::= "a"',
    "a token the vocabulary lacks": "root ::= <[5000]>",
    "max below min (2**64 repeats)": 'root ::= "a"{5,2}',
    "nested 5000 deep (a parser stack overflow in a worker thread)": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000,
}

BAD_SCHEMAS = {
    "empty anyOf": {"anyOf": []},
    "quote in a property name": {"type": "object", "properties": {'a"b': {"type": "string"}}},
    "quote in an enum value": {"enum": ['x"y']},
    "backreference in a pattern": {"type": "string", "pattern": "^(a)\\1$"},
    "pattern without anchors": {"type": "string", "pattern": "a+"},
}


@pytest.mark.parametrize("name", BAD_GRAMMARS)
def test_bad_grammar_is_a_400_not_a_crash(server, name):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="any", prompt="The king", max_tokens=4,
                                           extra_body={"grammar": BAD_GRAMMARS[name]})
    assert e.value.body["code"] == "invalid_grammar" and e.value.body["param"] == "grammar"
    assert "cannot be used" in e.value.body["message"]
    assert_serving(server)


@pytest.mark.parametrize("form", ["json_schema", "json_object"])
@pytest.mark.parametrize("name", BAD_SCHEMAS)
def test_bad_json_schema_is_a_400_not_a_crash(server, name, form):
    schema = BAD_SCHEMAS[name]
    fmt = ({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}} if form == "json_schema"
           else {"type": "json_object", "schema": schema})  # llama-cpp-python's own extension
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="any", messages=chat_messages(), max_tokens=8,
                                                response_format=fmt)
    assert e.value.body["code"] == "invalid_grammar" and e.value.body["param"] == "response_format"
    assert_serving(server)


def test_grammar_constrains_the_output(server):
    c = server.client()
    r = c.completions.create(model="any", prompt="The king", max_tokens=8, temperature=0,
                             extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="any", prompt="The king", max_tokens=12, temperature=0, stream=True,
        extra_body={"grammar": 'root ::= [0-9]+ " crowns"'}))
    assert streamed.endswith(" crowns") and streamed[: -len(" crowns")].isdigit(), streamed


@pytest.mark.parametrize("stream", [False, True])
def test_grammar_that_dead_ends_mid_answer_ends_the_choice(server, stream):
    """'a', then a token the vocabulary does not have: the first step passes every check, the second
    allows nothing. Sampling would hand the grammar a token it forbids, and llama.cpp (through
    llama-cpp-python's create_completion) dies of std::terminate; here the choice just ends."""
    kw = {"model": "any", "prompt": "The king", "max_tokens": 8, "extra_body": {"grammar": 'root ::= "a" <[5000]>'}}
    c = server.client()
    if stream:
        chunks = list(c.completions.create(stream=True, **kw))
        text, finish = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = c.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (text, finish) == ("a", "stop")
    assert_serving(server)


def test_json_schema_response_format_is_honoured(server):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    r = server.client().chat.completions.create(
        model="any", messages=chat_messages("Is the king dead?"), max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # any JSON object
    r = server.client().chat.completions.create(model="any", messages=chat_messages(), max_tokens=48,
                                                temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_crashing_grammar_check_takes_only_the_child(gguf, monkeypatch):
    """With the pre-check switched off, a grammar nested 60000 deep overflows llama.cpp's parser
    stack: the forked copy dies of it, this process does not, and the request gets the reason."""
    import llama_cpp

    from llamalocal.server import grammar
    from llamalocal.server.errors import ApiError
    from llamalocal.server.requests import GrammarSource

    monkeypatch.setattr(grammar, "lint", lambda gbnf: None)
    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        checker = grammar.GrammarChecker(llm.model, timeout=30)
        with pytest.raises(ApiError) as e:
            checker.gbnf(GrammarSource("gbnf", "root ::= " + "(" * 60000 + '"a"' + ")" * 60000))
        assert e.value.status == 400 and "crashed on it (SIGSEGV)" in e.value.message
        assert checker.gbnf(GrammarSource("gbnf", 'root ::= "ok"')) == 'root ::= "ok"'  # and it still works
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------
# crash: token ids outside the vocabulary
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [[99999], [-5], [1, 2**31], [True]])
def test_detokenize_checks_ids(server, tokens):
    status, reply = request(server.port, "POST", "/extras/detokenize", json.dumps({"tokens": tokens}))
    assert_json_error(status, reply, 400, "token")
    assert_serving(server)


def test_tokenize_and_detokenize_agree_with_llama_cpp(server, vocab):
    status, reply = request(server.port, "POST", "/extras/tokenize", json.dumps({"input": "The king is dead"}))
    assert status == 200
    assert reply["tokens"] == vocab.tokenize(b"The king is dead", add_bos=True, special=False)
    status, count = request(server.port, "POST", "/extras/tokenize/count", json.dumps({"input": "The king is dead"}))
    assert status == 200 and count["count"] == len(reply["tokens"])
    ids = reply["tokens"][1:]
    status, text = request(server.port, "POST", "/extras/detokenize", json.dumps({"tokens": ids}))
    assert status == 200 and text["text"] == vocab.detokenize(ids).decode("utf-8")


@pytest.mark.parametrize("prompt", [[1, 99999], [-1], [[1, 99999]]])
def test_prompt_token_ids_are_checked(server, prompt):
    status, reply = completion(server, prompt=prompt)
    assert_json_error(status, reply, 400, "outside the vocabulary")
    assert_serving(server)


def test_prompt_as_token_ids_is_served(server, vocab):
    ids = vocab.tokenize(b"The king", add_bos=True)
    by_ids = server.client().completions.create(model="any", prompt=ids, max_tokens=6, temperature=0)
    by_text = server.client().completions.create(model="any", prompt="The king", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


# ---------------------------------------------------------------------------------------------
# 500 + traceback before: now every malformed request is a 4xx JSON error
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_any_content_type_is_read_as_json(server, content_type):
    status, reply = request(server.port, "POST", "/v1/completions", json.dumps({"prompt": "The king", "max_tokens": 3}),
                            content_type=content_type)
    assert status == 200 and reply["object"] == "text_completion", reply


@pytest.mark.parametrize("body,field", [
    ('{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ('{"prompt": "ok", "stop": ["\\udfff"], "max_tokens": 2}', "stop"),
    ('{"prompt": "ok", "model": "a\\ud800b", "max_tokens": 2}', "model"),
    ('{"prompt": "ok", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
])
def test_lone_surrogates_are_a_400(server, body, field):
    status, reply = request(server.port, "POST", "/v1/completions", body)
    assert_json_error(status, reply, 400, "lone surrogate")
    assert reply["error"]["param"] == field
    status, reply = request(server.port, "POST", "/v1/chat/completions",
                            '{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert_json_error(status, reply, 400, "lone surrogate")


@pytest.mark.parametrize("body", ["[" * 3000 + "]" * 3000, '{"a": ' * 3000 + "1" + "}" * 3000,
                                  '{"prompt": "x", "stop": ' + "[" * 150 + "]" * 150 + "}"])
def test_deep_nesting_is_a_400(server, body):
    status, reply = request(server.port, "POST", "/v1/completions", body)
    assert_json_error(status, reply, 400, "nested too deeply")
    assert_serving(server)


@pytest.mark.parametrize("bias,needle", [({"abc": 1}, "token ids"), ({"1.5": 1}, "token ids"),
                                         ({"99999": 1}, "outside the vocabulary"), ({"-3": 1}, "0 or more"),
                                         ({"5": 1000}, "-100 to 100"), ({"5": "x"}, "-100 to 100")])
def test_bad_logit_bias_is_a_400(server, bias, needle):
    status, reply = completion(server, logit_bias=bias)
    assert_json_error(status, reply, 400, needle)
    assert reply["error"]["param"] == "logit_bias"


def test_logit_bias_is_applied(server, vocab):
    token = vocab.tokenize(b" crown", add_bos=False)[-1]
    r = server.client().completions.create(model="any", prompt="The king", max_tokens=5, temperature=0,
                                           logit_bias={str(token): 100})
    assert r.choices[0].text == vocab.detokenize([token] * 5).decode("utf-8")


@pytest.mark.parametrize("extra,needle", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "cannot force"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}}, "not in tools"),
    ({"tools": "f"}, "tools must be a list"),
])
def test_tool_choice_that_cannot_be_honoured_is_a_400(server, extra, needle):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="any", messages=chat_messages(), max_tokens=4, **extra)
    assert needle in e.value.body["message"]
    assert_serving(server)


def test_offered_tools_with_auto_get_a_text_answer(server):
    r = server.client().chat.completions.create(
        model="any", messages=chat_messages(), max_tokens=4, tool_choice="auto",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert r.choices[0].message.content is not None and not r.choices[0].message.tool_calls


def test_embeddings_are_a_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().embeddings.create(model="any", input="The king")
    assert "does not compute embeddings" in e.value.body["message"]
    assert_serving(server)


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "only text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "tool results"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n must be"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n must be"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e400}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": True}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": [1.5]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
     "either grammar or response_format"),
    ("/v1/completions", {"prompt": "x", "stream_options": "yes"}, "stream_options"),
])
def test_malformed_fields_are_a_400(server, path, body, needle):
    status, reply = request(server.port, "POST", path, json.dumps(body))
    assert_json_error(status, reply, 400, needle)


def test_huge_integer_is_a_400(server):
    status, reply = request(server.port, "POST", "/v1/completions", '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}")
    assert_json_error(status, reply, 400, "not valid JSON")


# ---------------------------------------------------------------------------------------------
# gate bypass: every route is gated; unsupported ones are a JSON 404/405
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,status", [
    ("POST", "/v1/engines/copilot-codex/completions", 404),
    ("POST", "/v1/engines/davinci/completions", 404),
    ("POST", "/extras/unknown", 404),
    ("GET", "/docs", 404),
    ("GET", "/v1/completions", 405),
    ("POST", "/v1/models", 405),
])
def test_unsupported_routes_are_json_errors(server, method, path, status):
    for content_type in ("application/json", "text/plain"):
        code, reply = request(server.port, method, path, json.dumps({"prompt": "x"}), content_type=content_type)
        assert_json_error(code, reply, status)
    code, reply = request(server.port, method, path, json.dumps({"prompt": "x"}), key="wrong")
    assert_json_error(code, reply, 401)  # the key first, for every route


def raw_exchange(port: int, head: bytes, body_chunks: Iterator[bytes], timeout: float = 30) -> tuple[int, bytes]:
    """Send a request as raw bytes (the body from an iterator, so it may be huge) from a thread,
    read the answer meanwhile, and return (status, response bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def sender() -> None:
            try:
                s.sendall(head)
                for chunk in body_chunks:
                    s.sendall(chunk)
            except OSError:
                pass  # the server answered and closed: what a client that keeps sending meets

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        received = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                received += data
        except (ConnectionResetError, TimeoutError):
            pass
        t.join(timeout)
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else 0
    return status, received


def _head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/extras/tokenize"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_cap_holds_on_every_route_and_memory_stays_flat(server, path, framing):
    rss_before = psutil.Process(server.proc.pid).memory_info().rss
    total = 20 * MIB
    piece = b'{"prompt": "' + b"a" * (MIB - 12)

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            sent += len(piece)
            yield (b"%x\r\n%s\r\n" % (len(piece), piece)) if framing == "chunked" else piece

    extra = f"Content-Length: {total}\r\n" if framing == "content-length" else "Transfer-Encoding: chunked\r\n"
    status, reply = raw_exchange(server.port, _head(path, extra), body())
    assert status == 413, reply[:300]
    assert b"over 8388608 bytes" in reply
    grown = psutil.Process(server.proc.pid).memory_info().rss - rss_before
    assert grown < 48 * MIB, f"RSS grew by {grown / MIB:.0f} MiB"
    assert_serving(server)


# ---------------------------------------------------------------------------------------------
# starvation: slow uploaders, idle connections, too many connections
# ---------------------------------------------------------------------------------------------

def wait_for_quiet(server: Server, timeout: float = READ_TIMEOUT + 10) -> None:
    """Until earlier tests' idle keep-alive connections are gone (the server closes them within its
    read timeout): the per-client connection cap counts them too."""
    deadline = time.monotonic() + timeout
    while True:
        status, reply = request(server.port, "GET", "/health")
        if reply["connections"] <= 1 or time.monotonic() > deadline:  # 1: this request's own
            return
        time.sleep(0.2)


def test_slow_uploaders_do_not_starve_others_and_time_out(server):
    n_slow = 16  # 8 times --parallel
    wait_for_quiet(server)
    body = json.dumps({"prompt": "The king", "max_tokens": 2}).encode()
    socks = []
    for _ in range(n_slow):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(_head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body[:1])
        socks.append(s)
    stop_dribbling = threading.Event()

    def dribble() -> None:  # one more byte now and then, never the whole body
        i = 1
        while not stop_dribbling.wait(0.25) and i < len(body) - 1:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.sendall(body[i:i + 1])
            i += 1

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        started = time.monotonic()
        served = 0
        client = server.client()
        while time.monotonic() - started < READ_TIMEOUT * 0.8:  # while they all still hold their connections
            r = client.completions.create(model="any", prompt="Once", max_tokens=2, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length")
            served += 1
        assert served >= 3
        # each slow uploader gets a 408 once its read timeout is up
        for s in socks:
            s.settimeout(READ_TIMEOUT + 10)
            reply = b""
            while b"}" not in reply:
                data = s.recv(4096)
                if not data:
                    break
                reply += data
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"did not arrive within" in reply
    finally:
        stop_dribbling.set()
        for s in socks:
            s.close()
    assert_serving(server)


def test_idle_connections_are_closed(server):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT + 10) for _ in range(4)]
    partial = socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT + 10)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers that never finish
    start = time.monotonic()
    try:
        for s in [*idle, partial]:
            assert s.recv(1024) == b""  # closed by the server, without an answer
        assert time.monotonic() - start < READ_TIMEOUT + 5
    finally:
        for s in [*idle, partial]:
            s.close()
    assert_serving(server)


def test_connections_per_client_are_capped(server):
    wait_for_quiet(server)
    refused_before = request(server.port, "GET", "/health")[1]["connections_refused"]
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(PER_CLIENT)]
    try:
        time.sleep(0.2)  # let the server accept them all
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            reply = b""
            while True:
                data = extra.recv(4096)
                if not data:
                    break
                reply += data
        assert reply.startswith(b"HTTP/1.1 503"), reply
        error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
        assert "too many open connections" in error["message"]
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert request(server.port, "GET", "/health")[1]["connections_refused"] == refused_before + 1
    assert_serving(server)


# ---------------------------------------------------------------------------------------------
# latency: TCP_NODELAY on every connection
# ---------------------------------------------------------------------------------------------

def test_keep_alive_requests_do_not_wait_for_nagle(server):
    client = server.client()
    client.models.list()  # the connection is open from here on
    times = []
    for _ in range(20):
        t = time.perf_counter()
        client.models.list()
        times.append(time.perf_counter() - t)
    times.sort()
    # with Nagle's algorithm against the client's delayed ACK (40 ms at least on Linux) each of
    # these takes over 40 ms; without, a few ms even on a busy machine
    assert times[len(times) // 2] < 0.03, times
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        raw = []
        for _ in range(10):
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "The", "max_tokens": 1}),
                         headers={"Authorization": f"Bearer {KEY}"})
            assert conn.getresponse().read()
            raw.append(time.perf_counter() - t)
    finally:
        conn.close()
    raw.sort()
    assert raw[len(raw) // 2] < 0.035, raw


# ---------------------------------------------------------------------------------------------
# OpenAI semantics
# ---------------------------------------------------------------------------------------------

def test_n_choices_are_served(server):
    c = server.client()
    r = c.completions.create(model="any", prompt="The king", max_tokens=5, temperature=0, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) == 1  # greedy: the same text three times
    assert r.usage.completion_tokens == sum(5 for _ in r.choices)
    r = c.chat.completions.create(model="any", messages=chat_messages(), max_tokens=6, temperature=1.0, seed=7, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    chunks = list(c.chat.completions.create(model="any", messages=chat_messages(), max_tokens=6, temperature=0,
                                            n=3, stream=True))
    by_index: dict[int, str] = {}
    finished = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1, 2] and len(set(by_index.values())) == 1


def test_max_completion_tokens_is_honoured(server):
    c = server.client()
    r = c.chat.completions.create(model="any", messages=chat_messages(), max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens <= 5
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 5
    chunks = list(c.chat.completions.create(model="any", messages=chat_messages(), max_completion_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_developer_is_system(server):
    c = server.client()
    answers = []
    for role in ("system", "developer"):
        r = c.chat.completions.create(model="any", max_tokens=12, temperature=0, messages=[
            {"role": role, "content": "Speak as the king."}, {"role": "user", "content": "Who are you?"}])
        answers.append((r.choices[0].message.content, r.usage.prompt_tokens))
    assert answers[0] == answers[1]


def test_model_in_responses_is_the_served_name_never_a_path(server):
    for body in ({"prompt": "x", "max_tokens": 1}, {"prompt": "x", "max_tokens": 1, "model": "/etc/passwd"}):
        status, reply = request(server.port, "POST", "/v1/completions", json.dumps(body))
        assert status == 200 and reply["model"] == server.gguf.stem
    assert str(server.gguf.parent) not in json.dumps(request(server.port, "GET", "/v1/models")[1])
    assert server.client().models.retrieve(server.gguf.stem).id == server.gguf.stem
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("other")


def generated(server: Server) -> int:
    status, reply = request(server.port, "GET", "/health")
    assert status == 200
    return int(reply["tokens_generated"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_generation(server, stream):
    """16 choices filling the context would take tens of seconds; the client leaves after a moment
    and the engine stops at once: the token counter stops moving, far below the budget."""
    budget = 16 * (CTX - 8)
    before = generated(server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"prompt": "The king", "max_tokens": 0, "n": 16, "stream": stream}).encode()
    sock.sendall(_head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body)
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(0.3)
    sock.close()
    time.sleep(1.0)
    at_leave = generated(server)
    time.sleep(1.0)
    after = generated(server)
    assert after == at_leave, "generation went on after the client left"
    assert after - before < budget / 4, (after - before, budget)
    assert_serving(server)  # the next request is served at once


# ---------------------------------------------------------------------------------------------
# shutdown: SIGTERM/SIGINT end open streams properly
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_shutdown_ends_open_streams_properly(gguf, tmp_path, sig, code):
    s = start_server(gguf, tmp_path / "server.log", ctx=CTX, parallel=3)
    results: dict[str, object] = {}
    try:
        c = s.client()
        # a stream of 16 context-filling choices (tens of seconds), one queued behind it, one not streamed
        stream = c.completions.create(model="any", prompt="The king", max_tokens=0, n=16, temperature=0,
                                      stream=True)
        first = next(iter(stream))
        queued_conn, queued = open_stream(s.port, {"messages": chat_messages(), "max_tokens": 0},
                                          path="/v1/chat/completions")

        def whole() -> None:
            try:
                results["whole"] = c.completions.create(model="any", prompt="Once", max_tokens=0, n=4)
            except Exception as e:  # reported by the assertion below
                results["whole"] = e

        t = threading.Thread(target=whole)
        t.start()
        time.sleep(0.3)
        sent = time.monotonic()
        s.proc.send_signal(sig)
        chunks = [first, *stream]  # must end cleanly: no APIConnectionError
        finished = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason}
        assert sorted(finished) == list(range(16)), finished
        assert set(finished.values()) <= {"length", "stop"}
        events = [line for line in queued.read().split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        queued_conn.close()
        t.join(30)
        assert not isinstance(results["whole"], Exception), results["whole"]
        s.proc.wait(30)
        assert time.monotonic() - sent < 10
    finally:
        stop(s.proc)
    assert s.proc.returncode == code, s.log_text()
    assert "Traceback" not in s.log_text() and "server stopped" in s.log_text()


def test_requests_during_shutdown_are_refused_cleanly(gguf, tmp_path):
    s = start_server(gguf, tmp_path / "server.log", ctx=CTX)  # the default 30 s read timeout
    try:
        stream = s.client().completions.create(model="any", prompt="The king", max_tokens=0, n=16, stream=True)
        next(iter(stream))
        uploading = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        uploading.sendall(_head("/v1/completions", "Content-Length: 1000\r\n") + b'{"prompt": ')
        time.sleep(0.2)
        sent = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            status, reply = completion(s)
            assert_json_error(status, reply, 503, "shutting down")
        except OSError:
            pass  # or the listening socket is already closed: either way nothing half-done
        # an upload in progress is not waited for: it gets a 503 at once, not its 30 s
        answer = uploading.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer, answer
        uploading.close()
        list(stream)
        s.proc.wait(30)
        assert time.monotonic() - sent < 10
    finally:
        stop(s.proc)
    assert s.proc.returncode == 0 and "Traceback" not in s.log_text()
