"""Everything the server takes from other packages' internals, in one place (tests/test_server_compat.py
smoke-tests each against the installed versions, so a version bump is a one-module job).

- llama-cpp-python (pinned 0.3.36): its JSON grammar and JSON-schema-to-GBNF converter
  (`llama_cpp.llama_grammar`). Nothing else of `llama_cpp.server` or `llama_chat_format` is used:
  the routes, request checks, chat formatting and streaming are llamalocal's own.
- uvicorn: the HTTP/1.1 protocol class (subclassed to set TCP_NODELAY, bound connections per
  client and time out requests that never arrive), `Server.handle_exit` (to hear of a shutdown
  as it starts), and its default logging config (the access log moved to stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
from collections.abc import Callable
from typing import Any

# ---------------------------------------------------------------------------------------------
# llama-cpp-python: grammars
# ---------------------------------------------------------------------------------------------


def json_schema_to_gbnf(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf as convert

    return str(convert(schema_json))


def _json_gbnf() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def __getattr__(name: str) -> Any:  # JSON_GBNF, read on first use: importing llama_cpp loads libllama
    if name == "JSON_GBNF":
        return _json_gbnf()
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# uvicorn: connections and shutdown
# ---------------------------------------------------------------------------------------------

class ConnectionGuard:
    """Per-connection rules the ASGI app cannot enforce itself, since it only sees requests:

    - TCP_NODELAY on every accepted socket (a streamed token must not wait ~40 ms for Nagle);
    - at most `per_client` open connections per client address (the one over gets a 503 and is
      closed before it can hold anything);
    - a connection must deliver its next request (headers complete) within `timeout` seconds
      of opening or of its last response, or it is closed (idle and slowloris clients).
    """

    REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s")

    def __init__(self, per_client: int, timeout: float) -> None:
        self.per_client = per_client
        self.timeout = timeout
        self.open: dict[str, int] = {}  # client host -> open connections
        self.waiting: dict[tuple[str, int], asyncio.TimerHandle] = {}  # (host, port) -> its timeout
        self.refused = 0
        self._protocols: dict[tuple[str, int], Any] = {}  # (host, port) -> its protocol

    def refusal(self) -> bytes:
        from llamalocal.server.errors import ApiError

        body = ApiError(503, f"too many open connections from this client (more than {self.per_client}); "
                             "close some or reuse them", kind="server_busy").encoded()
        return self.REFUSAL % (len(body), body)

    def request_started(self, client: Any) -> None:
        timer = self.waiting.pop(tuple(client), None) if client else None
        if timer is not None:
            timer.cancel()

    def request_done(self, client: Any) -> None:
        """The response is out: the connection's next request must arrive within the timeout too."""
        if client and tuple(client) in self._protocols:
            self._arm(self._protocols[tuple(client)])

    def _arm(self, proto: Any) -> None:
        key = proto.guard_peer
        old = self.waiting.pop(key, None)
        if old is not None:
            old.cancel()
        self.waiting[key] = asyncio.get_running_loop().call_later(self.timeout, self._expire, proto)

    def _expire(self, proto: Any) -> None:
        self.waiting.pop(proto.guard_peer, None)
        transport = proto.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def protocol_class(self) -> type:
        """uvicorn's h11 protocol with these rules (pass it as uvicorn.Config(http=...))."""
        from uvicorn.protocols.http.h11_impl import H11Protocol

        guard = self

        class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
            guard_peer: tuple[str, int] = ("", 0)
            guard_admitted = False

            def connection_made(self, transport: Any) -> None:  # type: ignore[override]
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError, AttributeError):  # not TCP (a Unix socket)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = transport.get_extra_info("peername")
                host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
                self.guard_peer = (host, int(peer[1])) if isinstance(peer, tuple) and len(peer) > 1 else (host, 0)
                if guard.open.get(host, 0) >= guard.per_client:
                    guard.refused += 1
                    self.transport = transport
                    transport.write(guard.refusal())
                    transport.close()
                    return
                self.guard_admitted = True
                guard.open[host] = guard.open.get(host, 0) + 1
                guard._protocols[self.guard_peer] = self
                super().connection_made(transport)
                guard._arm(self)

            def data_received(self, data: bytes) -> None:
                if self.guard_admitted:
                    super().data_received(data)

            def connection_lost(self, exc: Exception | None) -> None:
                if not self.guard_admitted:
                    return
                self.guard_admitted = False
                host = self.guard_peer[0]
                guard.open[host] -= 1
                if guard.open[host] <= 0:
                    del guard.open[host]
                guard._protocols.pop(self.guard_peer, None)
                timer = guard.waiting.pop(self.guard_peer, None)
                if timer is not None:
                    timer.cancel()
                super().connection_lost(exc)

        return GuardedH11Protocol


def make_server(config: Any, on_exit: Callable[[], None]) -> Any:
    """A uvicorn.Server that calls `on_exit` as soon as SIGINT/SIGTERM asks it to stop (before it
    stops accepting and waits for open connections), so open streams can be ended properly."""
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            on_exit()

    return Server(config)


def log_config() -> dict[str, Any]:
    """uvicorn's logging config with the access log on stderr (stdout is for data)."""
    import uvicorn.config

    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    cfg["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return cfg
