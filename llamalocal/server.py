"""`llamalocal serve`: an OpenAI-compatible HTTP endpoint over a model placed by our planner.

The HTTP side is llama-cpp-python's own server (`llama_cpp.server`: FastAPI routes for
/v1/models, /v1/completions, /v1/chat/completions, its OpenAI request types, SSE streaming,
bearer-key check), run by uvicorn. What this module adds:

- the model is loaded by `llamalocal.runner.load_model` (the planned placement, logged at
  start-up) and handed to the stock routes instead of the stock loader;
- chat requests are formatted as `llamalocal chat` formats them (llamalocal.chat: Meta's `[INST]`
  for a Llama-2 chat model, a plain dialogue for a base model), or with the GGUF's own template;
- a gate in front of the stock routes for what they get wrong (measured against 0.3.36):
  malformed JSON answers a text/plain 500, a schema error a 500, a prompt longer than the context
  with `stream: true` a 200 and then a broken stream, `max_tokens` past the context a 500 (with
  the stock `logits_all=True`). The gate answers each with a 4xx and an OpenAI-style JSON error
  before the request reaches the model, and bounds how many requests are admitted at once;
- the stock `interrupt_requests` (a waiting request cuts off a running stream) is turned off,
  so requests wait their turn on the model's lock, in arrival order, and each runs to its end.

The stock routes keep their model and settings in module globals, so there is one app per process.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalocal.errors import BadInputError
from llamalocal.runner import context_size

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_PARALLEL = 16
MAX_BODY_BYTES = 8 * 1024 * 1024  # a prompt that fills even a 128k context is well under this
GRACEFUL_SHUTDOWN_S = 5  # how long SIGINT/SIGTERM waits for open streams before cutting them

# the routes the gate checks, and the stock request type each body must parse as
_COMPLETION = "/v1/completions"
_CHAT = "/v1/chat/completions"
_KEYED_PREFIXES = ("/v1/", "/extras/")


@dataclass
class ServeConfig:
    """What `llamalocal serve` was asked for. Placement fields go to the runner unchanged."""

    host: str = DEFAULT_HOST  # loopback: nothing off this machine can reach the model
    port: int = DEFAULT_PORT  # 0 lets the OS pick a free one (the chosen port is logged)
    api_key: str | None = None
    n_ctx: int | None = None
    n_gpu_layers: int | str = "auto"
    threads: int | None = None
    force: bool = False
    parallel: int = DEFAULT_PARALLEL  # requests admitted at once: one runs, the rest queue
    alias: str | None = None  # model id in /v1/models; default: the file's stem
    template: str | None = None  # chat prompt format, "inst" or "plain"; default as `chat` picks it
    access_log: bool = True
    rpc: Any = None  # llamalocal.rpc.RpcConfig: layers on RPC workers (a lost one: 503 from then on)


# ---------------------------------------------------------------------------------------------
# Chat format
# ---------------------------------------------------------------------------------------------

def messages_to_dialog(messages: list[dict[str, Any]]) -> tuple[str | None, list[Any], str]:
    """OpenAI messages as llamalocal.chat's (system, finished turns, pending user message).
    Consecutive messages of one role are joined; the last message must be the user's."""
    from llamalocal.chat import Turn

    system = "\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "system") or None
    runs: list[tuple[str, str]] = []  # (role, text), consecutive roles merged
    for m in messages:
        role = m.get("role")
        if role not in ("user", "assistant"):
            continue  # system handled above; tool/function results have no place in these formats
        text = _content_text(m.get("content"))
        if runs and runs[-1][0] == role:
            runs[-1] = (role, runs[-1][1] + "\n" + text)
        else:
            runs.append((role, text))
    if not runs or runs[-1][0] != "user":
        raise RequestProblem(400, "the last message must be the user's", param="messages")
    if runs[0][0] == "assistant":
        runs.insert(0, ("user", ""))
    turns = [Turn(runs[k][1], runs[k + 1][1]) for k in range(0, len(runs) - 1, 2)]
    return system, turns, runs[-1][1]


