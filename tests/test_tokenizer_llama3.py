"""Meta's Llama-3 tokenizer.model (tiktoken) -> GGUF BPE: the same vocabulary and merges as
llama.cpp's own ggml-vocab-llama-bpe.gguf, and the same ids as Meta's Tokenizer (tiktoken) when
llama.cpp tokenizes with the GGUF we write."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import shutil
import time
from pathlib import Path

import gguf
import pytest
from test_tokenizer import vocab_only_gguf

from llamalocal.convert import native, tiktoken_bpe
from llamalocal.convert.tokenizer import TIKTOKEN, load_vocab
from llamalocal.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]

STRINGS = [
    "Hello world", " Hello world", "Hello World!", "  two leading spaces", "trailing spaces   ",
    "Hello\n\nworld\n", "\n", "\n\n\n\n", " \n \n ", "\r\n\r\n", "\t tabs\tand   runs    of spaces  ",
    "a" + " " * 40 + "b", " " * 33, " " * 100, "\t" * 20, "x\n" + " " * 48 + "return x",
    # digits: groups of three, mixed with letters, other scripts' digits
    "1234567890 3.14159 2025-11-24 1,000,000 0.000001", "w048 7tuijk dsdfhu", "١٢٣٤ ٥٦٧ ९८७ １２３４",
    "12345678901234567890", "v1.2.3-rc4+build.567",
    # contractions, matched case-insensitively by the pre-tokenizer
    "I'm sure you're right, they'll see it's what we'd've done", "DON'T YOU'RE I'LL 'S 'T 'Re 'vE",
    "naïve café résumé über Straße İstanbul ǅemal", "e\u0301 vs é (NFD vs NFC)",
    "日本語のテキスト、中文文本，한국어 텍스트", "Привет, мир! Γειά σου Κόσμε", "مرحبا بالعالم שלום עולם",
    "नमस्ते दुनिया বাংলা தமிழ் ไทยภาษา ქართული Հայերեն አማርኛ ខ្មែរ",
    "emoji 🦙🔥👍🏽 and 👨‍👩‍👧‍👦 family 🇫🇷🇯🇵 1️⃣ #️⃣", "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅",
    "mixed\u00a0nbsp\u2003em-space\u200bzero-width\ufeffbom", "ÀÁÂÃÄÅ ǅ ﬁ ligature ① ½ ™ ©",
    "\x00\x01\x07\x1b[31mred\x1b[0m\x7f",
    # code
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "#include <stdio.h>\nint main(void) {\n        printf(\"%d\\n\", 42);\n}\n",
    "//" + "-" * 76 + "\n/" + "*" * 72 + "\n" + "=" * 64,
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', "<div class=\"x\">&amp;&lt;</div>",
    "SELECT * FROM t WHERE a >= 10 AND b <> 'x';", "$$\\frac{a}{b} + \\sum_{i=0}^{n} x_i$$",
    "https://example.com/path?q=1&r=two#frag", "C:\\Users\\name\\file.txt", "a--b---c----d",
    # text that looks like special tokens: text, unless special tokens are parsed
    "<|begin_of_text|>", "<|eot_id|> after", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|reserved_special_token_7|><|python_tag|><|image|>", "<s> </s> <unk> <|endoftext|> <|im_end|>",
    "<|begin_of_text", "|>", "<||>",
    "", " ", "a", "The quick brown fox jumps over the lazy dog. " * 20,
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    """Strings drawn from a mix of scripts, digits, punctuation and whitespace runs."""
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " ", "  \t\n\r",
             ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`", "éèêëàâäôöûüçñßøåæœ", "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
             "αβγδεζηθικλμνξοπρστυφχψω", "的一是不了人我在有他这为之大来以个中上们", "あいうえおかきくけこアイウエオ",
             "가나다라마바사아자차카타파하", "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", "🦙🔥👍🏽😀🎉❤️‍🔥", "\u200b\u00a0\u2028\u3000"]
    rnd = random.Random(seed)
    return ["".join(rnd.choice(rnd.choice(pools)) for _ in range(rnd.randrange(0, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def meta_tokenizer(llama3_tokenizer):
    """Meta's own Tokenizer (llama-models, over tiktoken)."""
    pytest.importorskip("tiktoken")
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(llama3_tokenizer)


