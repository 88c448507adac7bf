"""The HTTP side: a small ASGI app with the few routes llamalocal serves, each behind one gate.

    GET  /v1/models, /v1/models/{id}         the served model (its name, never its path)
    POST /v1/completions, /v1/chat/completions  streamed (SSE) or not
    POST /extras/tokenize, /extras/tokenize/count, /extras/detokenize
    GET  /health                              status; requests admitted, connections open and refused
                                              (over --connections-per-client), tokens generated

Anything else is a JSON 404 (405 for a wrong method), /v1/embeddings included. Every request
needs the key when one is set. Every POST route goes through the same
steps: the body is read under a size cap and a deadline; only then is the request admitted
(at most `parallel` at once, from admission to the last byte of the answer: one more gets 503
at once); then it is parsed, checked against the model and, for completions, queued on the
engine. Every failure on the way is a 4xx with an OpenAI-style JSON error.

Once the model can no longer run (`model_lost`: an RPC worker that held some of its layers is
gone), every POST route answers 503 (code "rpc_worker_lost") at admission, requests already
waiting on the engine get the same 503 (a stream under way: an error event, then [DONE]), and
the GET routes go on answering until the server is stopped.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from llamalocal.server.config import MAX_BODY_BYTES
from llamalocal.server.engine import Done, Engine, Event, Failed, Finished, Job, Lost, Piece
from llamalocal.server.errors import ApiError, bad_request
from llamalocal.server.requests import CHAT, COMPLETION, Request, parse_json, parse_request

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_GONE = object()  # the client disconnected


class _Slot:
    """One admission, released once (at the last byte of the answer, or when the handler ends)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.app.in_flight -= 1


class _ClientGone(Exception):
    pass


