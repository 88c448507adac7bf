"""llamalocal's errors: the converter's family (llamalocal.convert.errors), plus what running a
model can meet. Import any of them from here outside the converter."""

from __future__ import annotations

from llamalocal.convert.errors import (
    BadInputError,
    CheckpointError,
    ChecksumError,
    DiskSpaceError,
    LlamalocalError,
    OutputExistsError,
    Terminated,
    UnsafePickleError,
)

__all__ = ["BadInputError", "CheckpointError", "ChecksumError", "DiskSpaceError", "GGUFError", "LlamalocalError",
           "ModelNotFoundError", "OutputExistsError", "PlanError", "Terminated", "UnsafePickleError"]


class ModelNotFoundError(BadInputError):
    """No model (checkpoint directory or GGUF) where the user pointed."""


class GGUFError(BadInputError):
    """A file that is not a readable GGUF."""


class PlanError(BadInputError):
    """The requested placement cannot fit (and --force was not given)."""
