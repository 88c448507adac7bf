"""Llama-3.x checkpoints in Meta's layout, converted and run by llama.cpp, against Meta's own code.

The reference is llama-models' llama3/model.py and checkpoint.py (tests/meta_reference.py): Meta's
merge of the shards and Meta's forward pass, scaled rope included. Synthetic checkpoints with the
real tokenizer: 1, 2 and 8 shards, tied and untied output, Llama-3.0/3.1/3.2/3.3, and 405B's MP16
layout (KV heads copied over twice as many shards).
"""

from __future__ import annotations

import json

import gguf_header
import numpy as np
import pytest
from llama3_helpers import vocab_once  # noqa: F401  (autouse)
from meta_reference import MetaModel, init_model_parallel, scaled_rope, torch

from llamalocal.convert import families
from llamalocal.convert.convert import convert
from llamalocal.convert.params import ModelParams
from llamalocal.convert.sample import TIED_ABSENT, TIED_SHARED, UNTIED, SampleSpec, build_sample
from llamalocal.errors import CheckpointError

llama_cpp = pytest.importorskip("llama_cpp")

# a long prompt: Meta's scaled rope changes only the low frequencies, which need a few hundred
# positions to move a logit
PROMPT = ("def main(argv):\n        return 0  # The quick brown fox jumps over the lazy dog. "
          "Ünïcödé, 東京, 123456789, 🦙🔥 and <|eot_id|> as text. ") * 6
N_GREEDY = 8


def llama3_params(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, scaled=True, **kw) -> ModelParams:
    return ModelParams(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       vocab_size=families.LLAMA3_VOCAB, multiple_of=64, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                       rope_theta=500_000.0, use_scaled_rope=scaled, **kw)


def build(tmp_path, tok, name, p, **spec):
    spec.setdefault("dtype", "bf16")
    spec.setdefault("weight_std", 0.08)  # attention sharp enough for rope to matter
    return build_sample(tmp_path / "ck", name, SampleSpec(params=p, **spec), tokenizer=tok)


class Run:
    """An f32 GGUF run by llama.cpp (f32 KV cache: this checks the conversion, not the cache)."""

    def __init__(self, path, n_ctx=512):
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    def tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode())  # with <|begin_of_text|>

    def logits(self, tokens):
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float64)

    def greedy(self, tokens, n):
        self.llm.reset()
        out = []
        for t in self.llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if len(out) == n:
                return out
        return out

    def close(self):
        self.llm.close()


def compare(gguf_path, ref: MetaModel, strict: float = 1e-4):
    """top-1 identical, max |Δlogit| < 1 % of the logits' spread (the issue's bar) and below
    `strict` of it (f32 on both sides agrees to ~1e-6), greedy continuations identical."""
    run = Run(gguf_path)
    try:
        tokens = run.tokens(PROMPT)
        got, want = run.logits(tokens), ref.logits(tokens)
        spread = want.max() - want.min()
        delta = np.abs(got - want).max()
        assert np.array_equal(got.argmax(-1), want.argmax(-1)), "top-1 differs from Meta's model"
        assert delta < 0.01 * spread
        assert delta < strict * spread, f"max |Δlogit| {delta:.3g} = {delta / spread:.2g} of the spread"
        assert run.greedy(tokens, N_GREEDY) == ref.greedy(tokens, N_GREEDY)
    finally:
        run.close()




# ---------------------------------------------------------------------------------------------
# against Meta's model
# ---------------------------------------------------------------------------------------------