def _content_text(content: Any) -> str:
    """OpenAI message content is a string or a list of parts; only text parts mean anything here."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def dialog_formatter(llm: Any, template: str) -> Callable[..., Any]:
    """A llama-cpp-python chat formatter for llamalocal.chat's `template` ("inst" or "plain").

    llamalocal.chat tokenizes each segment on its own with BOS/EOS as ids; here the segments are
    joined with BOS/EOS as their special-token text and tokenized once with special tokens parsed,
    which gives the same ids: llama.cpp starts every text fragment after a special token with the
    dummy-prefix space, as a separate encode did (tested in tests/test_server.py)."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse

    from llamalocal.chat import format_dialog, stops_for

    bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8")
    stops = list(stops_for(template)) or None

    def formatter(*, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        system, turns, pending = messages_to_dialog(messages)
        text = "".join((bos if seg.bos else "") + seg.text + (eos if seg.eos else "")
                       for seg in format_dialog(template, system, turns, pending))
        return ChatFormatterResponse(prompt=text, stop=stops, added_special=True)

    return formatter


def choose_chat_formatter(llm: Any, path: Path, override: str | None = None) -> tuple[str, Any]:
    """(description, formatter) for chat requests: `override` ("inst"/"plain") if given, else the
    GGUF's own chat template if it carries one (ours do not), else llamalocal.chat's choice:
    Meta's Llama-2 `[INST]` format for a model named *chat*, a plain dialogue for a base model."""
    from llama_cpp import llama_chat_format as lcf

    from llamalocal.chat import pick_template

    template = llm.metadata.get("tokenizer.chat_template")
    if template and override is None:
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        return "the GGUF's chat template", lcf.Jinja2ChatFormatter(
            template=template, bos_token=bos, eos_token=eos, stop_token_ids=[llm.token_eos()])
    chosen, why = pick_template(override, llm.metadata.get("general.name"), path)
    return f"{chosen} ({why})", dialog_formatter(llm, chosen)


# ---------------------------------------------------------------------------------------------
# Request checks (pure: the gate calls them off the event loop)
# ---------------------------------------------------------------------------------------------

class RequestProblem(Exception):
    """A request the server refuses: HTTP status plus an OpenAI-style error object."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.error = {"message": message, "type": kind, "param": param, "code": code}


def prepare_request(path: str, body: bytes, llm: Any, formatter: Any) -> bytes:
    """The body to pass on to the stock route, or RequestProblem for one it would answer badly:
    not JSON, not the request type, one prompt too many, logprobs (needs logits_all), or prompt +
    max_tokens beyond the context window (OpenAI's rule, and what keeps every request bounded).

    One default changes: `temperature: 0` without a `repeat_penalty` means plain argmax, as
    `llamalocal generate --temp 0` does, not argmax after llama.cpp's default 1.1 penalty."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError

    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestProblem(400, f"request body is not valid JSON: {e}") from None
    kind = CreateChatCompletionRequest if path == _CHAT else CreateCompletionRequest
    try:
        req = kind.model_validate(data)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise RequestProblem(400, f"invalid request: {where}") from None

    if path == _CHAT:
        if req.logprobs:
            raise RequestProblem(400, "logprobs are not supported by this server", param="logprobs")
        formatted = formatter(messages=req.messages, functions=req.functions, tools=req.tools)
        n_prompt = len(llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special,
                                    special=True))
    else:
        if req.logprobs is not None:
            raise RequestProblem(400, "logprobs are not supported by this server", param="logprobs")
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) > 1:
                raise RequestProblem(400, "send one prompt per request (got a list of several)", param="prompt")
            prompt = prompt[0] if prompt else ""
        n_prompt = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))

    n_ctx = context_size(llm)
    max_tokens = req.max_tokens if req.max_tokens and req.max_tokens > 0 else 0  # 0: fill the context
    param = "messages" if path == _CHAT else "prompt"
    if n_prompt >= n_ctx:
        raise RequestProblem(400, f"the prompt is {n_prompt} tokens but the context window is {n_ctx}; "
                                  "shorten it, or restart the server with a larger --ctx",
                             code="context_length_exceeded", param=param)
    if n_prompt + max_tokens > n_ctx:
        raise RequestProblem(400, f"max_tokens={max_tokens} does not fit: the context window is {n_ctx} tokens and "
                                  f"the prompt takes {n_prompt}, so at most {n_ctx - n_prompt} can be generated",
                             code="context_length_exceeded", param="max_tokens")

    if isinstance(data, dict) and data.get("temperature") == 0 and "repeat_penalty" not in data:
        data["repeat_penalty"] = 1.0
        return json.dumps(data).encode("utf-8")
    return body


# ---------------------------------------------------------------------------------------------
# The gate: ASGI middleware in front of the stock routes
# ---------------------------------------------------------------------------------------------

