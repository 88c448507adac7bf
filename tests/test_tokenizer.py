"""The converted vocabulary tokenizes exactly as sentencepiece does."""

from __future__ import annotations

import gguf
import pytest
from conftest import LLAMA_TOKENIZER, META_TINY

from llamalocal.convert.gguf_out import StreamingGGUFWriter
from llamalocal.convert.tokenizer import add_to_gguf, find_tokenizer, load_vocab
from llamalocal.errors import BadInputError

STRINGS = [
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "Hello\n\nworld\n",
    "\t tabs\tand   runs    of spaces  ",
    "1234567890 3.14159 2025-11-24 1,000,000",
    "naïve café résumé über Straße",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Привет, мир! Γειά σου Κόσμε",
    "emoji 🦙🔥👍🏽 and 👨‍👩‍👧‍👦 family",
    "code: def f(x):\n    return x**2  # square",
    "<s> </s> <unk> literal control-looking text",
    "mixed\u00a0nbsp\u2003em-space\u200bzero-width",
    "ÀÁÂÃÄÅ ǅ ﬁ ligature ① ½",
    "",
    " ",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 5,
]


def vocab_only_gguf(tokenizer_path, out_path, *, instruct=False):
    """A GGUF holding just a vocabulary (tiny hyper-parameters, no tensors)."""
    vocab = load_vocab(tokenizer_path)
    w = StreamingGGUFWriter(out_path)
    g = w.gguf
    g.add_context_length(64)
    g.add_embedding_length(64)
    g.add_block_count(1)
    g.add_feed_forward_length(64)
    g.add_head_count(1)
    g.add_rope_dimension_count(64)
    g.add_layer_norm_rms_eps(1e-6)
    g.add_vocab_size(len(vocab))
    add_to_gguf(g, vocab, instruct=instruct)
    w.open()
    w.finish()
    return vocab


def check_tokenizer(tokenizer_path, tmp_path):
    import llama_cpp
    import sentencepiece as spm

    vocab = vocab_only_gguf(tokenizer_path, tmp_path / "vocab.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    for s in STRINGS:
        expected = [sp.bos_id()] + sp.encode(s)
        assert llm.tokenize(s.encode(), add_bos=True, special=False) == expected, s
    assert llm.token_bos() == sp.bos_id() and llm.token_eos() == sp.eos_id()
    return vocab


@pytest.mark.skipif(not LLAMA_TOKENIZER.is_file(), reason="../shared/fixtures/llama-tokenizer absent")
def test_real_llama_tokenizer_matches_sentencepiece(tmp_path):
    vocab = check_tokenizer(LLAMA_TOKENIZER, tmp_path)
    assert len(vocab) == 32000
    types = vocab.token_types
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256
    assert vocab.tokens[3] == "<0x00>"


@pytest.mark.skipif(not (META_TINY / "tokenizer.model").is_file(), reason="../shared/fixtures/meta-tiny absent")
def test_tiny_tokenizer_matches_sentencepiece(tmp_path):
    check_tokenizer(META_TINY / "tokenizer.model", tmp_path)


def test_trained_sample_tokenizer_matches_sentencepiece(tmp_path):
    from llamalocal.convert.sample import train_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(train_tokenizer(400))
    check_tokenizer(tmp_path / "tokenizer.model", tmp_path)


def test_garbage_tokenizer_is_refused(tmp_path):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"\x00\xffnot a model" * 10)
    with pytest.raises(BadInputError, match="neither a sentencepiece model .* nor a tiktoken"):
        load_vocab(p)


def test_tokenizer_found_in_parent(tmp_path):
    (tmp_path / "7B").mkdir()
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path / "7B") == tmp_path / "tokenizer.model"
    with pytest.raises(BadInputError, match="no tokenizer.model"):
        find_tokenizer(tmp_path / "7B" / "nested")