class App:
    """The ASGI app over one loaded model.

    Args:
        llm: a loaded llama_cpp.Llama.
        name: the model id in /v1/models and in every response.
        template: llamalocal.chat's template for chat requests.
        api_key: when set, every request needs `Authorization: Bearer KEY`.
        parallel: requests admitted at once; one generates, the others wait in arrival order.
        read_timeout: seconds a client has to send a request body.
        guard: the connection guard (compat.ConnectionGuard), told when requests start and end.
    """

    def __init__(self, llm: Any, *, name: str, template: str, api_key: str | None = None, parallel: int = 16,
                 read_timeout: float = 30.0, guard: Any = None, created: int | None = None,
                 log: Callable[[str], None] = lambda text: None) -> None:
        from llamalocal.runner import context_size
        from llamalocal.server.grammar import GrammarChecker

        self.llm = llm
        self.name = name
        self.template = template
        self.api_key = api_key
        self.parallel = parallel
        self.read_timeout = read_timeout
        self.guard = guard
        self.created = created if created is not None else int(time.time())
        self.log = log
        self.n_ctx = context_size(llm)
        self.engine = Engine(llm, log=log)
        self.n_vocab = self.engine.n_vocab
        self.grammars = GrammarChecker(llm.model)
        self.in_flight = 0
        self.stopping = False
        self._longest: int | None = None  # bytes of the longest token
        self._busy = 0  # threads using the model outside the engine (tokenizing, checking)
        self._idle = threading.Condition()
        self.routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/v1/models": ("GET", self._models),
            "/v1/completions": ("POST", self._completion),
            "/v1/chat/completions": ("POST", self._chat),
            "/extras/tokenize": ("POST", self._tokenize),
            "/extras/tokenize/count": ("POST", self._tokenize_count),
            "/extras/detokenize": ("POST", self._detokenize),
            "/health": ("GET", self._health),
        }

    def begin_shutdown(self) -> None:
        """Stop admitting; the engine ends open completions after their current token."""
        self.stopping = True
        self.engine.stop()

    def model_lost(self, why: str) -> None:
        """The model can no longer run (`why`: an RPC worker is gone): from now on every request
        that needs it gets 503, and those waiting on the engine are answered at once. Safe from
        any thread."""
        self.engine.abandon(why)

    def close(self, timeout: float) -> bool:
        """Stop the engine; True when the model is no longer in use and may be freed (never after
        `model_lost`: what is stuck in llama.cpp is left there, not waited for)."""
        deadline = time.monotonic() + timeout
        stopped = self.engine.close(timeout)
        if self.engine.lost is not None:
            return False
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, max(0.0, deadline - time.monotonic()))
            return stopped and self._busy == 0

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on a worker thread (tokenizing a long prompt must not stall the streams), counted
        so that the model is not freed under it at shutdown."""
        def counted() -> Any:
            with self._idle:
                self._busy += 1
            try:
                return fn(*args)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

        return await asyncio.to_thread(counted)

    # -----------------------------------------------------------------------------------------
    # ASGI entry and routing
    # -----------------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: nothing here (uvicorn closes them)
        client = scope.get("client")
        if self.guard is not None:
            self.guard.request_started(client)
        try:
            await self._http(scope, receive, send)
        except _ClientGone:
            pass
        except Exception:  # a bug: this request gets a 500 (if nothing was sent yet), the server lives on
            self.log(f"error handling {scope.get('method')} {scope.get('path')}:\n{traceback.format_exc()}")
            state = scope.get("llamalocal.response_started")
            if not state:
                await _send_json(send, 500, ApiError(500, "internal error; see the server log").body(), close=True)
        finally:
            if self.guard is not None:
                self.guard.request_done(client)

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if self.api_key is not None and not self._authorized(scope):
            await _send_error(send, ApiError(401, "invalid or missing API key: send `Authorization: Bearer KEY`",
                                             code="invalid_api_key"), close=True)
            return
        route = self.routes.get(path)
        if route is None and path.startswith("/v1/models/") and method == "GET":
            await self._model(send, path[len("/v1/models/"):])
            return
        if route is None:
            if path.rstrip("/") == "/v1/embeddings":
                err = ApiError(404, "this server does not compute embeddings (the model is loaded for generation)",
                               code="not_implemented")
            else:
                err = ApiError(404, f"no such route: {path} (this server answers /v1/models, /v1/completions, "
                                    "/v1/chat/completions and /extras/tokenize, /extras/detokenize)",
                               code="not_found")
            await _send_error(send, err, close=True)
            return
        allowed, handler = route
        if method != allowed:
            await _send_error(send, ApiError(405, f"{path} answers {allowed} only", code="method_not_allowed"),
                              close=True, headers={"allow": allowed})
            return
        if method == "GET":
            await handler(send)
            return
        if self.stopping:
            await _send_error(send, _shutting_down(), close=True)
            return
        if self.engine.lost is not None:
            await _send_error(send, _model_lost(self.engine.lost), close=True)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        if self.stopping:
            await _send_error(send, _shutting_down())
            return
        if self.engine.lost is not None:
            await _send_error(send, _model_lost(self.engine.lost))
            return
        if self.in_flight >= self.parallel:
            await _send_error(send, ApiError(503, f"server busy: {self.parallel} requests already admitted "
                                                  "(--parallel); retry shortly", kind="server_busy",
                                             headers={"retry-after": "1"}))
            return
        self.in_flight += 1
        slot = _Slot(self)
        try:
            await handler(scope, receive, send, body, slot)
        except ApiError as e:
            if not scope.get("llamalocal.response_started"):
                slot.release()
                await _send_error(send, e)
        finally:
            slot.release()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode("latin-1"), (self.api_key or "").encode("utf-8"))
        return False

    async def _read_body(self, scope: dict[str, Any], receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (too big) / 408 (too slow); a client that
        leaves mid-body is not answered."""
        too_big = ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > MAX_BODY_BYTES:
                    await _send_error(send, too_big, close=True)
                    return None
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.read_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                # in short waits: a shutdown must not wait for a slow upload
                message = await asyncio.wait_for(receive(), timeout=min(left, 0.25))
            except (TimeoutError, asyncio.TimeoutError):
                if self.stopping:
                    await _send_error(send, _shutting_down(), close=True)
                    return None
                if time.monotonic() < deadline:
                    continue
                await _send_error(send, ApiError(408, f"the request body did not arrive within {self.read_timeout:g} s",
                                                 code="request_timeout"), close=True)
                return None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await _send_error(send, too_big, close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # -----------------------------------------------------------------------------------------
    # GET routes
    # -----------------------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llamalocal"}

    async def _models(self, send: Send) -> None:
        await _send_json(send, 200, {"object": "list", "data": [self._model_card()]})

    async def _model(self, send: Send, model_id: str) -> None:
        if model_id != self.name:
            await _send_error(send, ApiError(404, f"no model {model_id!r} here; this server serves {self.name!r}",
                                             code="model_not_found", param="model"))
            return
        await _send_json(send, 200, self._model_card())

    async def _health(self, send: Send) -> None:
        connections = sum(self.guard.open.values()) if self.guard is not None else None
        refused = self.guard.refused if self.guard is not None else None
        lost = self.engine.lost
        status = "stopping" if self.stopping else "rpc_worker_lost" if lost is not None else "ok"
        await _send_json(send, 200, {"status": status, "admitted": self.in_flight, "connections": connections,
                                     "connections_refused": refused,
                                     "tokens_generated": self.engine.generated,
                                     **({"error": _model_lost(lost).message} if lost is not None else {})})

    # -----------------------------------------------------------------------------------------
    # Tokenizer routes
    # -----------------------------------------------------------------------------------------

    async def _tokenize(self, scope: dict[str, Any], receive: Receive, send: Send, body: bytes, slot: _Slot) -> None:
        tokens = await self._blocking(self._tokens_of, body)
        slot.release()
        await _send_json(send, 200, {"tokens": tokens})

    async def _tokenize_count(self, scope: dict[str, Any], receive: Receive, send: Send, body: bytes,
                              slot: _Slot) -> None:
        tokens = await self._blocking(self._tokens_of, body)
        slot.release()
        await _send_json(send, 200, {"count": len(tokens)})

    def _tokens_of(self, body: bytes) -> list[int]:
        """The ids /v1/completions would use for `input`: BOS, then the text."""
        from llamalocal.runner import tokenize_prompt

        text = parse_json(body).get("input")
        if not isinstance(text, str):
            raise bad_request("input must be a string", param="input")
        return list(tokenize_prompt(self.llm, text))

    async def _detokenize(self, scope: dict[str, Any], receive: Receive, send: Send, body: bytes,
                          slot: _Slot) -> None:
        text = await self._blocking(self._text_of, body)
        slot.release()
        await _send_json(send, 200, {"text": text})

    def _text_of(self, body: bytes) -> str:
        from llamalocal.convert import native

        tokens = parse_json(body).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("tokens must be a list of token ids", param="tokens")
        outside = [t for t in tokens if not 0 <= t < self.n_vocab]
        if outside:
            raise bad_request(f"token {outside[0]} is outside the vocabulary (0..{self.n_vocab - 1})", param="tokens")
        return b"".join(native.token_piece(self.llm.model, t) for t in tokens).decode("utf-8", "replace")

    # -----------------------------------------------------------------------------------------
    # Completions
    # -----------------------------------------------------------------------------------------

    async def _completion(self, scope: dict[str, Any], receive: Receive, send: Send, body: bytes,
                          slot: _Slot) -> None:
        await self._generate(COMPLETION, scope, receive, send, body, slot)

    async def _chat(self, scope: dict[str, Any], receive: Receive, send: Send, body: bytes, slot: _Slot) -> None:
        await self._generate(CHAT, scope, receive, send, body, slot)

    def _max_token_bytes(self) -> int:
        """The longest token of the vocabulary, in bytes (worked out once, when first needed)."""
        if self._longest is None:
            from llamalocal.convert import native

            self._longest = max(len(native.token_piece(self.llm.model, t, special=True)) for t in range(self.n_vocab))
        return max(1, self._longest)

    def _prepare(self, kind: str, body: bytes) -> tuple[Request, Any, str | None]:
        """Parse, check against the model, tokenize, check the grammar (blocking: runs in a thread)."""
        from llamalocal.server.prompts import prepare

        req = parse_request(kind, parse_json(body))
        prepared = prepare(req, self.llm, self.template, self.n_ctx, self.n_vocab, self._max_token_bytes)
        gbnf = self.grammars.gbnf(req.grammar) if req.grammar is not None else None
        return req, prepared, gbnf

    async def _generate(self, kind: str, scope: dict[str, Any], receive: Receive, send: Send, body: bytes,
                        slot: _Slot) -> None:
        req, prepared, gbnf = await self._blocking(self._prepare, kind, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Event) -> None:  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                job.cancel()

        job = Job(prepared, req.sampling, req.n, gbnf, emit)
        watcher = asyncio.create_task(_watch_disconnect(receive, job, events))
        try:
            self.engine.submit(job)
            fmt = _Format(kind, self.name)
            if req.stream:
                await self._stream(scope, send, events, fmt, req, prepared.echo, slot)
            else:
                await self._whole(scope, send, events, fmt, req, prepared.echo, slot)
        finally:
            job.cancel()  # a no-op once it is done; stops it at once if we left early
            watcher.cancel()

    async def _stream(self, scope: dict[str, Any], send: Send, events: asyncio.Queue[Any], fmt: _Format,
                      req: Request, echo: str, slot: _Slot) -> None:
        scope["llamalocal.response_started"] = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        for index in range(req.n):
            first = fmt.opening(index, echo)
            if first is not None:
                await _send_event(send, first)
        while True:
            event = await events.get()
            if event is _GONE:
                return
            if isinstance(event, Piece):
                await _send_event(send, fmt.chunk(event.index, event.text))
            elif isinstance(event, Finished):
                await _send_event(send, fmt.chunk(event.index, None, event.reason))
            elif isinstance(event, Failed):
                await _send_event(send, ApiError(500, event.message).body())
                break
            elif isinstance(event, Lost):
                await _send_event(send, _model_lost(event.message).body())
                break
            elif isinstance(event, Done):
                if req.include_usage:
                    await _send_event(send, fmt.usage_chunk(event))
                break
        slot.release()  # before the last byte: the client may send its next request the moment it has it
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _whole(self, scope: dict[str, Any], send: Send, events: asyncio.Queue[Any], fmt: _Format,
                     req: Request, echo: str, slot: _Slot) -> None:
        texts = [[echo] if echo else [] for _ in range(req.n)]
        reasons = ["length"] * req.n
        while True:
            event = await events.get()
            if event is _GONE:
                return
            if isinstance(event, Piece):
                texts[event.index].append(event.text)
            elif isinstance(event, Finished):
                reasons[event.index] = event.reason
            elif isinstance(event, Failed):
                raise ApiError(500, event.message)
            elif isinstance(event, Lost):
                raise _model_lost(event.message)
            elif isinstance(event, Done):
                slot.release()
                await _send_json(send, 200, fmt.whole(["".join(t) for t in texts], reasons, event))
                return


# ---------------------------------------------------------------------------------------------
# OpenAI's response shapes
# ---------------------------------------------------------------------------------------------

class _Format:
    """Chunks and whole responses, in OpenAI's shapes for the request's kind."""

    def __init__(self, kind: str, model: str) -> None:
        self.chat = kind == CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def opening(self, index: int, echo: str) -> dict[str, Any] | None:
        """The first chunk of a choice: the assistant role (chat) or the echoed prompt (completions)."""
        if self.chat:
            return {**self._head("chat.completion.chunk"), "choices": [
                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        return self.chunk(index, echo) if echo else None

    def chunk(self, index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text is not None else {}
            return {**self._head("chat.completion.chunk"), "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**self._head("text_completion"), "choices": [
            {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(done)}

    def whole(self, texts: list[str], reasons: list[str], done: Done) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
            return {**self._head("chat.completion"), "choices": choices, "usage": _usage(done)}
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return {**self._head("text_completion"), "choices": choices, "usage": _usage(done)}


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", kind="server_busy", code="shutting_down")


def _model_lost(why: str) -> ApiError:
    return ApiError(503, f"{why}; this server cannot generate any more: restart it once the worker is back",
                    code="rpc_worker_lost")


# ---------------------------------------------------------------------------------------------
# ASGI plumbing
# ---------------------------------------------------------------------------------------------

async def _watch_disconnect(receive: Receive, job: Job, events: asyncio.Queue[Any]) -> None:
    """Once the body is read, the next message is the client leaving: stop its job at once."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            events.put_nowait(_GONE)
            return


async def _send_event(send: Send, data: dict[str, Any]) -> None:
    payload = b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"
    await send({"type": "http.response.body", "body": payload, "more_body": True})


async def _send_json(send: Send, status: int, data: dict[str, Any], *, close: bool = False,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(data, ensure_ascii=False).encode("utf-8")
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:  # the body was not read: this connection cannot carry another request
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, err: ApiError, *, close: bool = False, headers: dict[str, str] | None = None) -> None:
    await _send_json(send, err.status, err.body(), close=close, headers={**err.headers, **(headers or {})})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def model_name(path: Path, alias: str | None) -> str:
    """The id the model is served under: the alias, or the file's stem (never its path)."""
    return alias or path.stem
