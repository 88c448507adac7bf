"""The quantization presets, and llama.cpp's choice of type for each tensor under them.

This is the one place presets are defined. `tensor_type` makes, for arch `llama`, the same
per-tensor choices as `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp` (the version
vendored by llama-cpp-python 0.3.36), so a one-pass conversion gives the file `llama-quantize`
would write, with or without an importance matrix. tests/test_presets.py checks every choice of
every preset against llama.cpp itself.

How llama.cpp decides, in order:
  1. Tensors it never quantizes (1-D, `*_norm.weight`, anything not ending in `weight`) keep their
     source type, which for this converter is F32.
  2. F32 / F16 presets: every other tensor (token_embd and output included) gets that type.
  3. Quantized presets: start from the preset's default type, then
     - output.weight -> Q6_K (Q8_0 if the preset is Q8_0 or its row is not a whole block; Q5_K
       for the 1-2 bit IQ presets and IQ3_XXS); in a model without output.weight (tied embeddings:
       Llama-3.2 1B/3B) token_embd.weight is the output matrix too and gets the output's choice;
     - token_embd -> Q2_K / IQ3_S for the 1-2 bit IQ presets and IQ3_XXS;
     - per-preset changes of attn_v, attn_k, attn_q, attn_output, ffn_down, ffn_gate, ffn_up
       (`_role_type`), some by layer (`use_more_bits`, first eighth / sixteenth), some by the
       grouped-query factor, three by whether an importance matrix is given;
     - the "70B" rule: 80 layers with grouped-query attention -> attn_v Q3_K/Q4_K become Q5_K;
     - a row that is not a whole number of blocks falls back to a smaller block (`_FALLBACK`),
       and to F16 if even 32 does not divide it.
  4. Some types cannot be made without an importance matrix (`requires_imatrix`): llama.cpp
     refuses the whole file then (the presets with `needs_imatrix`).

Layer counters: llama.cpp counts attn_v / ffn_down tensors in file order (sorted by layer
number), so for a plain llama model its counter equals the layer index used here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llamalocal.convert.errors import BadInputError
from llamalocal.convert.quantize import block_size

Q = GGMLQuantizationType
F = LlamaFileType


@dataclass(frozen=True)
class Preset:
    """One `llamalocal convert --NAME` choice."""

    name: str                # CLI spelling: "q4_k_m"
    ftype: LlamaFileType     # what goes in general.file_type (llama.cpp's llama_ftype)
    default_type: Q          # the type most 2-D weights get
    description: str
    bits_per_weight: float   # nominal: of default_type; the mixes are a little larger
    needs_imatrix: bool = False  # llama.cpp refuses it without an importance matrix

    @property
    def quantized(self) -> bool:
        return self.default_type not in (Q.F32, Q.F16, Q.BF16)


def _bpw(t: Q) -> float:
    block, nbytes = GGML_QUANT_SIZES[t]
    return nbytes * 8 / block


def _preset(name: str, ftype: LlamaFileType, default_type: Q, description: str, *,
            needs_imatrix: bool = False) -> Preset:
    return Preset(name, ftype, default_type, description, _bpw(default_type), needs_imatrix)


# Ordered from largest to smallest. The quality notes are llama.cpp's published figures
# (LLaMA-1 7B, wikitext-2, ctx 512; see shared/NOTES.md), not measured here. The IQ types and
# q2_k_s are made for an importance matrix (`llamalocal imatrix`): llama.cpp refuses those marked
# needs_imatrix without one, and the others gain most from one.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    _preset("f32", F.ALL_F32, Q.F32, "full 32-bit floats; no loss, largest"),
    _preset("f16", F.MOSTLY_F16, Q.F16, "16-bit floats; practically lossless"),
    _preset("q8_0", F.MOSTLY_Q8_0, Q.Q8_0, "8-bit; practically lossless, half of f16"),
    _preset("q6_k", F.MOSTLY_Q6_K, Q.Q6_K, "6-bit k-quant; practically lossless"),
    _preset("q5_k_m", F.MOSTLY_Q5_K_M, Q.Q5_K, "5-bit k-quant, attn_v/ffn_down partly Q6_K; very small loss"),
    _preset("q5_k_s", F.MOSTLY_Q5_K_S, Q.Q5_K, "5-bit k-quant throughout; very small loss"),
    _preset("q5_1", F.MOSTLY_Q5_1, Q.Q5_1, "5-bit with offset; small loss"),
    _preset("q5_0", F.MOSTLY_Q5_0, Q.Q5_0, "5-bit; small loss"),
    _preset("q4_k_m", F.MOSTLY_Q4_K_M, Q.Q4_K, "4-bit k-quant, attn_v/ffn_down partly Q6_K; the usual choice"),
    _preset("q4_k_s", F.MOSTLY_Q4_K_S, Q.Q4_K, "4-bit k-quant, a few attn_v/ffn_down at Q5_K"),
    _preset("q4_1", F.MOSTLY_Q4_1, Q.Q4_1, "4-bit with offset"),
    _preset("iq4_nl", F.MOSTLY_IQ4_NL, Q.IQ4_NL, "4-bit non-linear, 32-blocks; best with an imatrix"),
    _preset("q4_0", F.MOSTLY_Q4_0, Q.Q4_0, "4-bit; fast, noticeable loss"),
    _preset("iq4_xs", F.MOSTLY_IQ4_XS, Q.IQ4_XS, "4.25-bit non-linear; best with an imatrix"),
    _preset("q3_k_l", F.MOSTLY_Q3_K_L, Q.Q3_K, "3-bit k-quant, attn_v/ffn_down/attn_output at Q5_K"),
    _preset("q3_k_m", F.MOSTLY_Q3_K_M, Q.Q3_K, "3-bit k-quant, attn_v/ffn_down/attn_output at 4-5 bits; clear loss"),
    _preset("q3_k_s", F.MOSTLY_Q3_K_S, Q.Q3_K, "3-bit k-quant throughout; large loss"),
    _preset("iq3_m", F.MOSTLY_IQ3_M, Q.IQ3_S, "3.4-bit IQ mix, attn_v/attn_output Q4_K; best with an imatrix"),
    _preset("iq3_s", F.MOSTLY_IQ3_S, Q.IQ3_S, "3.4-bit IQ; best with an imatrix"),
    _preset("iq3_xs", F.MOSTLY_IQ3_XS, Q.IQ3_S, "3.3-bit IQ mix; needs an imatrix", needs_imatrix=True),
    _preset("iq3_xxs", F.MOSTLY_IQ3_XXS, Q.IQ3_XXS, "3.06-bit IQ; needs an imatrix", needs_imatrix=True),
    _preset("q2_k", F.MOSTLY_Q2_K, Q.Q2_K, "2-bit k-quant; large loss, much less with an imatrix"),
    _preset("q2_k_s", F.MOSTLY_Q2_K_S, Q.Q2_K, "2-bit k-quant, smaller mix; needs an imatrix", needs_imatrix=True),
    _preset("iq2_m", F.MOSTLY_IQ2_M, Q.IQ2_S, "2.7-bit IQ mix; needs an imatrix", needs_imatrix=True),
    _preset("iq2_s", F.MOSTLY_IQ2_S, Q.IQ2_XS, "2.5-bit IQ mix; needs an imatrix", needs_imatrix=True),
    _preset("iq2_xs", F.MOSTLY_IQ2_XS, Q.IQ2_XS, "2.31-bit IQ; needs an imatrix", needs_imatrix=True),
    _preset("iq2_xxs", F.MOSTLY_IQ2_XXS, Q.IQ2_XXS, "2.06-bit IQ; needs an imatrix", needs_imatrix=True),
    _preset("iq1_m", F.MOSTLY_IQ1_M, Q.IQ1_M, "1.75-bit IQ; needs an imatrix, a last resort", needs_imatrix=True),
    _preset("iq1_s", F.MOSTLY_IQ1_S, Q.IQ1_S, "1.56-bit IQ; needs an imatrix, a last resort", needs_imatrix=True),
)}

# llama-quantize's own short names for the *_M presets.
_ALIASES = {"q5_k": "q5_k_m", "q4_k": "q4_k_m", "q3_k": "q3_k_m", "fp32": "f32", "fp16": "f16"}


def parse_preset(name: str | Preset) -> Preset:
    """'q4_K_M', 'Q4_0', '--q8_0', 'q4-k-m', '4_0', 'q4_k' (llama-quantize's alias), 'IQ2_XS' -> Preset.

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
    """What llama.cpp's rules look at."""

    i: int          # layer index (== llama.cpp's per-role counter for arch llama)
    n: int          # number of layers
    n_gqa: int      # n_head // n_head_kv
    has_imatrix: bool


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's pattern: the first and last eighth of the layers, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# The 1-2 bit IQ presets, which llama.cpp treats as one family (its first branch).
_LOW_IQ = frozenset({"iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"})
# output.weight at Q5_K instead of Q6_K
_OUTPUT_Q5_K = _LOW_IQ | {"iq3_xxs"}


def _output_type(p: Preset, ncols: int) -> Q:
    """output.weight (and a token_embd that doubles as it)."""
    if not _fits(p.default_type, ncols):
        return Q.Q8_0
    if p.name in _OUTPUT_Q5_K:
        return Q.Q5_K
    return Q.Q6_K if p.default_type != Q.Q8_0 else Q.Q8_0


def _token_embd_type(p: Preset) -> Q:
    if p.name in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
        return Q.Q2_K
    if p.name in ("iq2_s", "iq2_m", "iq3_xxs"):
        return Q.IQ3_S
    return p.default_type


def _low_iq_role_type(p: Preset, role: str, L: _Layer, t: Q) -> Q:
    """llama.cpp's branch for the 1-2 bit IQ presets (no experts)."""
    s_or_m = p.name in ("iq2_s", "iq2_m")
    if role == "attn_v":
        return Q.Q4_K if L.n_gqa >= 4 else (Q.IQ3_S if s_or_m else Q.Q2_K)
    if role == "ffn_down":
        return (Q.IQ3_S if s_or_m else Q.Q2_K) if L.i < L.n // 8 else t
    if role == "attn_output":
        if p.name in ("iq1_s", "iq1_m"):
            return Q.IQ2_XXS
        if s_or_m:
            return Q.IQ3_S
    return t


def _attn_v_type(p: Preset, L: _Layer, t: Q) -> Q:
    # one branch per branch of llama.cpp's, in its order (so some bodies repeat)
    n = p.name
    if n == "q2_k":
        t = Q.Q4_K if L.n_gqa >= 4 else Q.Q3_K
    elif n == "q2_k_s" and L.n_gqa >= 4:
        t = Q.Q4_K
    elif n == "iq3_xxs":
        t = Q.Q4_K if L.n_gqa >= 4 else (Q.IQ3_XXS if L.has_imatrix else Q.IQ3_S)
    elif n in ("iq3_xs", "iq3_s") and L.n_gqa >= 4:  # noqa: SIM114
        t = Q.Q4_K
    elif n == "iq3_m":
        t = Q.Q4_K
    elif n == "q3_k_m":
        t = Q.Q5_K if L.i < 2 else Q.Q4_K
    elif n == "q3_k_l":  # noqa: SIM114
        t = Q.Q5_K
    elif n in ("iq4_nl", "iq4_xs") and L.n_gqa >= 4:
        t = Q.Q5_K
    elif n in ("q4_k_m", "q5_k_m") and use_more_bits(L.i, L.n):
        t = Q.Q6_K
    elif n == "q4_k_s" and L.i < 4:
        t = Q.Q5_K
    return t


def _ffn_down_type(p: Preset, L: _Layer, t: Q) -> Q:
    n, first_eighth = p.name, L.i < L.n // 8
    if n == "q2_k":
        return Q.Q3_K
    if n == "q2_k_s":
        return Q.Q4_K if first_eighth else t
    if n == "iq3_xxs" and not L.has_imatrix:
        return Q.Q4_K if first_eighth else Q.Q3_K
    if n == "q3_k_m":
        return Q.Q5_K if L.i < L.n // 16 else Q.Q4_K
    if n == "iq3_m" and first_eighth:
        return Q.Q4_K
    if n == "q3_k_l":
        return Q.Q5_K
    if n == "q4_k_m":
        return Q.Q6_K if use_more_bits(L.i, L.n) else t
    if n in ("iq4_nl", "iq4_xs") and first_eighth and not L.has_imatrix:
        return Q.Q5_K
    if n == "q5_k_m" and use_more_bits(L.i, L.n):
        return Q.Q6_K
    if n == "q4_k_s" and first_eighth:
        return Q.Q5_K
    if n in ("q4_0", "q5_0") and L.has_imatrix and first_eighth:
        # llama.cpp guards the first ffn_down layers only when calibrated, so that a plain
        # quantization stays what it always was
        return Q.Q4_1 if n == "q4_0" else Q.Q5_1
    return t


_ATTN_OUTPUT = {"q2_k": Q.Q3_K, "iq3_xxs": Q.IQ3_S, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K, "iq3_m": Q.Q4_K}
_ATTN_QK = {"iq3_xs": Q.IQ3_XXS, "iq3_xxs": Q.IQ2_S}  # attn_q and attn_k


def _role_type(p: Preset, role: str, L: _Layer, t: Q) -> Q:
    """The type a `blk.N.<role>.weight` tensor gets instead of the default `t`."""
    if p.name in _LOW_IQ:
        return _low_iq_role_type(p, role, L, t)
    if role == "attn_v":
        return _attn_v_type(p, L, t)
    if role in ("attn_q", "attn_k"):
        return _ATTN_QK.get(p.name, t)
    if role == "ffn_down":
        return _ffn_down_type(p, L, t)
    if role == "attn_output":
        return _ATTN_OUTPUT.get(p.name, t)
    if role in ("ffn_gate", "ffn_up") and p.name == "iq3_xs" and L.n // 8 <= L.i < 7 * L.n // 8:
        return Q.IQ3_XXS
    return t


# A row that is not a whole number of blocks: the type to try instead. 32-block types (Q4_0 ...
# Q8_0, IQ4_NL) have nothing smaller, so they go straight to the F16 check.
_FALLBACK: dict[Q, Q] = {
    Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL,
    Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL,
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
}

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
    has_imatrix: bool = False,
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
        has_imatrix: an importance matrix is given (llama.cpp then chooses differently for
            iq3_xxs, iq4_nl, iq4_xs, q4_0 and q5_0).
        tied_embeddings: the model has no output.weight, token_embd serves as both (llama.cpp
            then types token_embd as it would type output.weight).

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
        return _fallback(_output_type(p, ncols), ncols)
    if name == "token_embd.weight":
        return _fallback(_token_embd_type(p), ncols)

    t = p.default_type
    m = _BLOCK_NAME.fullmatch(name)
    if m:
        role = m.group(2)
        layer = int(m.group(1)) if i_layer is None else i_layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"{name}: layer {layer} outside 0..{n_layers - 1}")
        L = _Layer(layer, n_layers, n_head // n_head_kv, has_imatrix)
        t = _role_type(p, role, L, t)
        if (role == "attn_v" and p.name not in _LOW_IQ and _is_70b(n_layers, n_head, n_head_kv)
                and t in (Q.Q3_K, Q.Q4_K)):
            # 70B's attn_v is 8x smaller than attn_q (8 heads share it): more bits cost little.
            t = Q.Q5_K
    return _fallback(t, ncols)


def requires_imatrix(preset: str | Preset, name: str, qtype: Q) -> bool:
    """llama.cpp's `tensor_requires_imatrix`: whether `name` stored as `qtype` under `preset`
    cannot be made without importance data (token_embd and output never need it)."""
    if name in ("token_embd.weight", "output.weight"):
        return False
    if qtype in (Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S):
        return True
    return qtype == Q.Q2_K and parse_preset(preset).name == "q2_k_s"
