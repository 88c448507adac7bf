"""Meta tensor names -> GGUF tensor names, and how Meta's model parallelism split each tensor.

This table is the one place both facts live. GGUF names come from gguf-py's own constants.
Split rules follow Meta's `model.py`: ColumnParallelLinear shards the output features (dim 0),
RowParallelLinear and ParallelEmbedding shard the input features (dim 1); norms are replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

T = gguf.MODEL_TENSOR

# How shards combine: concatenate on dim 0 or 1, or the same copy in every shard.
COLUMN, ROW, REPLICATED = 0, 1, None


@dataclass(frozen=True)
class TensorRule:
    gguf: gguf.MODEL_TENSOR
    split_dim: int | None


GLOBAL_TENSORS: dict[str, TensorRule] = {
    "tok_embeddings.weight": TensorRule(T.TOKEN_EMBD, ROW),  # ParallelEmbedding: split on the embedding dim
    "norm.weight": TensorRule(T.OUTPUT_NORM, REPLICATED),
    "output.weight": TensorRule(T.OUTPUT, COLUMN),
}

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

_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def lookup(meta_name: str) -> tuple[str, TensorRule, int | None] | None:
    """'layers.3.attention.wq.weight' -> ('blk.3.attn_q.weight', rule, 3); None if unknown."""
    if meta_name in GLOBAL_TENSORS:
        rule = GLOBAL_TENSORS[meta_name]
        return gguf.TENSOR_NAMES[rule.gguf] + ".weight", rule, None
    m = _LAYER_RE.fullmatch(meta_name)
    if m and m.group(2) in LAYER_TENSORS:
        rule, bid = LAYER_TENSORS[m.group(2)], int(m.group(1))
        return gguf.TENSOR_NAMES[rule.gguf].format(bid=bid) + ".weight", rule, bid
    return None


def meta_names(n_layers: int) -> list[str]:
    """Every tensor a Meta LLaMA checkpoint must have, in the order llama.cpp lays out a GGUF."""
    names = ["tok_embeddings.weight"]
    for i in range(n_layers):
        names += [f"layers.{i}.{suffix}" for suffix in LAYER_TENSORS]
    return names + ["norm.weight", "output.weight"]
