"""The `llamalocal` command: a thin click layer over the library.

Each group of verbs lives in its own module (convert, run, plan, serve, measure) and only
parses flags, calls library functions and prints. Heavy imports (llama_cpp, numpy) happen
inside the commands so `--help` is instant. Library errors become one line on stderr and
an exit code here, and nowhere else.
"""

from __future__ import annotations

import sys

import click

from llamalocal import __version__
from llamalocal.errors import LlamalocalError


class _Group(click.Group):
    """Root group: maps LlamalocalError to a one-line message and its exit code, Ctrl-C to 130."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LlamalocalError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(130)
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


def _register() -> None:
    from llamalocal.cli import convert_cmd, imatrix_cmd, measure_cmd, plan_cmd, run_cmd, serve_cmd

    for module in (convert_cmd, imatrix_cmd, run_cmd, plan_cmd, serve_cmd, measure_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
