"""`serve()`: load the model with the planned placement, listen, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from llamalocal.rpc import bind_socket, is_loopback
from llamalocal.server.config import GRACEFUL_SHUTDOWN_S, ServeConfig


def serve(model_path: Path, cfg: ServeConfig, *, log: Callable[[str], None] | None = None) -> None:
    """Load the model with the planned placement, log the plan, serve until SIGINT or SIGTERM.

    On either signal the server stops admitting, ends open streams after their current token
    (finish_reason "length", then [DONE]) and waits up to GRACEFUL_SHUTDOWN_S for them to go out.
    SIGTERM then returns normally; SIGINT raises KeyboardInterrupt (the CLI exits 130).

    With `cfg.rpc`, layers go to RPC workers as planned. A worker lost while the model loads
    ends the process (one line, exit status 1), as for any command; one lost once the model is
    loaded is logged, and from then on every request that needs the model gets 503 (code
    rpc_worker_lost) while the server stays up; whatever was stuck in llama.cpp is left there.

    Raises:
        BadInputError (and the runner's GGUFError/PlanError) for a bad model, placement or address.
    """
    import uvicorn

    from llamalocal.chat import pick_template
    from llamalocal.runner import context_size, load_model
    from llamalocal.server import compat
    from llamalocal.server.app import App, model_name

    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    sock = bind_socket(cfg.host, cfg.port)  # a taken port fails before the model is loaded
    try:
        # the runner logs the plan through `say`: the same text `llamalocal plan` prints
        loaded = load_model(model_path, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers, threads=cfg.threads,
                            force=cfg.force, verbose=False, log=say, rpc=cfg.rpc)
    except BaseException:
        sock.close()
        raise
    path = Path(loaded.path)
    app = None
    apps: list[App] = []  # the App once made, for a worker lost from now on

    def worker_lost(endpoint: str, what: str) -> None:  # on the RPC relay's thread
        say(f"error: RPC worker {endpoint} {what}; answering 503 from now on")
        for a in apps:
            a.model_lost(f"RPC worker {endpoint} {what}")

    if loaded.rpc is not None:
        # until now a lost worker ended the process (the load would never finish); from here on the
        # server outlives it. The session reads its config's on_lost when a worker goes.
        loaded.rpc.cfg = dataclasses.replace(loaded.rpc.cfg, on_lost=worker_lost)
    try:
        template, why = pick_template(cfg.template, loaded.desc.name if loaded.desc is not None else None, path)
        name = model_name(path, cfg.alias)
        guard = compat.ConnectionGuard(cfg.connections_per_client, cfg.read_timeout)
        app = App(loaded.llm, name=name, template=template, api_key=cfg.api_key, parallel=cfg.parallel,
                  read_timeout=cfg.read_timeout, guard=guard, created=int(path.stat().st_mtime), log=say)
        apps.append(app)
        if loaded.rpc is not None and loaded.rpc.lost:  # lost before `apps` held it
            app.model_lost(loaded.rpc.lost)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        say(f"chat format: {template} ({why})")
        say(f"serving {name}: context {context_size(loaded.llm)} tokens, up to {cfg.parallel} requests admitted "
            f"at once{', API key required' if cfg.api_key else ''}")
        if not is_loopback(cfg.host):
            say(f"warning: listening on {cfg.host}, reachable from other machines"
                + ("" if cfg.api_key else " by anyone: consider --api-key"))
        say(f"listening on http://{shown}:{port}/v1  (Ctrl-C to stop)")

        config = uvicorn.Config(app, http=guard.protocol_class(), log_config=compat.log_config(),
                                access_log=cfg.access_log, timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
                                log_level="info", lifespan="on", ws="none")
        server = compat.make_server(config, on_exit=app.begin_shutdown)
        # uvicorn handles SIGINT/SIGTERM while it runs, then raises the signal again once it has shut
        # down: SIGTERM would kill us before the model is freed, and SIGINT would land in asyncio's
        # own handler mid-teardown (a traceback). Both land here instead.
        stopped_by: list[int] = []
        previous = {sig: signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        say("server stopped")
        if signal.SIGINT in stopped_by:
            raise KeyboardInterrupt  # the CLI exits 130, as for any Ctrl-C
    finally:
        sock.close()
        # free the model only once nothing uses it any more; otherwise leave it to the process's end
        # (and never after a lost worker: LoadedModel.close leaves the model alone then)
        if app is None or app.close(GRACEFUL_SHUTDOWN_S):
            loaded.close()
