"""`llamalocal serve`: an OpenAI-compatible HTTP endpoint over a model placed by our planner.

The seams, one module each:

- config    what was asked for (ServeConfig) and every limit a request is held to;
- requests  body bytes to a checked Request (no model needed), or a 400 naming the field;
- prompts   a Request to prompt ids, budget and stops (llamalocal.chat formats chat requests);
- grammar   `grammar` / `response_format` to GBNF that llama.cpp is known to accept (checked in a
            forked copy, since llama.cpp can crash on a bad one);
- engine    the one thread that runs the model: completions in turn, cancellable between tokens;
- app       the ASGI app: routes, the key, the body cap and deadline, admission, JSON and SSE;
- compat    everything taken from other packages' internals (llama-cpp-python's JSON-schema
            converter, uvicorn's protocol and server classes), smoke-tested in one place;
- run       serve(): load, listen, shut down gracefully.

Importing this package imports only the standard library, so `llamalocal serve --help` is instant.
"""

from __future__ import annotations

from llamalocal.server.config import (
    DEFAULT_CONNECTIONS_PER_CLIENT,
    DEFAULT_HOST,
    DEFAULT_PARALLEL,
    DEFAULT_PORT,
    DEFAULT_READ_TIMEOUT_S,
    ServeConfig,
)
from llamalocal.server.run import bind_socket, is_loopback, serve

__all__ = ["DEFAULT_CONNECTIONS_PER_CLIENT", "DEFAULT_HOST", "DEFAULT_PARALLEL", "DEFAULT_PORT",
           "DEFAULT_READ_TIMEOUT_S", "ServeConfig", "bind_socket", "is_loopback", "serve"]
