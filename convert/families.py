"""Every model family Meta ships in its own download layout, described in one place.

A `Family` says what the converter and the runner need to know about one generation of
checkpoints: Meta's tensor names, their GGUF names and the dimension Meta's model parallelism
split each one on; the context length it was trained with; its rotary embedding (theta, Meta's
scaled rope and its factor); the tokenizer kind; the chat format; whether its output matrix may be
tied to the embeddings. Shapes follow from params.json by Meta's formulas (`expected_shapes`).
`detect()` picks the family from params.json, the tokenizer's kind and the folder name;
`check_supported()` refuses the Meta downloads that are not plain LLaMA text models. The sizes
Meta published (`PUBLISHED`) feed the header-only reference models of `llamalocal requirements`.

Adding a family is one entry in FAMILIES (and, if params.json alone cannot tell it apart, a line
in `detect`).

Split dims are Meta's model.py (fairscale): ColumnParallelLinear splits its output features
(dim 0: wq wk wv w1 w3 output), RowParallelLinear its input features (dim 1: wo w2). The embedding
differs by generation: LLaMA-1/Llama-2 use ParallelEmbedding, split on the embedding dim (1);
Llama-3 uses VocabParallelEmbedding, split on the vocabulary (0). Norms are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llamalocal.convert.errors import BadInputError, CheckpointError
from llamalocal.convert.params import ModelParams

T = gguf.MODEL_TENSOR

# How shards combine: concatenate on dim 0 or 1, or the same copy in every shard.
COLUMN, ROW, REPLICATED = 0, 1, None

# The kinds `tokenizer.load_vocab(path).kind` reports.
SPM, TIKTOKEN = "spm", "tiktoken"


@dataclass(frozen=True)
class TensorRule:
    gguf: gguf.MODEL_TENSOR
    split_dim: int | None


# Inside each transformer block (layers.N.*): the same in every family.
LAYER_TENSORS: dict[str, TensorRule] = {
    "attention.wq.weight": TensorRule(T.ATTN_Q, COLUMN),
    "attention.wk.weight": TensorRule(T.ATTN_K, COLUMN),
    "attention.wv.weight": TensorRule(T.ATTN_V, COLUMN),
    "attention.wo.weight": TensorRule(T.ATTN_OUT, ROW),
    "attention_norm.weight": TensorRule(T.ATTN_NORM, REPLICATED),
    "feed_forward.w1.weight": TensorRule(T.FFN_GATE, COLUMN),
    "feed_forward.w2.weight": TensorRule(T.FFN_DOWN, ROW),
    "feed_forward.w3.weight": TensorRule(T.FFN_UP, COLUMN),
    "ffn_norm.weight": TensorRule(T.FFN_NORM, REPLICATED),
}

# Present in LLaMA-1 checkpoints; llama.cpp computes RoPE frequencies itself.
SKIPPED = {"rope.freqs"}

# llama.cpp's per-frequency rope divisors (Llama-3.1's scaled rope), written by the converter.
ROPE_FREQS = gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"

_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Family:
    """One generation of Meta checkpoints."""

    key: str                # "llama-3.1"
    label: str              # "Llama-3.1": what summaries and `requirements` print
    tokenizer: str          # SPM or TIKTOKEN: the kind of its tokenizer.model
    n_ctx: int              # context it was trained for (a checkpoint does not record it)
    embedding_split: int    # tok_embeddings: ROW (ParallelEmbedding) or COLUMN (VocabParallelEmbedding)
    chat_format: str        # "plain" (base models), "llama-2" ([INST] <<SYS>>), "llama-3" (headers, eot)
    rope_theta: float = 10000.0            # when params.json gives none (Meta's ModelArgs default)
    rope_scaling_factor: float | None = None  # Meta's apply_scaling factor, used with use_scaled_rope
    tied_output: bool = False              # its published small sizes tie output.weight to tok_embeddings

    @property
    def global_tensors(self) -> dict[str, TensorRule]:
        return {
            "tok_embeddings.weight": TensorRule(T.TOKEN_EMBD, self.embedding_split),
            "norm.weight": TensorRule(T.OUTPUT_NORM, REPLICATED),
            "output.weight": TensorRule(T.OUTPUT, COLUMN),
        }

    def lookup(self, meta_name: str) -> tuple[str, TensorRule] | None:
        """'layers.3.attention.wq.weight' -> ('blk.3.attn_q.weight', rule); None if unknown."""
        rules = self.global_tensors
        if meta_name in rules:
            return gguf.TENSOR_NAMES[rules[meta_name].gguf] + ".weight", rules[meta_name]
        m = _LAYER_RE.fullmatch(meta_name)
        if m and m.group(2) in LAYER_TENSORS:
            rule = LAYER_TENSORS[m.group(2)]
            return gguf.TENSOR_NAMES[rule.gguf].format(bid=int(m.group(1))) + ".weight", rule
        return None

    def split_dim(self, meta_name: str) -> int | None:
        found = self.lookup(meta_name)
        return found[1].split_dim if found else None


FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("llama-1", "LLaMA", SPM, 2048, ROW, "plain"),
    Family("llama-2", "Llama-2", SPM, 4096, ROW, "llama-2"),
    Family("code-llama", "Code Llama", SPM, 16384, ROW, "llama-2", rope_theta=1_000_000.0),
    Family("llama-3", "Llama-3", TIKTOKEN, 8192, COLUMN, "llama-3", rope_theta=500_000.0),
    Family("llama-3.1", "Llama-3.1", TIKTOKEN, 131072, COLUMN, "llama-3", rope_theta=500_000.0,
           rope_scaling_factor=8.0),
    # Meta's reference code hard-codes 8, but 1B/3B were trained with 32 (Meta's published configs)
    Family("llama-3.2", "Llama-3.2", TIKTOKEN, 131072, COLUMN, "llama-3", rope_theta=500_000.0,
           rope_scaling_factor=32.0, tied_output=True),
    Family("llama-3.3", "Llama-3.3", TIKTOKEN, 131072, COLUMN, "llama-3", rope_theta=500_000.0,
           rope_scaling_factor=8.0),
)}


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------

def meta_names(n_layers: int) -> list[str]:
    """Every tensor a Meta checkpoint has, in the order llama.cpp lays out a GGUF."""
    names = ["tok_embeddings.weight"]
    for i in range(n_layers):
        names += [f"layers.{i}.{suffix}" for suffix in LAYER_TENSORS]
    return names + ["norm.weight", "output.weight"]


def expected_shapes(p: ModelParams, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor's merged shape as params.json implies it (Meta's model.py), numpy order."""
    kv_dim = p.kv_heads * p.head_dim
    per_layer = {
        "attention.wq.weight": (p.dim, p.dim),
        "attention.wk.weight": (kv_dim, p.dim),
        "attention.wv.weight": (kv_dim, p.dim),
        "attention.wo.weight": (p.dim, p.dim),
        "attention_norm.weight": (p.dim,),
        "feed_forward.w1.weight": (p.hidden_dim, p.dim),
        "feed_forward.w2.weight": (p.dim, p.hidden_dim),
        "feed_forward.w3.weight": (p.hidden_dim, p.dim),
        "ffn_norm.weight": (p.dim,),
    }
    shapes = {"tok_embeddings.weight": (n_vocab, p.dim), "norm.weight": (p.dim,), "output.weight": (n_vocab, p.dim)}
    for i in range(p.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


# ---------------------------------------------------------------------------------------------
# rotary embedding
# ---------------------------------------------------------------------------------------------

# Meta's `apply_scaling` (llama3/model.py): its constants besides the factor
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192


def rope_freq_factors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Meta's scaled rope: per frequency pair, the divisor
    that turns RoPE's frequency into the one `apply_scaling` gives (float32, head_dim / 2 values).

    Meta: wavelengths below original_context / high_freq_factor keep their frequency, those above
    original_context / low_freq_factor are divided by `factor`, and the band between blends the
    two linearly in original_context / wavelength. In float32 throughout, as Meta's model.py and
    llama.cpp's convert_hf_to_gguf.py compute it (the same bytes as the latter for theta 500000).
    """
    f32 = np.float32
    freqs = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32)[: head_dim // 2] / f32(head_dim)))
    wavelen = f32(2 * np.pi) / freqs
    low_wavelen = f32(ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR)
    high_wavelen = f32(ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR)
    smooth = (f32(ROPE_ORIGINAL_CONTEXT) / wavelen - f32(ROPE_LOW_FREQ_FACTOR)) \
        / f32(ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = f32(1.0) / ((f32(1.0) - smooth) / f32(factor) + smooth)
    out = np.where(wavelen < high_wavelen, f32(1.0), np.where(wavelen > low_wavelen, f32(factor), blended))
    return out.astype(f32)


# ---------------------------------------------------------------------------------------------
# which family, and what is refused
# ---------------------------------------------------------------------------------------------

# "Llama3.1-8B", "Meta-Llama-3.1-8B", "llama-2-7b", "Llama-3.2-1B" -> major, minor
_VERSION_IN_NAME = re.compile(r"llama[-_ ]?(\d)(?:[._](\d))?(?!\d)", re.IGNORECASE)
# (dim, n_layers) of Llama-3.2 1B and 3B, the only Llama-3 text models of these shapes
_LLAMA32_SHAPES = {(2048, 16), (3072, 28)}
LLAMA3_VOCAB = 128256  # 128000 BPE ranks + 256 special tokens


def model_name(model_dir: Path) -> str:
    """The model's own name: the folder, or its parent for Meta's Hugging Face layout
    (`Meta-Llama-3.1-8B/original/`)."""
    d = Path(model_dir).resolve()
    return d.parent.name if d.name == "original" else d.name


def is_instruct(model_dir: Path) -> bool:
    """Meta names its instruction-tuned downloads `...-Instruct` (Llama-3, Code Llama) or
    `...-chat` (Llama-2)."""
    words = re.split(r"[-_. ]", model_name(model_dir).lower())
    return "instruct" in words or "chat" in words


def _version_in_name(name: str) -> tuple[int, int | None] | None:
    m = _VERSION_IN_NAME.search(name)
    if not m:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def _looks_llama3(p: ModelParams) -> bool:
    """What only a Llama-3 params.json has: its 128256 vocabulary, theta 500000, scaled rope."""
    return p.use_scaled_rope or p.vocab_size >= 128_000 or p.rope_theta == 500_000.0


def detect(p: ModelParams, tokenizer_kind: str, model_dir: Path, tokenizer_path: Path | None = None) -> Family:
    """The family of a checkpoint, from params.json, its tokenizer's kind and its folder name.

    Raises:
        BadInputError: params.json and the tokenizer belong to different generations.
    """
    params_path = Path(model_dir) / "params.json"
    tok = tokenizer_path or "tokenizer.model"
    if tokenizer_kind == TIKTOKEN:
        if not _looks_llama3(p):
            raise BadInputError(
                f"{tok} is a tiktoken (Llama-3) tokenizer but {params_path} describes a LLaMA-1/Llama-2 model "
                f"(vocab_size {p.vocab_size}, rope_theta {p.rope_theta}); use the tokenizer.model of the same download")
        if not p.use_scaled_rope:
            return FAMILIES["llama-3"]
        version = _version_in_name(model_name(model_dir))
        minor = version[1] if version and version[0] == 3 else None
        if minor == 2 or (minor is None and (p.dim, p.n_layers) in _LLAMA32_SHAPES):
            return FAMILIES["llama-3.2"]
        return FAMILIES["llama-3.3"] if minor == 3 else FAMILIES["llama-3.1"]
    if tokenizer_kind != SPM:
        raise AssertionError(f"tokenizer kind {tokenizer_kind!r}")
    if _looks_llama3(p):
        raise BadInputError(
            f"{params_path} describes a Llama-3 model (vocab_size {p.vocab_size}, rope_theta {p.rope_theta}) but "
            f"{tok} is a sentencepiece (LLaMA-1/Llama-2) tokenizer; use the tokenizer.model of the same download")
    if p.rope_theta == FAMILIES["code-llama"].rope_theta:
        return FAMILIES["code-llama"]
    if p.norm_eps == 1e-6 and p.n_kv_heads is None:
        return FAMILIES["llama-1"]
    return FAMILIES["llama-2"]


def check_supported(raw: dict[str, Any], model_dir: Path) -> None:
    """Refuse the Meta downloads that are not a plain LLaMA text model, before reading a weight.

    Raises:
        BadInputError: Llama-4 (mixture of experts), a vision model, the 405B FP8 download, or
            Meta's pre-quantized 1B/3B.
    """
    path = Path(model_dir) / "params.json"
    if "moe_args" in raw:
        raise BadInputError(f"{path} describes Llama-4 (mixture of experts: moe_args), which llamalocal does not "
                            "convert; it converts LLaMA-1, Llama-2, Code Llama and Llama-3.x text models")
    if (raw.get("vision_chunk_size", -1) or -1) > 0 or "vision_args" in raw or "vision_model" in raw \
            or (raw.get("vision_num_cross_attention_layers", -1) or -1) > 0:
        raise BadInputError(f"{path} describes a vision model (image encoder and cross-attention layers), which "
                            "llamalocal does not convert; use a Llama-3.x text model (e.g. Llama3.1-8B-Instruct)")
    fp8 = sorted(Path(model_dir).glob("fp8_scales_*.pt"))
    if fp8:
        raise BadInputError(f"{model_dir} holds {fp8[0].name}: the FP8-quantized 405B download, whose float8 "
                            "weights llamalocal does not convert; download the bf16 checkpoint (MP8 or MP16)")
    quantized = [k for k in ("quantization_args", "lora_args") if k in raw]
    if quantized:
        raise BadInputError(f"{path} has {' and '.join(quantized)}: one of Meta's pre-quantized models (QLoRA / "
                            "SpinQuant int4), which llamalocal does not convert; download the bf16 model instead")


def check_tensor_names(names: list[str], path: Path) -> None:
    """Tensors of models `check_supported` did not catch by their params.json."""
    vision = [n for n in names if n.startswith("vision_") or "cross_attention" in n]
    if vision:
        raise CheckpointError(f"{path} holds {vision[0]} (a vision model's image encoder or cross-attention "
                              "layers), which llamalocal does not convert; use a Llama-3.x text model")


# ---------------------------------------------------------------------------------------------
# the sizes Meta published
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    """One model size as Meta released it: its params.json and vocabulary."""

    family: Family
    size: str           # "8B"
    params: ModelParams
    n_vocab: int
    tied: bool = False  # output.weight is tok_embeddings (written once)

    @property
    def label(self) -> str:
        return f"{self.family.label} {self.size}"


def _llama3(dim: int, n_layers: int, n_heads: int, ffn_dim_multiplier: float, multiple_of: int) -> ModelParams:
    return ModelParams(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=LLAMA3_VOCAB,
                       multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=1e-5,
                       rope_theta=500_000.0, use_scaled_rope=True)


# Meta's params.json of each size (LLaMA-1 and Llama-2 use a 32000-piece tokenizer).
PUBLISHED: dict[str, Published] = {m.label: m for m in (
    Published(FAMILIES["llama-1"], "7B", ModelParams(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6), 32000),
    Published(FAMILIES["llama-1"], "13B", ModelParams(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6), 32000),
    Published(FAMILIES["llama-1"], "30B", ModelParams(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6), 32000),
    Published(FAMILIES["llama-1"], "65B", ModelParams(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-6), 32000),
    Published(FAMILIES["llama-2"], "70B", ModelParams(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                                      multiple_of=4096, ffn_dim_multiplier=1.3), 32000),
    Published(FAMILIES["llama-3.2"], "1B", _llama3(2048, 16, 32, 1.5, 256), LLAMA3_VOCAB, tied=True),
    Published(FAMILIES["llama-3.2"], "3B", _llama3(3072, 28, 24, 1.0, 256), LLAMA3_VOCAB, tied=True),
    Published(FAMILIES["llama-3.1"], "8B", _llama3(4096, 32, 32, 1.3, 1024), LLAMA3_VOCAB),
    Published(FAMILIES["llama-3.1"], "70B", _llama3(8192, 80, 64, 1.3, 4096), LLAMA3_VOCAB),
    Published(FAMILIES["llama-3.1"], "405B", _llama3(16384, 126, 128, 1.2, 4096), LLAMA3_VOCAB),
)}
