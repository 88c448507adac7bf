"""The quantization presets, and llama.cpp's choice of type for each tensor under them.

This is the one place presets are defined. `tensor_type` makes, for arch `llama`, the same
per-tensor choices as `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp` (the version
vendored by llama-cpp-python 0.3.36), so a one-pass conversion gives the file `llama-quantize`
would write. tests/test_presets.py checks every choice against llama.cpp itself.

How llama.cpp decides, in order:
  1. Tensors it never quantizes (1-D, `*_norm.weight`, anything not ending in `weight`) keep their
     source type, which for this converter is F32.
  2. F32 / F16 presets: every other tensor (token_embd and output included) gets that type.
  3. Quantized presets: start from the preset's default type, then
     - output.weight -> Q6_K (Q8_0 if the preset is Q8_0 or its row is not a whole block); in a
       model without output.weight (tied embeddings: Llama-3.2 1B/3B) token_embd.weight is the
       output matrix too and gets the same choice;
     - per-preset bumps of attn_v, ffn_down and attn_output (`_BUMPS`), some every few layers
       (`use_more_bits`), Q2_K's attn_v by the grouped-query factor;
     - the "70B" rule: 80 layers with grouped-query attention -> attn_v Q3_K/Q4_K become Q5_K;
     - a row that is not a whole number of blocks falls back to a smaller block (`_FALLBACK`),
       and to F16 if even 32 does not divide it.

Layer counters: llama.cpp counts attn_v / ffn_down tensors in file order (sorted by layer
number), so for a plain llama model its counter equals the layer index used here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llamalocal.convert.errors import BadInputError
from llamalocal.convert.quantize import block_size

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Preset:
    """One `llamalocal convert --NAME` choice."""

    name: str                # CLI spelling: "q4_k_m"
    ftype: LlamaFileType     # what goes in general.file_type (llama.cpp's llama_ftype)
    default_type: Q          # the type most 2-D weights get
    description: str
    bits_per_weight: float   # nominal: of default_type; the mix is a little larger for *_K_M

    @property
    def quantized(self) -> bool:
        return self.default_type not in (Q.F32, Q.F16, Q.BF16)


def _bpw(t: Q) -> float:
    block, nbytes = GGML_QUANT_SIZES[t]
    return nbytes * 8 / block


def _preset(name: str, ftype: LlamaFileType, default_type: Q, description: str) -> Preset:
    return Preset(name, ftype, default_type, description, _bpw(default_type))


# Ordered from largest to smallest. The quality notes are llama.cpp's published figures
# (LLaMA-1 7B, wikitext-2, ctx 512; see shared/NOTES.md), not measured here.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    _preset("f32", LlamaFileType.ALL_F32, Q.F32, "full 32-bit floats; no loss, largest"),
    _preset("f16", LlamaFileType.MOSTLY_F16, Q.F16, "16-bit floats; practically lossless"),
    _preset("q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, "8-bit; practically lossless, half of f16"),
    _preset("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K,
            "5-bit k-quant, attn_v/ffn_down partly Q6_K; very small loss"),
    _preset("q5_1", LlamaFileType.MOSTLY_Q5_1, Q.Q5_1, "5-bit with offset; small loss"),
    _preset("q5_0", LlamaFileType.MOSTLY_Q5_0, Q.Q5_0, "5-bit; small loss"),
    _preset("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K,
            "4-bit k-quant, attn_v/ffn_down partly Q6_K; the usual choice"),
    _preset("q4_1", LlamaFileType.MOSTLY_Q4_1, Q.Q4_1, "4-bit with offset"),
    _preset("q4_0", LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, "4-bit; fast, noticeable loss"),
    _preset("q3_k_m", LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K,
            "3-bit k-quant, attn_v/ffn_down/attn_output at 4-5 bits; clear loss"),
    _preset("q2_k", LlamaFileType.MOSTLY_Q2_K, Q.Q2_K, "2-bit k-quant; large loss, smallest"),
)}

# llama-quantize's own short names for the *_M presets.
_ALIASES = {"q5_k": "q5_k_m", "q4_k": "q4_k_m", "q3_k": "q3_k_m", "fp32": "f32", "fp16": "f16"}


def parse_preset(name: str | Preset) -> Preset:
    """'q4_K_M', 'Q4_0', '--q8_0', 'q4-k-m', '4_0', 'q4_k' (llama-quantize's alias) -> Preset.

    Raises:
        BadInputError: not a preset; the message lists the valid names.
    """
    if isinstance(name, Preset):
        return name
    key = name.strip().lstrip("-").lower().replace("-", "_")
    if key[:1].isdigit():
        key = "q" + key
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise BadInputError(f"unknown quantization preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]


# ---------------------------------------------------------------------------------------------
# per-tensor choice
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    """What llama.cpp's bump rules look at."""

    i: int          # layer index (== llama.cpp's per-role counter for arch llama)
    n: int          # number of layers
    n_gqa: int      # n_head // n_head_kv


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's pattern: the first and last eighth of the layers, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


Bump = Callable[[_Layer], Q | None]

# (preset, role) -> the type that role gets instead of the preset's default (None: no change).
# Roles are the GGUF names: attn_v (Meta wv), ffn_down (w2), attn_output (wo).
_BUMPS: dict[str, dict[str, Bump]] = {
    "q2_k": {
        "attn_v": lambda L: Q.Q4_K if L.n_gqa >= 4 else Q.Q3_K,
        "ffn_down": lambda L: Q.Q3_K,
        "attn_output": lambda L: Q.Q3_K,
    },
    "q3_k_m": {
        "attn_v": lambda L: Q.Q5_K if L.i < 2 else Q.Q4_K,
        "ffn_down": lambda L: Q.Q5_K if L.i < L.n // 16 else Q.Q4_K,
        "attn_output": lambda L: Q.Q4_K,
    },
    "q4_k_m": {
        "attn_v": lambda L: Q.Q6_K if use_more_bits(L.i, L.n) else None,
        "ffn_down": lambda L: Q.Q6_K if use_more_bits(L.i, L.n) else None,
    },
    "q5_k_m": {
        "attn_v": lambda L: Q.Q6_K if use_more_bits(L.i, L.n) else None,
        "ffn_down": lambda L: Q.Q6_K if use_more_bits(L.i, L.n) else None,
    },
}

# A row that is not a whole number of blocks: the type to try instead. 32-block types (Q4_0 ...
# Q8_0) have nothing smaller, so they go straight to the F16 check.
_FALLBACK: dict[Q, Q] = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _fits(t: Q, ncols: int) -> bool:
    return ncols % block_size(t) == 0


def _fallback(t: Q, ncols: int) -> Q:
    if _fits(t, ncols):
        return t
    if t not in _FALLBACK and block_size(t) > 32:
        raise ValueError(f"no fallback type for {t.name} with rows of {ncols}")
    smaller = _FALLBACK.get(t, t)
    return smaller if _fits(smaller, ncols) else Q.F16


def _is_70b(n_layers: int, n_head: int, n_head_kv: int) -> bool:
    # llama.cpp's model type for arch llama: 80 layers with GQA is "70B" (without GQA "65B").
    return n_layers == 80 and n_head != n_head_kv


def tensor_type(
    preset: str | Preset,
    name: str,
    shape: tuple[int, ...],
    *,
    n_layers: int,
    n_head: int,
    n_head_kv: int,
    i_layer: int | None = None,
    tied_embeddings: bool = False,
) -> Q:
    """The ggml type llama.cpp's quantizer gives tensor `name` under `preset`.

    Args:
        preset: a Preset or its name (see `parse_preset`).
        name: GGUF tensor name (`token_embd.weight`, `blk.3.attn_v.weight`, ...).
        shape: numpy shape, (rows, cols); cols is ggml's ne[0], the quantized row length.
        n_layers, n_head, n_head_kv: the model's hyper-parameters (params.json's n_layers,
            n_heads, n_kv_heads or n_heads).
        i_layer: the layer of a `blk.N.*` tensor; read from the name when not given.
        tied_embeddings: the model has no output.weight (llama.cpp uses token_embd as the output).

    Returns:
        The GGMLQuantizationType to write the tensor as.

    Raises:
        BadInputError: unknown preset.
        ValueError: inconsistent layer information.
    """
    p = parse_preset(preset)
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return Q.F32
    if not p.quantized:
        return p.default_type
    ncols = shape[-1]

    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        if p.default_type == Q.Q8_0 or not _fits(p.default_type, ncols):
            return _fallback(Q.Q8_0, ncols)
        return _fallback(Q.Q6_K, ncols)

    t = p.default_type
    m = _BLOCK_NAME.fullmatch(name)
    if m:
        role = m.group(2)
        layer = int(m.group(1)) if i_layer is None else i_layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"{name}: layer {layer} outside 0..{n_layers - 1}")
        bump = _BUMPS.get(p.name, {}).get(role)
        if bump is not None:
            t = bump(_Layer(layer, n_layers, n_head // n_head_kv)) or t
        if role == "attn_v" and _is_70b(n_layers, n_head, n_head_kv) and t in (Q.Q3_K, Q.Q4_K):
            # 70B's attn_v is 8x smaller than attn_q (8 heads share it): more bits cost little.
            t = Q.Q5_K
    return _fallback(t, ncols)
