"""Test helper: tiny F32 llama GGUFs of any shape, written by gguf-py, for comparing our
quantizer's choices and bytes with llama.cpp's own llama_model_quantize (tests/test_presets.py,
tests/test_presets_tied.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class Model:
    """Hyper-parameters of a test model. `rows` overrides every 2-D tensor's row count to keep
    the models small (llama-quantize reads shapes, it does not check them, and its choices look
    at the row length, never at the number of rows; the IQ quantizers are slow)."""

    n_layers: int
    dim: int
    ffn: int
    n_head: int
    n_head_kv: int
    vocab: int = 64
    rows: int | None = None
    tied: bool = False  # no output.weight: the output shares token_embd (Llama-3.2 1B/3B)



def shapes_of(m: Model) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (rows, cols), in Meta's layout."""
    head_dim = m.dim // m.n_head
    kv = m.n_head_kv * head_dim

    def r(n: int) -> int:
        return m.rows or n

    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (r(m.vocab), m.dim),   # tok_embeddings
        "output_norm.weight": (m.dim,),              # norm
    }
    if not m.tied:
        shapes["output.weight"] = (r(m.vocab), m.dim)  # output
    for i in range(m.n_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (m.dim,),        # attention_norm
            f"blk.{i}.attn_q.weight": (r(m.dim), m.dim),  # wq
            f"blk.{i}.attn_k.weight": (r(kv), m.dim),     # wk
            f"blk.{i}.attn_v.weight": (r(kv), m.dim),     # wv
            f"blk.{i}.attn_output.weight": (r(m.dim), m.dim),  # wo
            f"blk.{i}.ffn_norm.weight": (m.dim,),         # ffn_norm
            f"blk.{i}.ffn_gate.weight": (r(m.ffn), m.dim),  # w1
            f"blk.{i}.ffn_down.weight": (r(m.dim), m.ffn),  # w2
            f"blk.{i}.ffn_up.weight": (r(m.ffn), m.dim),    # w3
        }
    return shapes


def write_f32_gguf(path: Path, m: Model, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {
        name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
               else 0.05 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in shapes_of(m).items()
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(m.dim)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.ffn)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_head_kv)
    w.add_rope_dimension_count(m.dim // m.n_head)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # a minimal sentencepiece-style vocab: unk, bos, eos, then plain pieces
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(m.vocab - 3)])
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(m.vocab - 3)])
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * (m.vocab - 3))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors
