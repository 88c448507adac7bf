"""`llamalocal serve`: thin over llamalocal.server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from llamalocal.cli.common import (
    ctx_option,
    force_option,
    gpu_layers_option,
    models_dir_option,
    threads_option,
)

# llamalocal.server imports only the standard library at the top: `--help` stays instant
from llamalocal.server import DEFAULT_HOST as _HOST
from llamalocal.server import DEFAULT_PARALLEL as _PARALLEL
from llamalocal.server import DEFAULT_PORT as _PORT


@click.command()
@click.argument("model", required=False)
@click.option("--host", default=_HOST, show_default=True,
              help="Address to listen on. Loopback by default, so only this machine can connect; "
                   "another address (0.0.0.0: every interface) exposes the model to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=_PORT, show_default=True,
              help="Port to listen on; 0 picks a free one (the address is printed).")
@click.option("--api-key", envvar="LLAMALOCAL_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every /v1 request (others get 401). "
                   "Also read from $LLAMALOCAL_API_KEY.")
@click.option("--parallel", type=click.IntRange(min=1), default=_PARALLEL, show_default=True,
              help="Requests admitted at once. The model has one context, so one request generates "
                   "while the others wait their turn in arrival order (streams are never cut off or "
                   "mixed); a request beyond N gets 503 at once. Memory does not grow with N.")
@click.option("--template", type=click.Choice(["inst", "llama3", "plain"]), default=None,
              help="Chat prompt format. Default: the GGUF's own template if it has one, else inst "
                   "([INST]) for models named *chat* and a plain dialogue otherwise, as `chat` picks.")
@click.option("--alias", default=None, help="Model id listed by /v1/models. Default: the file name without .gguf.")
@click.option("--no-access-log", "access_log", is_flag=True, flag_value=False, default=True,
              help="Do not log each request on stderr.")
@ctx_option
@gpu_layers_option
@threads_option
@force_option
@models_dir_option
def serve(model: str | None, host: str, port: int, api_key: str | None, parallel: int, template: str | None,
          alias: str | None, access_log: bool, n_ctx: int | None, n_gpu_layers: int | str, threads: int | None, force: bool,
          models_dir: Path | None) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (default: the newest converted model).

    \b
    Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
    streaming (server-sent events) or not. Point any OpenAI client at it:
      OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="KEY or anything")

    The placement (GPU layers, threads, context) is planned as for `chat` and printed at
    start-up. Chat requests use the same prompt format as `chat`. Requests whose prompt plus
    max_tokens exceed the context get 400. Ctrl-C or SIGTERM stops the server cleanly.
    Needs the server extra: pip install 'llamalocal[server]'.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"the server needs extra packages ({e.name} is missing): "
                                   "pip install 'llamalocal[server]'") from None
    from llamalocal.paths import resolve_gguf
    from llamalocal.server import ServeConfig
    from llamalocal.server import serve as run_server

    path = resolve_gguf(model, models_dir)
    cfg = ServeConfig(host=host, port=port, api_key=api_key, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                      threads=threads, force=force, parallel=parallel, alias=alias, template=template,
                      access_log=access_log)
    code = 0
    try:
        run_server(path, cfg, log=lambda text: click.echo(text, err=True))
    except KeyboardInterrupt:
        click.echo("\nInterrupted.", err=True)
        code = 130
    # A request cut off by the shutdown can leave llama.cpp state referenced from an abandoned worker
    # thread, and freeing that during interpreter teardown can crash. Everything is closed and
    # flushed by now: leave at once and let the OS reclaim the rest.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


COMMANDS = [serve]
