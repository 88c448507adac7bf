"""llamalocal: Meta's LLaMA checkpoints to a running local chat."""

__version__ = "0.1.0"
