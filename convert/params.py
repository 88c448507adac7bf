"""params.json -> ModelParams, and the hyper-parameters derived from it.

Field names are Meta's own (`dim`, `n_layers`, `n_heads`, `n_kv_heads`, `multiple_of`,
`ffn_dim_multiplier`, `norm_eps`, `rope_theta`, `use_scaled_rope`, `vocab_size`), as in Meta's
`ModelArgs`. Which family a checkpoint belongs to (and what that implies) is convert.families.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llamalocal.convert.errors import BadInputError
from llamalocal.convert.inputs import read_input


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


# ---------------------------------------------------------------------------------------------
# The schema: every key llamalocal reads, with its type and the range a real model can have
# (Llama-3.1-405B: dim 16384, 126 layers, 128 heads, 8 KV heads, FFN 53248, multiple_of 4096,
# vocab 128256, rope_theta 500000), with wide margins but no value that makes a table, a product or
# a loop explode. Checked before anything is derived from params.json. Keys not listed are
# tolerated: Meta adds keys over time.
# ---------------------------------------------------------------------------------------------

MAX_PARAMS_BYTES = 1 << 20  # Meta's params.json is under 300 bytes


@dataclass(frozen=True)
class Field:
    """One params.json key: `kind` int, float (an int is accepted too) or bool; `low`..`high`
    inclusive for numbers (`above_low`: strictly above `low`); `null` whether JSON null means unset."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    null: bool = False
    above_low: bool = False


SCHEMA: dict[str, Field] = {
    "dim": Field(int, 1, 2**18),
    "n_layers": Field(int, 1, 2048),
    "n_heads": Field(int, 1, 2**12),
    "n_kv_heads": Field(int, 1, 2**12, null=True),
    "vocab_size": Field(int, -1, 2**24),  # -1: taken from the tokenizer and the embedding
    "multiple_of": Field(int, 1, 2**16),
    "ffn_dim_multiplier": Field(float, 0, 64, null=True, above_low=True),
    "norm_eps": Field(float, 0, 1, above_low=True),
    "rope_theta": Field(float, 0, 1e12, null=True, above_low=True),
    "use_scaled_rope": Field(bool, null=True),  # Llama-3.1
}
MAX_HIDDEN_DIM = 2**20  # the FFN width Meta's formula gives (405B: 53248)


def _show(v: Any) -> str:
    """A JSON value for a message, short whatever it holds."""
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else repr(v[:40])[:-1] + "...'"
    if isinstance(v, (list, dict)):
        return f"a JSON {'array' if isinstance(v, list) else 'object'}"
    if type(v) is int and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    return "null" if v is None else json.dumps(v)  # bool as true/false, floats as JSON writes them


def check_field(key: str, value: Any, field: Field) -> str | None:
    """Why `value` is not a valid `key`, or None if it is."""
    if value is None:
        return None if field.null else f"{key} is null; expected {_expected(field)}"
    if field.kind is bool:
        return None if type(value) is bool else f"{key} is {_show(value)}; expected true or false"
    ok_types = (int,) if field.kind is int else (int, float)
    if type(value) not in ok_types:  # bool is an int subclass, and is refused here
        return f"{key} is {_show(value)}; expected {_expected(field)}"
    if type(value) is float and not math.isfinite(value):  # ints are finite (and may not fit a float)
        return f"{key} is {_show(value)}; expected a finite number"
    too_low = value <= field.low if field.above_low else value < field.low
    if too_low or value > field.high:
        return f"{key} is {_show(value)}; expected {_expected(field)}"
    return None


def _expected(field: Field) -> str:
    if field.kind is bool:
        return "true or false"
    what = "an integer" if field.kind is int else "a number"
    if field.above_low:
        return f"{what} above {field.low:g} and at most {field.high:g}"
    return f"{what} from {field.low:g} to {field.high:g}"


def validate(raw: dict, path: Path) -> None:
    """Refuse a params.json whose known keys have the wrong type or range, or whose numbers do not
    fit together (dim % n_heads, n_heads % n_kv_heads, the FFN width)."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw]
    if missing:
        raise BadInputError(f"{path} lacks {', '.join(missing)}; is this a Meta LLaMA params.json?")
    for key, rule in SCHEMA.items():
        if key in raw:
            why = check_field(key, raw[key], rule)
            if why is not None:
                raise BadInputError(f"{path}: {why}; re-download params.json from Meta")
    dim, n_heads = raw["dim"], raw["n_heads"]
    kv_heads = raw.get("n_kv_heads") or n_heads
    if dim % n_heads or n_heads % kv_heads:
        raise BadInputError(f"{path}: dim {dim}, n_heads {n_heads}, n_kv_heads {kv_heads} do not fit together "
                            "(dim % n_heads and n_heads % n_kv_heads must be 0)")


def load_params(model_dir: Path) -> ModelParams:
    """Read MODEL_DIR/params.json. Raises BadInputError for a missing or malformed file: the JSON
    itself, then every known key against SCHEMA, before anything is derived from it."""
    path = Path(model_dir) / "params.json"
    if not path.exists():
        raise BadInputError(f"{path} not found: a Meta model directory has params.json beside consolidated.*.pth")
    data = read_input(path, MAX_PARAMS_BYTES)
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not UTF-8 text; re-download it from Meta") from None
    except RecursionError:
        raise BadInputError(f"{path} nests JSON too deeply to be a params.json; re-download it from Meta") from None
    except ValueError as e:  # JSONDecodeError, and ints of more than 4300 digits
        raise BadInputError(f"{path} is not valid JSON ({str(e)[:120]}); re-download it from Meta") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"{path} should hold a JSON object")
    validate(raw, path)
    known = {f.name for f in fields(ModelParams)} - {"extra"}
    # null means unset: the field's default
    values: dict[str, Any] = {k: float(v) if k in SCHEMA and SCHEMA[k].kind is float else v
                              for k, v in raw.items() if k in known and v is not None}
    p = ModelParams(**values, extra={k: v for k, v in raw.items() if k not in known})
    if not 1 <= p.hidden_dim <= MAX_HIDDEN_DIM:
        raise BadInputError(f"{path}: dim {p.dim}, multiple_of {p.multiple_of} and ffn_dim_multiplier "
                            f"{_show(p.ffn_dim_multiplier)} give an FFN width of {p.hidden_dim}; expected 1 to "
                            f"{MAX_HIDDEN_DIM}")
    return p