@pytest.fixture(scope="module")
def vocab_gguf(llama3_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama3-vocab") / "vocab.gguf"
    vocab_only_gguf(llama3_tokenizer, out)
    return out


@pytest.fixture(scope="module")
def llm(vocab_gguf):
    import llama_cpp

    return llama_cpp.Llama(str(vocab_gguf), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def reference(llama_cpp_src):
    """llama.cpp's own vocab-only GGUF of this tokenizer (built from Meta-Llama-3's HF tokenizer.json)."""
    path = llama_cpp_src / "models" / "ggml-vocab-llama-bpe.gguf"
    r = gguf.GGUFReader(str(path))

    def strings(key: str) -> list[str]:
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    types = r.fields["tokenizer.ggml.token_type"]
    return {
        "tokens": strings("tokenizer.ggml.tokens"),
        "merges": strings("tokenizer.ggml.merges"),
        "types": [int(types.parts[i][0]) for i in types.data],
        "model": bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode(),
        "pre": bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode(),
        "bos": int(r.fields["tokenizer.ggml.bos_token_id"].parts[-1][0]),
        "n_vocab": int(r.fields["llama.vocab_size"].parts[-1][0]),
    }


# ---------------------------------------------------------------------------------------------
# the vocabulary itself
# ---------------------------------------------------------------------------------------------

def test_llama_models_ships_the_same_file(llama3_tokenizer):
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        pytest.skip("llama-models not installed")
    bundled = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (bundled, llama3_tokenizer)]
    assert digest[0] == digest[1]


def test_format_is_told_by_content_not_name(llama3_tokenizer, tmp_path):
    from llamalocal.convert.sample import train_tokenizer

    odd = tmp_path / "sentencepiece.model"
    shutil.copy(llama3_tokenizer, odd)
    assert load_vocab(odd).kind == TIKTOKEN
    spm = tmp_path / "llama3.tiktoken"
    spm.write_bytes(train_tokenizer(400))
    assert load_vocab(spm).kind == "spm"


def test_vocab_and_merges_equal_llama_cpps_own(llama3_tokenizer, reference):
    vocab = load_vocab(llama3_tokenizer)
    assert len(vocab) == reference["n_vocab"] == 128256
    assert reference["model"] == "gpt2" and reference["pre"] == "llama-bpe"
    assert vocab.tokens[:128000] == reference["tokens"][:128000]  # the normal tokens, GPT-2 byte form
    assert vocab.merges == reference["merges"]  # 280147 of them, in the same order
    assert vocab.token_types == reference["types"]  # normal, and every special one (reserved too) control
    assert vocab.bos_id == reference["bos"] == 128000


def test_special_tokens_are_metas(llama3_tokenizer, meta_tokenizer):
    vocab = load_vocab(llama3_tokenizer)
    by_id = {i: name for name, i in meta_tokenizer.special_tokens.items()}
    assert vocab.tokens[128000:] == [by_id[i] for i in range(128000, 128256)]
    assert len(vocab) == meta_tokenizer.n_words
    assert (vocab.bos_id, vocab.eos_id, vocab.eot_id, vocab.eom_id) == (
        meta_tokenizer.bos_id, meta_tokenizer.eos_id, meta_tokenizer.eot_id, meta_tokenizer.eom_id)
    assert (vocab.bos_id, vocab.eos_id, vocab.eot_id, vocab.eom_id) == (128000, 128001, 128009, 128008)
    assert vocab.eos_for(instruct=False) == 128001 and vocab.eos_for(instruct=True) == 128009
    assert vocab.unk_id is None and vocab.scores == []


def test_vocabulary_builds_in_seconds(llama3_tokenizer):
    start = time.perf_counter()
    vocab = load_vocab(llama3_tokenizer)
    took = time.perf_counter() - start
    print(f"Llama-3 vocabulary (128256 tokens, {len(vocab.merges)} merges) built in {took:.2f} s")
    assert took < 20  # ~0.6 s on a quiet core; generous for a loaded CI machine


# ---------------------------------------------------------------------------------------------
# tokenizing through llama.cpp with the GGUF we write
# ---------------------------------------------------------------------------------------------

def test_llama_cpp_test_vectors(llm, meta_tokenizer, llama_cpp_src):
    """llama.cpp's own test-tokenizer-0 vectors for this tokenizer (tokenized without BOS)."""
    models = llama_cpp_src / "models"
    raw = (models / "ggml-vocab-llama-bpe.gguf.inp").read_bytes().decode("utf-8")
    expected = (models / "ggml-vocab-llama-bpe.gguf.out").read_text().splitlines()
    cases = raw.split("\n__ggml_vocab_test__\n")
    if raw.endswith("\n__ggml_vocab_test__\n"):
        cases.pop()  # test-tokenizer-0 reads no test after the last separator
    assert len(cases) == len(expected) > 40
    for text, line in zip(cases, expected, strict=True):
        want = [int(x) for x in line.split()]
        assert meta_tokenizer.encode(text, bos=False, eos=False) == want, text
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == want, text


@pytest.mark.parametrize("text", STRINGS + _random_strings(300) + [
    (REPO / "convert" / "tokenizer.py").read_text(), (REPO / "README.md").read_text()])
def test_tokenizes_like_metas_tokenizer(llm, meta_tokenizer, text):
    want = meta_tokenizer.encode(text, bos=True, eos=False)
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == want
    # and every id decodes back to the text's bytes, long tokens (33+ bytes) included
    assert b"".join(native.token_piece(llm.model, t) for t in want[1:]) == text.encode("utf-8")


@pytest.mark.parametrize("text", [s for s in STRINGS if "<|" in s] + [
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n  Hi\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
])
def test_special_tokens_parsed_like_meta(llm, meta_tokenizer, text):
    want = meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want


def test_every_normal_token_round_trips(llm, llama3_tokenizer):
    """Each of the 128000 normal tokens decodes to its own bytes (the 231 longer than 32 too)."""
    ranked = tiktoken_bpe.read_ranks(llama3_tokenizer.read_bytes(), llama3_tokenizer)
    assert sum(len(t) > 32 for t in ranked) == 231
    assert all(native.token_piece(llm.model, i) == t for i, t in enumerate(ranked))


# ---------------------------------------------------------------------------------------------
# the GGUF keys
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("instruct", [False, True])
def test_gguf_keys(llama3_tokenizer, tmp_path, instruct):
    import llama_cpp

    vocab_only_gguf(llama3_tokenizer, tmp_path / "v.gguf", instruct=instruct)
    llm = llama_cpp.Llama(str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    meta = llm.metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert llm.token_bos() == 128000
    assert llm.token_eos() == (128009 if instruct else 128001)
    assert meta["tokenizer.ggml.eot_token_id"] == "128009" and meta["tokenizer.ggml.eom_token_id"] == "128008"
    assert meta["tokenizer.ggml.add_bos_token"] == "true" and meta["tokenizer.ggml.add_eos_token"] == "false"
    assert ("tokenizer.chat_template" in meta) == instruct
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_get_add_bos(vocab)
    # generation ends at <|end_of_text|>, <|eom_id|> and <|eot_id|>, whichever is the eos
    assert [native.is_eog(llm.model, t) for t in (128000, 128001, 128006, 128008, 128009)] == \
        [False, True, False, True, True]
    # BOS is added as Meta's Tokenizer adds it
    assert llm.tokenize(b"hi", add_bos=True, special=False)[0] == 128000


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------

def _renumbered(lines: list[bytes]) -> list[bytes]:
    return [b"%s %d" % (ln.split()[0], rank) for rank, ln in enumerate(lines)]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda lines: lines[:5] + [b"not base64! 5"] + lines[6:], "line 6: not a tiktoken"),
    (lambda lines: lines[:5] + [lines[5].split()[0] + b" 4"] + lines[6:], "rank 4 is out of order or repeated"),
    (lambda lines: lines[:5] + lines[6:], "ranks are not contiguous|out of order"),
    (lambda lines: _renumbered([ln for ln in lines if ln.split()[0] != b"QQ=="]), "255 of the 256 byte values"),
])
def test_damaged_tiktoken_file_is_refused(llama3_tokenizer, tmp_path, mutate, message):
    lines = [ln for ln in llama3_tokenizer.read_bytes().split(b"\n") if ln]
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"\n".join(mutate(lines)) + b"\n")
    with pytest.raises(BadInputError, match=message):
        load_vocab(p)


def test_tiny_tiktoken_file_is_not_a_byte_level_bpe(tmp_path):
    p = tmp_path / "tokenizer.model"
    p.write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(BadInputError, match="3 of the 256 byte values"):
        load_vocab(p)
