"""Runtime settings shared by the planner, the runner and the CLI: one place each.

The planner predicts what the runner will allocate, so both must agree on the context cap,
the batch sizes and the KV cache types; the CLI offers exactly the cache types listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamalocal.errors import BadInputError

# The default context: the model's own, capped (a 4096-token f16 KV cache of 70B is 1.25 GiB;
# Llama 3.1's own 131072 tokens would be 16 GiB for 8B).
DEFAULT_CTX_CAP = 4096
CTX_PAD = 256  # llama.cpp rounds the KV cache up to a multiple of this
N_BATCH = 512  # llama-cpp-python's logical batch (tokens per llama_decode call)
N_UBATCH_MAX = 512  # the physical batch: a larger logical batch (perplexity windows) does not grow the compute buffer


@dataclass(frozen=True)
class CacheType:
    """A KV cache element type llama.cpp accepts for both K and V."""

    name: str  # the CLI's spelling, and gguf-py's GGMLQuantizationType member in lower case

    @property
    def ggml_type(self) -> Any:
        from llamalocal.gguf_header import GGMLQuantizationType  # imported when used: `--help` stays instant

        return GGMLQuantizationType[self.name.upper()]

    @property
    def bytes_per_element(self) -> float:
        from llamalocal.gguf_header import GGML_QUANT_SIZES

        block, nbytes = GGML_QUANT_SIZES[self.ggml_type]
        return nbytes / block

    @property
    def needs_flash_attn(self) -> bool:
        # llama.cpp stores a quantized V cache only with flash attention
        return self.name not in ("f16", "f32")


CACHE_TYPES: dict[str, CacheType] = {c.name: c for c in (
    CacheType("f16"),
    CacheType("q8_0"),  # half of f16, a small cost in quality
    CacheType("q4_0"),
    CacheType("f32"),
)}


def cache_type(name: str) -> CacheType:
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise BadInputError(f"unknown KV cache type {name!r}; choose one of: {', '.join(CACHE_TYPES)}") from None


def ubatch(n_batch: int) -> int:
    """The physical batch for a logical batch of `n_batch` tokens."""
    return min(n_batch, N_UBATCH_MAX)
