"""`llamalocal worker`: this machine's CPU (or a GPU) as a device for another machine's model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from llamalocal.cli.common import SIZE, threads_option
from llamalocal.rpc import DEFAULT_HOST, DEFAULT_PORT


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on. Loopback by default; any other address needs --key-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to listen on; 0 picks a free one (printed).")
@threads_option
@click.option("--mem", type=SIZE, default=None,
              help="Advertise at most this much memory (e.g. 24GiB): clients plan this worker's share with it.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep received weights in this folder, so loading the same model again does not resend them.")
@click.option("--device", default="CPU", show_default=True,
              help="ggml device to serve: CPU, or a GPU by ggml's name (CUDA0, Metal, Vulkan0; see `doctor`).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pre-shared key: clients must prove they hold it (--rpc-key-file) before anything reaches "
                   "ggml. Needed for any --host other than loopback.")
@click.option("--direct", is_flag=True, hidden=True,
              help="Serve ggml's RPC server itself on --host:--port: no relay, no key (for measuring the relay).")
def worker(host: str, port: int, threads: int | None, mem: int | None, cache: Path | None, device: str,
           key_file: Path | None, direct: bool) -> None:
    """Serve this machine's CPU (or a GPU) to llamalocal clients on other machines.

    \b
    A client places layers here through llama.cpp's RPC backend:
      llamalocal worker --host 0.0.0.0 --key-file rpc.key           # on this machine
      llamalocal chat 70B --rpc THIS-HOST:50052 --rpc-key-file rpc.key  # on the other one

    Prints the endpoint on stdout. Ctrl-C or SIGTERM stops it. One client at a time (another
    waits until the first is done); `plan --rpc` can ask for this worker's memory meanwhile.

    Security: ggml's RPC server has no authentication and has had memory-safety bugs. It listens
    on loopback only; what reaches it comes through llamalocal's relay, which first makes each
    client prove it holds the key (HMAC-SHA256 of fresh nonces) and drops and logs everything
    else. The traffic after that is authenticated, not encrypted: use it on a network you trust.
    Make a key with `openssl rand -hex 32 > rpc.key && chmod 600 rpc.key` and copy the file to
    each machine.
    """
    from llamalocal.rpc import WorkerConfig, key_file_warning, read_key, run_worker

    key = None
    if key_file is not None:
        key = read_key(key_file)
        problem = key_file_warning(key_file)
        if problem:
            click.echo(f"warning: {problem}", err=True)
    cfg = WorkerConfig(host=host, port=port, threads=threads, mem=mem, cache=cache, device=device, key=key,
                       direct=direct)
    code = run_worker(cfg, out=click.echo, log=lambda msg: click.echo(msg, err=True))
    # ggml's server thread has no way to stop: leave at once, the OS closes its sockets
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


COMMANDS = [worker]
