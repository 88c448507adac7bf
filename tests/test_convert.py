"""Conversion correctness: logits against a numpy reference, shard merging, metadata, presets."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from reference import forward, load_merged

from llamalocal.convert.convert import convert
from llamalocal.convert.params import ModelParams, load_params
from llamalocal.convert.sample import SampleSpec, build_sample

# Meta's model.py, written out independently of convert.tensor_names
SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}


def split_dims(names):
    return {n: SPLIT.get(n.split(".")[-2]) for n in names}


def llama_logits(path, tokens):
    import llama_cpp

    # f32 KV cache: this checks the conversion, not the cache's precision
    llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(tokens)), logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return out


def assert_logits_match(model_dir, gguf_path, tokens):
    p = load_params(model_dir)
    w = load_merged(model_dir, split_dims(_names(model_dir)))
    w.pop("rope.freqs", None)
    ref = forward(w, p, tokens)
    got = llama_logits(gguf_path, tokens)
    assert got.shape == ref.shape
    assert np.array_equal(got.argmax(-1), ref.argmax(-1)), "top-1 differs from the reference forward pass"
    assert np.abs(got - ref).max() < 1e-2


def _names(model_dir):
    from llamalocal.convert.checkpoint import open_checkpoint

    with open_checkpoint(sorted(model_dir.glob("consolidated.*.pth"))[0]) as ck:
        return list(ck.tensors)


def tokens_for(model_dir, text="To be, or not to be, that is the question: whether 'tis nobler in the mind"):
    import sentencepiece as spm

    tok = model_dir / "tokenizer.model"
    if not tok.exists():
        tok = model_dir.parent / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    return [sp.bos_id()] + sp.encode(text)


@pytest.mark.parametrize("model", ["tiny-v1", "tiny-v2"])
def test_f32_logits_match_reference(tiny_checkpoints, converted, model):
    """tiny-v1: 2 model-parallel fp16 shards; tiny-v2: GQA, bf16, ffn_dim_multiplier."""
    d = tiny_checkpoints / model
    assert_logits_match(d, converted(model, "f32"), tokens_for(d))


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_sharded_gqa_synthetic_matches_reference(tmp_path, n_shards):
    """Same weights split over 1, 2 and 4 shards: the GGUF is byte-identical and matches the reference."""
    p = ModelParams(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.3,
                    norm_eps=1e-5, rope_theta=500.0)
    d = build_sample(tmp_path / "ck", "m", SampleSpec(params=p, n_shards=n_shards, dtype="f32", vocab_size=400))
    out = convert(d, "f32", tmp_path / "m.gguf").path
    assert_logits_match(d, out, tokens_for(d, "def main(argv): return 0"))
    if n_shards > 1:
        one = build_sample(tmp_path / "ck1", "m", SampleSpec(params=p, n_shards=1, dtype="f32", vocab_size=400),
                           tokenizer=d.parent / "tokenizer.model")
        ref = convert(one, "f32", tmp_path / "one.gguf").path
        a, b = gguf.GGUFReader(out), gguf.GGUFReader(ref)
        for ta, tb in zip(a.tensors, b.tensors, strict=True):
            assert ta.name == tb.name and np.array_equal(ta.data, tb.data), ta.name


@pytest.mark.parametrize("preset", ["f32", "q4_k_m"])
def test_block_and_chunk_sizes_do_not_change_a_byte(tmp_path, monkeypatch, preset):
    """4 shards in many small blocks (each row-parallel block glued from 4 slices, column-parallel
    blocks ending at shard boundaries) and tiny cache chunks give the tensors of the same weights
    saved unsharded and converted whole."""
    import llamalocal.convert.convert as cc
    import llamalocal.convert.quantize as qz

    p = ModelParams(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=64, norm_eps=1e-5)
    one = build_sample(tmp_path / "one", "m", SampleSpec(params=p, n_shards=1, dtype="f16", vocab_size=400))
    four = build_sample(tmp_path / "four", "m", SampleSpec(params=p, n_shards=4, dtype="f16", vocab_size=400),
                        tokenizer=one.parent / "tokenizer.model")
    whole = convert(one, preset, tmp_path / "whole.gguf").path
    monkeypatch.setattr(cc, "BLOCK_ELEMENTS", 7 * 256 + 5)  # 7 rows of 256, fewer of wider rows
    monkeypatch.setattr(qz, "CACHE_CHUNK_ELEMENTS", 3 * 256)
    small = convert(four, preset, tmp_path / "small.gguf", threads=3).path
    a, b = gguf.GGUFReader(whole), gguf.GGUFReader(small)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert np.array_equal(ta.data, tb.data), ta.name


def _kv(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]


@pytest.mark.parametrize("preset,ftype", [("f32", 0), ("f16", 1), ("q8_0", 7), ("q4_0", 2), ("q4_k_m", 15), ("q2_k", 10)])
def test_file_type_and_metadata(converted, preset, ftype):
    r = gguf.GGUFReader(converted("tiny-v2", preset))
    assert _kv(r, "general.file_type") == ftype
    assert _kv(r, "general.architecture") == "llama"
    assert _kv(r, "llama.attention.head_count_kv") == 2
    assert _kv(r, "llama.context_length") == 4096  # Llama-2 style (norm_eps 1e-5)
    assert _kv(r, "tokenizer.ggml.add_bos_token") is np.True_ or _kv(r, "tokenizer.ggml.add_bos_token") == 1
    names = [t.name for t in r.tensors]
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight" and "rope.freqs" not in names
    norms = [t for t in r.tensors if t.name.endswith("norm.weight")]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in norms)


def test_llama1_context_and_defaults(converted):
    r = gguf.GGUFReader(converted("tiny-v1", "f16"))
    assert _kv(r, "llama.context_length") == 2048
    assert _kv(r, "llama.attention.head_count_kv") == _kv(r, "llama.attention.head_count")


def test_code_llama_vocab_padding_and_rope_theta(tmp_path):
    """Code Llama: rope_theta 1e6, an embedding larger than the tokenizer (padded), 16384 context."""
    p = ModelParams(dim=64, n_layers=1, n_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=1e6)
    tok_dir = tmp_path / "tok"
    build_sample(tok_dir, "x", SampleSpec(params=p, vocab_size=400))
    import json

    from llamalocal.convert.sample import random_weights
    from llamalocal.convert.torch_save import save_state_dict

    d = tmp_path / "CodeLlama-7b"
    d.mkdir()
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    save_state_dict(d / "consolidated.00.pth", dict(random_weights(p, 416, 0)), dtype="f16")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 2, "multiple_of": 32,
                                               "norm_eps": 1e-5, "rope_theta": 1e6, "vocab_size": 416}))
    r = gguf.GGUFReader(convert(d, "f16", tmp_path / "c.gguf", verify=False).path)
    assert _kv(r, "llama.context_length") == 16384
    assert _kv(r, "llama.rope.freq_base") == pytest.approx(1e6)
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 416


def test_ctx_override(tiny_checkpoints, tmp_path):
    r = gguf.GGUFReader(convert(tiny_checkpoints / "tiny-v1", "f16", tmp_path / "a.gguf", n_ctx=1024).path)
    assert _kv(r, "llama.context_length") == 1024


PRESETS = ["f32", "f16", "q8_0", "q5_0", "q5_1", "q5_k_m", "q4_0", "q4_1", "q4_k_m", "q3_k_m", "q2_k"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_generates(converted, preset):
    import llama_cpp

    llm = llama_cpp.Llama(str(converted("tiny-v1", preset)), n_ctx=128, verbose=False, n_threads=2)
    out = llm("ROMEO:", max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] > 0
    llm.close()
