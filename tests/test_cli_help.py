"""Every subcommand answers --help instantly and teaches something; unknown ones fail cleanly."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from llamalocal.cli import main
from llamalocal.cli.convert_cmd import PRESET_FLAGS


def test_every_command_has_help():
    runner = CliRunner()
    assert set(main.commands) >= {"convert", "chat", "generate", "plan", "requirements", "doctor", "serve",
                                  "perplexity", "compare", "bench", "info", "list"}
    for name in main.commands:
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Usage:" in r.output and len(r.output.splitlines()) > 5, name


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
