"""Loadable llama GGUFs of any shape, with synthetic weights, for planner and start-up benchmarks.

The weights are a repeated block of small normal values (fast to write, no checkpoint needed);
the vocabulary is either a byte-fallback sentencepiece-style list of any size (`spm`) or the real
Llama-3 tokenizer taken from llama.cpp's own vocab-only GGUF (`llama-bpe`: 128256 tokens, 280147
merges). Quantized files are made from the f16 one by llama.cpp's own llama_model_quantize.

    python scripts/synth_gguf.py out.gguf --layers 2 --embd 4096 --ff 11008 --heads 32 --type q4_0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# llama_ftype values of llama.h for the file types the benchmarks use
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
          "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def _bpe_vocab() -> dict:
    """The tokenizer.* fields of llama.cpp's models/ggml-vocab-llama-bpe.gguf (Llama 3)."""
    import gguf
    from peer_tools import llama_cpp_source

    r = gguf.GGUFReader(str(llama_cpp_source(None) / "models" / "ggml-vocab-llama-bpe.gguf"))
    return {k: f for k, f in r.fields.items() if k.startswith("tokenizer.")}


def write_model(path: Path, *, n_layers: int = 2, n_embd: int = 256, n_ff: int = 768, n_head: int = 4,
                n_head_kv: int | None = None, n_vocab: int = 32000, n_ctx: int = 4096, vocab: str = "spm",
                dtype: type = np.float16, name: str = "synthetic") -> Path:
    """An f16 (or f32) llama GGUF of the given shape."""
    import gguf

    n_head_kv = n_head_kv or n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == np.float16 else gguf.LlamaFileType.ALL_F32)
    if vocab == "llama-bpe":
        fields = _bpe_vocab()
        n_vocab = len(fields["tokenizer.ggml.tokens"].data)
        w.add_rope_freq_base(500000.0)
        for key, f in fields.items():
            vtype = f.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_array(key, f.contents())
            elif vtype == gguf.GGUFValueType.STRING:
                w.add_string(key, f.contents())
            else:
                w.add_key_value(key, f.contents(), vtype)
    else:
        toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        toks += [f"\u2581t{i}" for i in range(n_vocab - len(toks))]
        w.add_tokenizer_model("llama")
        w.add_token_list(toks)
        w.add_token_scores([0.0] * n_vocab)
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    block = (np.random.default_rng(0).standard_normal(1 << 16) * 0.02).astype(dtype)

    def mat(rows: int, cols: int) -> np.ndarray:
        return np.resize(block, rows * cols).reshape(rows, cols)

    n_kv = n_embd // n_head * n_head_kv
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_kv, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_kv, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", mat(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's own quantizer, as llama-quantize runs it."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {ftype} failed")
    return dst


def make(path: Path, ftype: str = "f16", **shape) -> Path:
    """A GGUF of `shape` (write_model's keywords) at `ftype`, written to `path`."""
    if ftype in ("f16", "f32"):
        return write_model(path, dtype=np.float16 if ftype == "f16" else np.float32, **shape)
    f16 = write_model(path.with_suffix(".f16.tmp"), **shape)
    try:
        return quantize(f16, path, ftype)
    finally:
        f16.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--ff", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", default="spm", help="spm (byte-fallback list) or llama-bpe (Llama 3's)")
    ap.add_argument("--n-vocab", type=int, default=32000)
    ap.add_argument("--ctx-train", type=int, default=4096)
    ap.add_argument("--type", default="f16", choices=sorted(FTYPES))
    a = ap.parse_args()
    make(a.out, a.type, n_layers=a.layers, n_embd=a.embd, n_ff=a.ff, n_head=a.heads, n_head_kv=a.kv_heads,
         n_vocab=a.n_vocab, n_ctx=a.ctx_train, vocab=a.vocab)
    print(a.out)


if __name__ == "__main__":
    main()
