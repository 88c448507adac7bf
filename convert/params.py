"""params.json -> ModelParams, and the hyper-parameters derived from it.

Field names are Meta's own (`dim`, `n_layers`, `n_heads`, `n_kv_heads`, `multiple_of`,
`ffn_dim_multiplier`, `norm_eps`, `rope_theta`, `use_scaled_rope`, `vocab_size`), as in Meta's
`ModelArgs`. Which family a checkpoint belongs to (and what that implies) is convert.families.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llamalocal.convert.errors import BadInputError


@dataclass(frozen=True)
class ModelParams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # Llama-2 34B/70B: grouped-query attention; None = n_heads
    vocab_size: int = -1  # -1 in LLaMA-1/Llama-2 downloads: take it from the tokenizer/tensors; Llama-3: 128256
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # Llama-2 70B (1.3), Code Llama 34B (1.0)
    norm_eps: float = 1e-5  # LLaMA-1 used 1e-6, Llama-2 1e-5
    rope_theta: float | None = None  # Code Llama: 1e6, Llama-3: 5e5; absent = the family's default
    use_scaled_rope: bool = False  # Llama-3.1 and later: Meta's apply_scaling of the rope frequencies
    # params.json keys not modelled above (Llama-4's moe_args, vision_chunk_size, quantization_args...),
    # kept so that convert.families can refuse what it does not convert
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """FFN width, by Meta's formula in `FeedForward.__init__`."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def load_params(model_dir: Path) -> ModelParams:
    """Read MODEL_DIR/params.json. Raises BadInputError for a missing or malformed file."""
    path = Path(model_dir) / "params.json"
    if not path.is_file():
        raise BadInputError(f"{path} not found: a Meta model directory has params.json beside consolidated.*.pth")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON ({e}); re-download it from Meta") from e
    if not isinstance(raw, dict):
        raise BadInputError(f"{path} should hold a JSON object")
    known = {f.name for f in fields(ModelParams)} - {"extra"}
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw]
    if missing:
        raise BadInputError(f"{path} lacks {', '.join(missing)}; is this a Meta LLaMA params.json?")
    try:
        p = ModelParams(**{k: v for k, v in raw.items() if k in known},
                        extra={k: v for k, v in raw.items() if k not in known})
        ints = [p.dim, p.n_layers, p.n_heads, p.kv_heads, p.multiple_of]
        if any(not isinstance(v, int) or v <= 0 for v in ints) or p.dim % p.n_heads or p.n_heads % p.kv_heads:
            raise ValueError("dimensions must be positive integers with dim % n_heads == 0 and n_heads % n_kv_heads == 0")
    except (TypeError, ValueError) as e:
        raise BadInputError(f"{path}: {e}") from e
    return p
