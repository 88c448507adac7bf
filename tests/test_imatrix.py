"""`llamalocal imatrix` against a numpy forward pass, and its Ctrl-C and bad-input behaviour.

The reference (tests/reference.py, written from Meta's model.py) runs the same windows llama.cpp
runs — `n_ctx` tokens from an empty cache, the first replaced by BOS — and sums the squares of
every matmul's input per column. llama.cpp's sums (read through the eval callback) must agree:
same weights covered, same token counts, values within the precision of llama.cpp's f16 KV cache.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import forward, load_merged

pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the model")

from llamalocal.convert.imatrix_file import read_imatrix  # noqa: E402
from llamalocal.convert.params import load_params  # noqa: E402
from llamalocal.errors import BadInputError, LlamalocalError  # noqa: E402
from llamalocal.imatrix import Interrupted, compute_imatrix  # noqa: E402

SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}
# Meta's names -> GGUF's, written out here independently of convert.tensor_names
GGUF_NAME = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
             "feed_forward.w3": "ffn_up"}
N_CTX, CHUNKS = 64, 3


def _gguf_name(meta: str) -> str:
    if meta == "output.weight":
        return meta
    _, i, rest = meta.split(".", 2)
    return f"blk.{i}.{GGUF_NAME[rest.removesuffix('.weight')]}.weight"


def _tokens(path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()


def _reference(model_dir, tokens: list[int], bos: int, n_ctx: int, chunks: int) -> tuple[dict[str, np.ndarray], int]:
    """Sums of squared matmul inputs per column, over `chunks` windows of `n_ctx`, with numpy."""
    p = load_params(model_dir)
    names = sorted(model_dir.glob("consolidated.*.pth"))
    from llamalocal.convert.checkpoint import open_checkpoint

    with open_checkpoint(names[0]) as ck:
        split = {n: SPLIT.get(n.split(".")[-2]) for n in ck.tensors}
    w = load_merged(model_dir, split)
    w.pop("rope.freqs", None)
    sums: dict[str, np.ndarray] = {}

    def tap(name: str, x: np.ndarray) -> None:
        key = _gguf_name(name)
        sums[key] = sums.get(key, 0) + (x * x).sum(axis=0)

    for i in range(chunks):
        window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        window[0] = bos
        forward(w, p, window, taps=tap)
    return sums, chunks * n_ctx


@pytest.fixture(scope="module")
def text(heldout_text) -> str:
    return heldout_text[:20000]


@pytest.mark.parametrize("model,n_ctx,chunks", [("tiny-v1", N_CTX, CHUNKS), ("tiny-v2", N_CTX, CHUNKS),
                                                ("tiny-v1", 1024, 2)])
def test_matches_a_numpy_forward_pass(tiny_checkpoints, converted, text, model, n_ctx, chunks):
    """tiny-v1: LLaMA-1 (2 shards, fp16); tiny-v2: grouped-query attention, bf16; windows of 1024
    are decoded in two batches of 512 into one cache (as llama-imatrix's micro-batches)."""
    path = converted(model, "f32")
    tokens = _tokens(path, text)
    ref, n_tokens = _reference(tiny_checkpoints / model, tokens, tokens[0], n_ctx, chunks)

    r = compute_imatrix(path, text, dataset="heldout.txt", n_ctx=n_ctx, chunks=chunks, process_output=True,
                        n_gpu_layers=0, threads=2)
    imx = r.imatrix
    assert set(imx.entries) == set(ref)  # every blk.* matmul weight and output.weight, nothing else
    assert (r.chunks, imx.chunk_count, imx.chunk_size, imx.datasets) == (chunks, chunks, n_ctx, ["heldout.txt"])
    worst = {}
    for name, want in ref.items():
        e = imx.entries[name]
        assert e.counts.tolist() == [n_tokens], name
        got = e.sums.reshape(-1).astype(np.float64)
        assert got.shape == want.shape, name
        worst[name] = float(np.max(np.abs(got - want) / (np.abs(want) + 1e-3 * want.mean())))
    # llama.cpp keeps K and V in f16: below 1e-3 measured (6e-4 worst, 6e-5 median)
    assert max(worst.values()) < 5e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert np.median(list(worst.values())) < 1e-3


def test_output_weight_only_when_asked(converted, text):
    r = compute_imatrix(converted("tiny-v1", "f32"), text, dataset="t", n_ctx=N_CTX, chunks=2, n_gpu_layers=0)
    names = set(r.imatrix.entries)
    assert "output.weight" not in names and "token_embd.weight" not in names
    assert len(names) == 4 * 7 and all(n.startswith("blk.") for n in names)
    assert r.ppl > 1 and r.tokens == 2 * N_CTX


def test_ctrl_c_keeps_only_complete_windows(converted, text, monkeypatch):
    """Ctrl-C inside llama_decode arrives in the eval callback (Python): it must surface after the
    decode as Interrupted, with the windows completed before it and nothing of the cut one."""
    from llamalocal import imatrix as mod

    calls = {"n": 0}
    take = mod._Collector.take
    per_window = 4 * 7  # matmuls per window of the 4-layer model

    def interrupting_take(self, name, x, src1):
        calls["n"] += 1
        if calls["n"] == 2 * per_window + 5:  # inside the third window
            raise KeyboardInterrupt
        take(self, name, x, src1)

    monkeypatch.setattr(mod._Collector, "take", interrupting_take)
    with pytest.raises(Interrupted) as e:
        compute_imatrix(converted("tiny-v1", "f32"), text, dataset="t", n_ctx=N_CTX, chunks=5, n_gpu_layers=0)
    partial = e.value.partial
    assert partial is not None and partial.chunks == 2
    assert {int(x.counts[0]) for x in partial.imatrix.entries.values()} == {2 * N_CTX}
    monkeypatch.setattr(mod._Collector, "take", take)
    full = compute_imatrix(converted("tiny-v1", "f32"), text, dataset="t", n_ctx=N_CTX, chunks=2, n_gpu_layers=0)
    for name, entry in full.imatrix.entries.items():  # the same two windows, the same sums
        np.testing.assert_allclose(partial.imatrix.entries[name].sums, entry.sums, rtol=1e-6)


def test_interrupt_in_the_first_window_has_nothing_to_keep(converted, text, monkeypatch):
    from llamalocal import imatrix as mod

    def stop(*_a):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod._Collector, "take", stop)
    with pytest.raises(Interrupted) as e:
        compute_imatrix(converted("tiny-v1", "f32"), text, dataset="t", n_ctx=N_CTX, chunks=2, n_gpu_layers=0)
    assert e.value.partial is None


