"""Every subcommand answers --help instantly and teaches something; unknown ones fail cleanly."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from llamalocal.cli import main
from llamalocal.cli.convert_cmd import PRESET_FLAGS


def _commands() -> list[str]:
    return main.list_commands(click.Context(main))


def test_every_command_has_help():
    runner = CliRunner()
    assert set(_commands()) >= {"convert", "chat", "generate", "plan", "requirements", "doctor", "serve",
                                "perplexity", "compare", "bench", "info", "list"}
    for name in _commands():
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Usage:" in r.output and len(r.output.splitlines()) > 5, name


def test_every_command_module_is_mapped():
    """Each command a module defines is reachable by its name, and from that module."""
    import importlib

    from llamalocal.cli import COMMAND_MODULES

    for module_name in set(COMMAND_MODULES.values()):
        module = importlib.import_module(f"llamalocal.cli.{module_name}")
        for command in module.COMMANDS:
            assert COMMAND_MODULES.get(command.name) == module_name, command.name
            assert main.get_command(click.Context(main), command.name) is command


def test_generate_imports_only_what_it_runs():
    """A command's start-up does not pay for the others' modules (server, RPC, converter)."""
    code = ("import sys; from llamalocal.cli import main; import click; "
            "main.get_command(click.Context(main), 'generate'); "
            "bad = [m for m in ('llamalocal.server', 'llamalocal.rpc', 'llamalocal.cli.serve_cmd', 'jinja2') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unknown_command_is_a_usage_error_not_a_traceback():
    r = CliRunner().invoke(main, ["frobnicate"])
    assert r.exit_code == 2 and "No such command" in r.output and "Traceback" not in r.output


def test_help_does_not_import_llama_cpp():
    """Heavy imports happen inside commands, so --help stays instant."""
    code = "import sys; from llamalocal.cli import main; sys.exit(1 if 'llama_cpp' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_preset_flags_are_the_presets():
    from llamalocal.convert.presets import PRESETS

    assert sorted(PRESET_FLAGS) == sorted(PRESETS)
