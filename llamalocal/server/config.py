"""What `llamalocal serve` was asked for, and the limits every request is held to (one place each)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_PARALLEL = 16
DEFAULT_READ_TIMEOUT_S = 30.0  # to send a request's headers, and again its body
DEFAULT_CONNECTIONS_PER_CLIENT = 64

MAX_BODY_BYTES = 8 * 1024 * 1024  # a prompt that fills even a 128k context is well under this
MAX_CHOICES = 16  # `n`: each choice is generated in turn on the one context
MAX_STOPS = 16  # OpenAI allows 4; llama.cpp's server any number
MAX_GRAMMAR_BYTES = 256 * 1024  # GBNF text, given or made from a JSON schema
GRAMMAR_CHECK_TIMEOUT_S = 10.0  # a child process checks each new grammar; it gets this long
GRACEFUL_SHUTDOWN_S = 5.0  # SIGINT/SIGTERM: open streams end after their current token, within this
PENALTY_LAST_N = 64  # tokens the repeat/frequency/presence penalties look back on (llama-cpp-python's)


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
    parallel: int = DEFAULT_PARALLEL  # requests admitted at once: one generates, the rest queue
    alias: str | None = None  # model id in /v1/models and in every response; default: the file's stem
    template: str | None = None  # chat prompt format (llamalocal.chat.TEMPLATES); default as `chat` picks it
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    connections_per_client: int = DEFAULT_CONNECTIONS_PER_CLIENT
    access_log: bool = True
    # llamalocal.rpc.RpcConfig: layers on RPC workers; once one is lost, requests that need the
    # model get 503 (code rpc_worker_lost) and the server stays up until it is stopped
    rpc: Any = None