def test_an_error_in_the_callback_is_raised_after_the_decode(converted, text, monkeypatch):
    from llamalocal import imatrix as mod

    def broken(*_a):
        raise LlamalocalError("boom")

    monkeypatch.setattr(mod._Collector, "take", broken)
    with pytest.raises(LlamalocalError, match="boom"):
        compute_imatrix(converted("tiny-v1", "f32"), text, dataset="t", n_ctx=N_CTX, chunks=1, n_gpu_layers=0)


def test_text_shorter_than_two_windows(converted):
    with pytest.raises(BadInputError, match="needs at least 1024") as e:
        compute_imatrix(converted("tiny-v1", "f32"), "Too short a text.", dataset="t", n_ctx=512, n_gpu_layers=0)
    assert e.value.exit_code == 2


def test_written_file_reads_back(converted, text, tmp_path):
    from llamalocal.convert.imatrix_file import write_imatrix

    r = compute_imatrix(converted("tiny-v2", "f16"), text, dataset="calib.txt", n_ctx=N_CTX, chunks=2, n_gpu_layers=0)
    for name in ("m.gguf", "m.dat"):
        back = read_imatrix(write_imatrix(tmp_path / name, r.imatrix))
        assert set(back.entries) == set(r.imatrix.entries) and back.datasets == ["calib.txt"]
        assert back.chunk_count == 2
        for k in back.entries:
            np.testing.assert_allclose(back.importance(k), r.imatrix.importance(k), rtol=1e-6)