class RequestGate:
    """Key check, admission bound and body checks for the completion routes.

    `parallel` counts requests from admission until the last byte of their response (stream
    included) is sent or the client is gone; one more gets 503 at once instead of an ever longer
    queue.
    """

    def __init__(self, app: Any, *, check: Callable[[str, bytes], bytes], api_key: str | None,
                 parallel: int, stopping: Callable[[], bool] = lambda: False,
                 unavailable: Callable[[], str | None] | None = None) -> None:
        self.app = app
        self.stopping = stopping
        self.unavailable = unavailable
        self.check = check
        self.api_key = api_key
        self.parallel = parallel
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key is not None and path.startswith(_KEYED_PREFIXES) and not self._authorized(scope):
            await _reply(RequestProblem(401, "invalid or missing API key: send `Authorization: Bearer KEY`",
                                        code="invalid_api_key"), scope, receive, send)
            return
        if scope["method"] != "POST" or path not in (_COMPLETION, _CHAT):
            await self.app(scope, receive, send)
            return
        if self.unavailable is not None and (why := self.unavailable()):
            await _reply(_lost(why), scope, receive, send)
            return
        if self.in_flight >= self.parallel:
            await _reply(RequestProblem(503, f"server busy: {self.parallel} requests already admitted "
                                             "(--parallel); retry shortly", kind="server_busy"),
                         scope, receive, send, headers={"Retry-After": "1"})
            return
        self.in_flight += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.in_flight -= 1

        async def send_releasing(message: dict) -> None:
            # the slot is free once the last byte is handed over, before the app's own teardown
            # (which for a stream lags behind): the client may already be sending its next request
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            await self._checked(path, scope, receive, send_releasing)
        finally:
            release()

    async def _checked(self, path: str, scope: dict, receive: Callable, send: Callable) -> None:
        from anyio import to_thread

        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before it finished sending: nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _reply(RequestProblem(413, f"request body over {MAX_BODY_BYTES} bytes"), scope, receive, send)
                return
        try:
            # tokenizing a long prompt takes a while: keep the event loop free for the streams
            body = await to_thread.run_sync(self.check, path, body)
        except RequestProblem as problem:
            await _reply(problem, scope, receive, send)
            return

        replayed = False

        async def replay() -> dict:
            # the route reads the body we already took; after that, the real channel (disconnects)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            if self.stopping():
                # shutting down: the stock stream loop polls for a disconnect after every chunk, so
                # this ends open streams at once, cleanly, instead of cancelling them after a timeout
                return {"type": "http.disconnect"}
            return await receive()

        if self.unavailable is None:
            await self.app(scope, replay, send)
        else:
            await self._watched(scope, replay, send)

    async def _watched(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The route, unless the model's RPC worker is lost meanwhile: the route is then stuck in
        llama.cpp for good (ggml's RPC calls have no timeout), so answer for it (503, or an error
        event that ends a stream already under way) and leave it behind."""
        import asyncio

        started = cut = False

        async def forward(message: dict) -> None:
            nonlocal started
            if cut:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, forward))
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            why = None if task.done() else self.unavailable()  # type: ignore[misc]
            if why:
                cut = True
                problem = _lost(why)
                if not started:
                    await _reply(problem, scope, receive, send)
                else:
                    event = b"data: " + json.dumps({"error": problem.error}).encode() + b"\r\n\r\n"
                    await send({"type": "http.response.body", "body": event, "more_body": False})
                return
        task.result()

    def _authorized(self, scope: dict) -> bool:
        import hmac

        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                given = token.strip().encode("utf-8", "surrogateescape")
                return scheme.lower() == "bearer" and hmac.compare_digest(given, (self.api_key or "").encode("utf-8"))
        return False


def _lost(why: str) -> RequestProblem:
    return RequestProblem(503, f"{why}; this server cannot generate any more: restart it once the worker is back",
                          kind="server_error", code="rpc_worker_lost")


async def _reply(problem: RequestProblem, scope: dict, receive: Callable, send: Callable,
                 headers: dict[str, str] | None = None) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"error": problem.error}, status_code=problem.status, headers=headers)(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The app and the server
# ---------------------------------------------------------------------------------------------

def build_app(llm: Any, path: Path, *, alias: str | None = None, api_key: str | None = None,
              parallel: int = DEFAULT_PARALLEL, formatter: Any = None,
              stopping: Callable[[], bool] = lambda: False,
              unavailable: Callable[[], str | None] | None = None) -> Any:
    """The stock llama_cpp.server routes over an already loaded `llm`, behind our RequestGate.

    Args:
        llm: a loaded llama_cpp.Llama (logits_all=False).
        path: the GGUF it came from (names the model, picks the chat format).
        alias: the model id /v1/models reports; default the file's stem. Any id is accepted in requests.
        api_key: when set, every /v1 and /extras request needs `Authorization: Bearer KEY`.
        parallel: requests admitted at once; one generates, the others wait in arrival order.
        formatter: chat formatter; default `choose_chat_formatter(llm, path)`.
        stopping: tells whether the server is shutting down (open streams are then ended).
        unavailable: why the model can no longer run (a lost RPC worker), or None while it can.
    Returns:
        The ASGI app (FastAPI).
    """
    from fastapi import FastAPI
    from llama_cpp import llama_chat_format as lcf
    from llama_cpp.server import app as stock
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    if formatter is None:
        formatter = choose_chat_formatter(llm, path)[1]
    llm.chat_handler = lcf.chat_formatter_to_chat_completion_handler(formatter)

    class _LoadedProxy(LlamaProxy):
        """The stock proxy, handed the model our runner loaded instead of loading one itself."""

        def load_llama_from_model_settings(self, settings: ModelSettings) -> Any:  # type: ignore[override]
            return llm

    # explicit values everywhere: these are pydantic BaseSettings and would otherwise read env vars
    stock.set_server_settings(ServerSettings(host="", port=0, api_key=api_key, interrupt_requests=False,
                                             disable_ping_events=False, root_path=""))
    stock._llama_proxy = _LoadedProxy(models=[ModelSettings(model=str(path), model_alias=alias or path.stem,
                                                            verbose=False)])

    app = FastAPI(title="llamalocal", version=_version())
    app.include_router(stock.router)

    def check(route: str, body: bytes) -> bytes:
        return prepare_request(route, body, llm, formatter)

    app.add_middleware(RequestGate, check=check, api_key=api_key, parallel=parallel, stopping=stopping,
                       unavailable=unavailable)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket, bound now so a taken port fails before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BadInputError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                            "pick another --port (0 picks a free one) or --host") from None
    return sock


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_path: Path, cfg: ServeConfig, *, log: Callable[[str], None] | None = None) -> None:
    """Load the model with the planned placement, log the plan, serve until SIGINT or SIGTERM.

    SIGTERM returns normally after a graceful shutdown; SIGINT ends in KeyboardInterrupt after it
    (the CLI exits 130). Open streams get GRACEFUL_SHUTDOWN_S seconds to finish.

    Raises:
        BadInputError (and the runner's GGUFError/PlanError) for a bad model, placement or address.
    """
    import copy

    import uvicorn
    import uvicorn.config

    from llamalocal.runner import load_model

    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    rpc = cfg.rpc
    if rpc is not None:  # a lost worker does not end the server: its requests get 503 from then on
        import dataclasses

        rpc = dataclasses.replace(rpc, on_lost=lambda ep, what: say(f"error: RPC worker {ep} {what}; "
                                                                    "answering 503 from now on"))
    # the runner logs the plan through `say`: the same text `llamalocal plan` prints
    loaded = load_model(model_path, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers, threads=cfg.threads,
                        force=cfg.force, verbose=False, log=say, rpc=rpc)
    unavailable = (lambda: loaded.rpc.lost) if loaded.rpc is not None else None
    try:
        if loaded.plan is None:
            say(f"placement: not planned (the runner returned no plan); model {loaded.path}")
        fmt_name, formatter = choose_chat_formatter(loaded.llm, Path(loaded.path), cfg.template)
        servers: list[Any] = []  # the uvicorn.Server, once made: its should_exit is set by SIGINT/SIGTERM
        app = build_app(loaded.llm, Path(loaded.path), alias=cfg.alias, api_key=cfg.api_key,
                        parallel=cfg.parallel, formatter=formatter,
                        stopping=lambda: bool(servers) and servers[0].should_exit, unavailable=unavailable)
        sock = bind_socket(cfg.host, cfg.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        alias = cfg.alias or Path(loaded.path).stem
        say(f"chat format: {fmt_name}")
        say(f"serving {alias}: context {context_size(loaded.llm)} tokens, up to {cfg.parallel} requests admitted "
            f"at once{', API key required' if cfg.api_key else ''}")
        if not is_loopback(cfg.host):
            say(f"warning: listening on {cfg.host}, reachable from other machines"
                + ("" if cfg.api_key else " by anyone: consider --api-key"))
        say(f"listening on http://{shown}:{port}/v1  (Ctrl-C to stop)")

        # uvicorn's access log goes to stdout by default; ours keeps stdout for data
        log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
        log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
        server = uvicorn.Server(uvicorn.Config(app, log_config=log_config, access_log=cfg.access_log,
                                               timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                               log_level="info"))
        servers.append(server)
        # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises the signal once it has shut
        # down: SIGTERM would kill us before the model is freed, and SIGINT would land in
        # asyncio's own handler mid-teardown (a traceback). Both land here instead.
        stopped_by: list[int] = []
        previous = {sig: signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sock.close()
        say("server stopped")
        if signal.SIGINT in stopped_by:
            raise KeyboardInterrupt  # the CLI exits 130, as for any Ctrl-C
    finally:
        loaded.close()  # not after a lost worker: freeing the model would wait on it for ever


def _version() -> str:
    from llamalocal import __version__

    return __version__
