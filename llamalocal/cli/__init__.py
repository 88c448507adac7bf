"""The `llamalocal` command: a thin click layer over the library.

Each group of verbs lives in its own module (convert, run, plan, serve, measure) and only
parses flags, calls library functions and prints. Heavy imports (llama_cpp, numpy) happen
inside the commands so `--help` is instant. Library errors become one line on stderr and
an exit code here, and nowhere else; `printable` is how any text that may carry a file's content
(a tensor name, a folder name, a checklist line) reaches the terminal.
"""

from __future__ import annotations

import importlib
import sys

import click

from llamalocal import __version__
from llamalocal.errors import LlamalocalError, Terminated

MAX_MESSAGE_CHARS = 2000  # a message longer than this is cut (a hostile name can be megabytes)


def _escape(ch: str) -> str:
    n = ord(ch)
    if 0xDC80 <= n <= 0xDCFF:  # a byte that was not UTF-8 (a file name decoded with surrogateescape)
        return f"\\x{n - 0xDC00:02x}"
    if n <= 0xFF:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{n:02x}")
    return f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def printable(text: str) -> str:
    """`text` as one line that the terminal shows as it is: newlines, escape sequences (ANSI
    colours, cursor moves), other control and format characters (bidi overrides), separators and
    undecodable bytes are written as Python escapes (\\n, \\x1b, \\u202e), and the whole is cut
    at MAX_MESSAGE_CHARS. A file cannot make a message span lines or fake another one."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() or ch == " " else _escape(ch) for ch in text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}... ({len(text) - MAX_MESSAGE_CHARS} more characters)"
    return text


# command -> the module that defines it; a module is imported only when one of its commands runs
# (or `--help` lists them), so `generate` does not pay for the server, RPC or converter imports
COMMAND_MODULES = {
    "convert": "convert_cmd", "imatrix": "imatrix_cmd", "chat": "run_cmd", "generate": "run_cmd",
    "plan": "plan_cmd", "requirements": "plan_cmd", "doctor": "plan_cmd", "serve": "serve_cmd",
    "perplexity": "measure_cmd", "compare": "measure_cmd", "bench": "measure_cmd", "info": "measure_cmd",
    "list": "measure_cmd", "worker": "worker_cmd",
}


# Commands whose process ends without Python's teardown once they succeeded and their output is
# flushed: freeing a loaded model (~30 ms for a 0.4 GB file, more the bigger it is) and clearing
# every module is work done after the answer, for nobody. Only commands that leave no files,
# children or temporary directories behind; any other command, and any failure, exits normally.
FAST_EXIT_COMMANDS = frozenset({"generate", "chat", "plan", "info", "list", "requirements", "doctor"})
_succeeded: list[str] = []  # the subcommand that returned normally, if any
_armed = False  # set by `entry`: this process is the program, not a test's CliRunner
_kept: list[object] = []


def keep_until_exit(obj: object) -> None:
    """Hold `obj` (a loaded model) until the process ends: when it ends through `entry`'s fast
    exit, the model is never freed (freeing it as the command returns would cost as much as the
    teardown skipped). Under click's CliRunner (tests) nothing is held."""
    if _armed:
        _kept.append(obj)


class _Group(click.Group):
    """Root group: loads each command's module on first use; maps LlamalocalError to a one-line
    message and its exit code, Ctrl-C to 130, SIGTERM/SIGHUP during a conversion to 128 + the signal."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = COMMAND_MODULES.get(cmd_name)
        if module_name is None:
            return None
        module = importlib.import_module(f"llamalocal.cli.{module_name}")
        return next(c for c in module.COMMANDS if c.name == cmd_name)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            result = super().invoke(ctx)
            if ctx.invoked_subcommand:
                _succeeded.append(ctx.invoked_subcommand)
            return result
        except LlamalocalError as e:
            click.echo(f"Error: {printable(str(e))}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(130)
        except Terminated as e:
            click.echo("\nTerminated; nothing was kept.", err=True)
            ctx.exit(e.exit_code)
        except BrokenPipeError:
            # `llamalocal generate ... | head` closing the pipe early is not an error
            sys.stderr.close()
            ctx.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="llamalocal")
def main() -> None:
    """Convert Meta's LLaMA checkpoints to GGUF and run them on this machine.

    \b
    Typical use:
      llamalocal convert 13B --q4_0          # Meta download -> one GGUF file
      llamalocal plan                        # what would fit where, before loading
      llamalocal chat --n-gpu-layers auto    # chat with the newest converted model

    Models are looked up under --models-dir (default: $LLAMALOCAL_MODELS, else the
    current directory).
    """


def entry() -> None:
    """The `llamalocal` program (console script and `python -m llamalocal`): `main`, then, after a
    command of FAST_EXIT_COMMANDS succeeded, an exit that skips the interpreter's teardown."""
    global _armed
    _armed = True
    try:
        main()
    except SystemExit as e:
        if e.code in (None, 0) and _succeeded and _succeeded[-1] in FAST_EXIT_COMMANDS:
            _exit_now()
        raise


def _exit_now() -> None:
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stream: let the normal exit report it
        return
    os._exit(0)
