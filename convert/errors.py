"""The one family of errors llamalocal raises for things a user can fix.

The converter (this package, installed as `llamalocal.convert`) defines the family; the rest of
llamalocal extends it in `llamalocal.errors`, so dependencies point one way. Library code raises
these; only the CLI turns them into a one-line message and an exit code (2 for bad input, 1 for
other failures, 130 for Ctrl-C). Real bugs are left as tracebacks. Every message says what is
wrong and what to do next.
"""

from __future__ import annotations


class LlamalocalError(Exception):
    """A failure the user can act on. `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInputError(LlamalocalError):
    """The user's input (files, flags, checkpoint contents) is wrong: exit code 2."""

    exit_code = 2


class CheckpointError(BadInputError):
    """A checkpoint that cannot be read: missing, truncated, corrupt or unsafe."""


class UnsafePickleError(CheckpointError):
    """The checkpoint's pickle asks for something a weight file never needs."""


class ChecksumError(BadInputError):
    """A file does not match its md5 in checklist.chk."""


class OutputExistsError(BadInputError):
    """The output file exists and --force was not given."""


class DiskSpaceError(LlamalocalError):
    """Not enough free disk for the output."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived during a conversion. Raised in the main thread, like
    KeyboardInterrupt for Ctrl-C, so every cleanup on the way out runs (the partial output is
    removed); not an error. The CLI exits with 128 + the signal number, as the shell would."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
