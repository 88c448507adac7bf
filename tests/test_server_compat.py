"""Smoke test of llamalocal.server.compat: every piece of another package's internals the server
leans on, against the installed versions. When llama-cpp-python or uvicorn is bumped, this file
says what moved."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e '.[server]')")


def test_pinned_llama_cpp_python():
    import llama_cpp

    from llamalocal.convert import native

    assert llama_cpp.__version__ == native.PINNED_LLAMA_CPP_PYTHON


def test_json_grammars_are_accepted_by_llama_cpp(converted):
    import llama_cpp

    from llamalocal.convert import native
    from llamalocal.server import compat

    llm = llama_cpp.Llama(str(converted("tiny-v1", "q8_0")), vocab_only=True, verbose=False)
    try:
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                  "required": ["name"]}
        gbnf = compat.json_schema_to_gbnf(json.dumps(schema))
        assert "root ::=" in gbnf
        assert native.grammar_allowed(llm.model, gbnf) == 1  # only "{" can start the object
        assert native.grammar_allowed(llm.model, compat.JSON_GBNF)  # any JSON object
    finally:
        llm.close()


def test_log_config_sends_the_access_log_to_stderr():
    from llamalocal.server import compat

    cfg = compat.log_config()
    assert cfg["handlers"]["access"]["stream"] == "ext://sys.stderr"
    assert "uvicorn.access" in cfg["loggers"]


def test_make_server_hears_of_the_shutdown_first():
    import signal

    import uvicorn

    from llamalocal.server import compat

    heard = []
    server = compat.make_server(uvicorn.Config(lambda scope, receive, send: None), on_exit=lambda: heard.append(1))
    assert isinstance(server, uvicorn.Server)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and heard == [1]


@pytest.fixture()
def guarded() -> Iterator[tuple[int, object]]:
    """A real uvicorn on a free port with the guard's protocol and a trivial app; (port, guard)."""
    import uvicorn

    from llamalocal.server import compat
    from llamalocal.server.run import bind_socket

    guard = compat.ConnectionGuard(per_client=3, timeout=1.0)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        guard.request_started(scope["client"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        guard.request_done(scope["client"])

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, http=guard.protocol_class(), lifespan="off", log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1], guard
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def test_guard_sets_nodelay_caps_connections_and_times_out_silent_ones(guarded):
    port, guard = guarded
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        conns[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"ok"):
            reply += conns[0].recv(4096)
        assert reply.startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 5
        while len(guard._protocols) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)  # accepted by the event loop in its own time
        sockets = [p.transport.get_extra_info("socket") for p in list(guard._protocols.values())]
        assert len(sockets) == 3
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as fourth:
            reply = fourth.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
        # the silent ones are closed after the timeout; the one that was served, after its timeout too
        start = time.monotonic()
        for c in conns:
            assert c.recv(4096) == b""
        assert time.monotonic() - start < 5
    finally:
        for c in conns:
            c.close()
    time.sleep(0.1)
    assert guard.open == {} and guard.waiting == {}