CASES = {
    # name: (folder, shards, params, tie_output); the folder name is how 3.2 / 3.3 are recognised
    "3.1-1-shard": ("Llama3.1-tiny", 1, llama3_params(), UNTIED),
    "3.2-2-shards-tied-storage": ("Llama3.2-tiny", 2, llama3_params(), TIED_SHARED),
    "3.2-8-shards-tied-absent": ("Llama3.2-tiny-Instruct", 8, llama3_params(n_heads=8, n_kv_heads=8), TIED_ABSENT),
    "3.3-8-shards": ("Llama3.3-tiny", 8, llama3_params(n_heads=8, n_kv_heads=8), UNTIED),
    "3.0-1-shard": ("Meta-Llama-3-tiny", 1, llama3_params(scaled=False), UNTIED),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_f32_matches_meta_model(tmp_path, llama3_tokenizer, case):
    folder, n_shards, p, tie = CASES[case]
    d = build(tmp_path, llama3_tokenizer, folder, p, n_shards=n_shards, tie_output=tie)
    result = convert(d, "f32", tmp_path / "m.gguf")
    assert result.tied_embeddings == (tie != UNTIED)
    ref = MetaModel(d, max_seq_len=512, rope_scaling_factor=result.rope_scaling_factor)
    compare(result.path, ref)

    names = gguf_header.read(result.path).tensors
    assert ("output.weight" in names) == (tie == UNTIED)
    assert ("rope_freqs.weight" in names) == p.use_scaled_rope
    expected_family = {"3.1": "Llama-3.1", "3.2": "Llama-3.2", "3.3": "Llama-3.3", "3.0": "Llama-3"}[case[:3]]
    assert result.family == expected_family
    if case == "3.2-2-shards-tied-storage":
        # the comparison can fail: Llama-3.2 converted with 3.1's factor 8 instead of its 32
        assert result.rope_scaling_factor == 32
        wrong = convert(d, "f32", tmp_path / "wrong.gguf", rope_scaling_factor=8)
        with pytest.raises(AssertionError):
            compare(wrong.path, ref)


@pytest.mark.slow
def test_405b_mp16_layout_writes_the_real_kv_heads(tmp_path, llama3_tokenizer):
    """16 shards, 8 KV heads each copied into two consecutive shards (params.json: n_kv_heads 16), as
    Meta's reshard_mp writes 405B's MP16 download: the GGUF has the 8 real heads, is tensor for tensor
    the 8-shard conversion of the same weights, and runs as Meta's model does on the 16 copies."""
    p = llama3_params(n_heads=16, n_kv_heads=8)
    mp16 = build(tmp_path / "16", llama3_tokenizer, "Llama3.1-tiny-MP16", p, n_shards=16, kv_replicas=2)
    assert json.loads((mp16 / "params.json").read_text())["n_kv_heads"] == 16
    mp8 = build(tmp_path / "8", llama3_tokenizer, "Llama3.1-tiny", p, n_shards=8)
    a = convert(mp16, "f32", tmp_path / "mp16.gguf")
    b = convert(mp8, "f32", tmp_path / "mp8.gguf")
    assert a.kv_replicas == 2 and b.kv_replicas == 1
    ha, hb = gguf_header.read(a.path), gguf_header.read(b.path)
    assert ha.fields["llama.attention.head_count_kv"] == 8
    assert ha.tensors == hb.tensors  # names, shapes, types, offsets
    assert a.path.read_bytes()[ha.data_start:] == b.path.read_bytes()[hb.data_start:]
    compare(a.path, MetaModel(mp16, max_seq_len=512, rope_scaling_factor=8))


def test_kv_copies_that_differ_are_refused(tmp_path, llama3_tokenizer):
    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.torch_save import save_state_dict

    p = llama3_params(dim=64, n_heads=4, n_kv_heads=2)
    d = build(tmp_path, llama3_tokenizer, "Llama3.1-tiny", p, n_shards=4, kv_replicas=2, dtype="f32")
    f = d / "consolidated.03.pth"
    with open_checkpoint(f) as ck:
        sd = {n: ck.rows(n) for n in ck.tensors}
    sd["layers.1.attention.wv.weight"][0, 0] += 1.0  # layer 0's copies still agree
    save_state_dict(f, sd, dtype="f32")
    with pytest.raises(CheckpointError, match="consolidated.03.*copy of the KV heads in consolidated.02"):
        convert(d, "f32", tmp_path / "m.gguf", verify=False)
    assert not list(tmp_path.glob("*.gguf"))


# ---------------------------------------------------------------------------------------------
# the split dims and the scaled rope are Meta's, read from Meta's code
# ---------------------------------------------------------------------------------------------

def _partitioned_shapes(monkeypatch, world_size: int) -> dict[str, tuple[int, ...]]:
    """Meta's Transformer built as one rank of `world_size` model-parallel ranks."""
    from fairscale.nn.model_parallel import initialize as fs_init
    from fairscale.nn.model_parallel import layers as fs_layers
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    init_model_parallel()
    monkeypatch.setattr(fs_init, "get_model_parallel_world_size", lambda: world_size)
    monkeypatch.setattr(fs_layers, "get_model_parallel_world_size", lambda: world_size)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32,
                     max_seq_len=8, max_batch_size=1)
    model = Transformer(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_split_dims_are_meta_models(monkeypatch):
    """Every tensor of Meta's llama3/model.py: the dimension that shrinks when the model is split
    over two ranks is the one families says the shards are joined on (ColumnParallelLinear 0,
    RowParallelLinear 1, VocabParallelEmbedding 0; norms replicated)."""
    whole = _partitioned_shapes(monkeypatch, 1)
    half = _partitioned_shapes(monkeypatch, 2)
    fam = families.FAMILIES["llama-3.1"]
    for name, shape in whole.items():
        split = [i for i, (a, b) in enumerate(zip(shape, half[name], strict=True)) if a != b]
        assert fam.lookup(name) is not None, name
        assert fam.split_dim(name) == (split[0] if split else None), name
    assert set(whole) == set(families.meta_names(1))


def test_llama2_embedding_split_is_fairscales_parallel_embedding(monkeypatch):
    """LLaMA-1/Llama-2's model.py used fairscale's ParallelEmbedding: split on the embedding dim."""
    from fairscale.nn.model_parallel import initialize as fs_init
    from fairscale.nn.model_parallel import layers as fs_layers

    init_model_parallel()
    monkeypatch.setattr(fs_init, "get_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(fs_layers, "get_model_parallel_world_size", lambda: 2)
    emb = fs_layers.ParallelEmbedding(96, 64, init_method=lambda x: x)
    split = [i for i, (a, b) in enumerate(zip((96, 64), emb.weight.shape, strict=True)) if a != b]
    for key in ("llama-1", "llama-2", "code-llama"):
        assert families.FAMILIES[key].split_dim("tok_embeddings.weight") == split[0]


@pytest.mark.parametrize("head_dim,theta,factor", [(128, 500_000.0, 8), (64, 500_000.0, 32), (16, 500_000.0, 32),
                                                   (128, 10_000.0, 16)])
def test_rope_freqs_are_metas_apply_scaling(head_dim, theta, factor):
    """llama.cpp divides each frequency by rope_freqs: freq / rope_freqs must be Meta's apply_scaling."""
    from llama_models.llama3 import model as meta_model

    apply = meta_model.apply_scaling if factor == 8 else scaled_rope(factor)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    want = apply(freqs).double().numpy()
    got = freqs.double().numpy() / families.rope_freq_factors(head_dim, theta, factor).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert families.rope_freq_factors(head_dim, theta, factor).dtype == np.float32


def test_bundled_tokenizer_is_the_shared_fixture():
    """The tests fall back to llama-models' copy of Meta's tokenizer when ../shared is absent."""
    import importlib.util
    from pathlib import Path

    from conftest import LLAMA3_TOKENIZER

    if not LLAMA3_TOKENIZER.is_file():
        pytest.skip("../shared/fixtures/llama3-tokenizer not present")
    spec = importlib.util.find_spec("llama_models")
    bundled = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    assert bundled.read_bytes() == LLAMA3_TOKENIZER.read_bytes()
