"""`convert --imatrix` against llama.cpp's `llama_model_quantize` given the same importance, the
imatrix-only presets, and bad imatrix input (one line, exit 2, no file).

The peer: our f32 GGUF of the same checkpoint (lossless for its fp16/bf16 weights) quantized by
llama.cpp with the importance llama-quantize derives from the file (sum / count per column). Ours:
the Meta checkpoint converted straight to the preset with the file. Same tensor types and the
very same bytes, so the same perplexity. (The bench script repeats this with the real
llama-quantize binary reading the file itself.)
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the model and llama.cpp's quantizer")

import gguf  # noqa: E402

from llamalocal.cli import main  # noqa: E402
from llamalocal.convert import native  # noqa: E402
from llamalocal.convert.convert import convert  # noqa: E402
from llamalocal.convert.imatrix_file import read_imatrix, write_imatrix  # noqa: E402
from llamalocal.convert.presets import PRESETS  # noqa: E402
from llamalocal.errors import BadInputError  # noqa: E402
from llamalocal.imatrix import compute_imatrix  # noqa: E402


@pytest.fixture(scope="module")
def imatrices(converted, heldout_text, tmp_path_factory):
    """imatrices(model) -> an imatrix file of that tiny model (GGUF), computed by llamalocal."""
    d = tmp_path_factory.mktemp("imatrix")
    cache = {}

    def get(model: str = "tiny-v1"):
        if model not in cache:
            r = compute_imatrix(converted(model, "f16"), heldout_text[:30000], dataset="heldout.txt", n_ctx=128,
                                chunks=8, n_gpu_layers=0)
            cache[model] = write_imatrix(d / f"{model}.imatrix.gguf", r.imatrix)
        return cache[model]

    return get


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


# every preset's bytes with an imatrix are checked tensor by tensor in test_presets; here, that the
# stream hands each tensor of a real checkpoint its own entry of a file: a k-quant mix, an
# imatrix-only IQ type, and an IQ preset whose choices change with an imatrix (on the GQA model)
@pytest.mark.slow
@pytest.mark.parametrize("model,preset", [("tiny-v1", "q2_k"), ("tiny-v1", "q4_k_m"), ("tiny-v1", "iq2_xs"),
                                          ("tiny-v2", "iq3_xxs")])
def test_same_file_as_llama_quantize_with_the_imatrix(tiny_checkpoints, converted, imatrices, tmp_path, model, preset):
    imx_path = imatrices(model)
    imx = read_imatrix(imx_path)
    ours = convert(tiny_checkpoints / model, preset, tmp_path / "ours.gguf", imatrix=imx_path)
    peer = tmp_path / "peer.gguf"
    native.model_quantize(converted(model, "f32"), peer, int(PRESETS[preset].ftype), nthread=2,
                          imatrix={name: imx.importance(name) for name in imx.entries})
    a, b = _tensors(ours.path), _tensors(peer)
    assert set(a) == set(b)  # llama-quantize writes them in its own order
    for name, t in b.items():
        assert a[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    assert ours.imatrix_entries == len(imx.entries)

    # what llama-quantize records (tools/quantize/quantize.cpp)
    f = gguf.GGUFReader(str(ours.path)).fields
    assert f["quantize.imatrix.file"].contents() == str(imx_path)
    assert f["quantize.imatrix.dataset"].contents() == "heldout.txt"
    assert f["quantize.imatrix.entries_count"].contents() == len(imx.entries)
    assert f["quantize.imatrix.chunks_count"].contents() == imx.chunk_count
    assert f["quantize.imatrix.entries_count"].types == [gguf.GGUFValueType.UINT32]


@pytest.mark.slow
def test_a_legacy_dat_imatrix_gives_the_same_file(tiny_checkpoints, imatrices, tmp_path):
    imx = read_imatrix(imatrices("tiny-v1"))
    dat = write_imatrix(tmp_path / "m.dat", imx)
    a = convert(tiny_checkpoints / "tiny-v1", "q3_k_m", tmp_path / "a.gguf", imatrix=imatrices("tiny-v1")).path
    b = convert(tiny_checkpoints / "tiny-v1", "q3_k_m", tmp_path / "b.gguf", imatrix=dat).path
    ta, tb = _tensors(a), _tensors(b)
    for name in ta:  # means through ncall: equal to float rounding, so near-identical bytes
        assert ta[name].tensor_type == tb[name].tensor_type
    same = sum(np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8))
               for n in ta)
    assert same >= len(ta) - 3


def test_the_imatrix_changes_the_quantization(tiny_checkpoints, imatrices, tmp_path):
    plain = convert(tiny_checkpoints / "tiny-v1", "q2_k", tmp_path / "plain.gguf").path
    calibrated = convert(tiny_checkpoints / "tiny-v1", "q2_k", tmp_path / "cal.gguf", imatrix=imatrices()).path
    a, b = _tensors(plain), _tensors(calibrated)
    assert not np.array_equal(np.asarray(a["blk.0.attn_q.weight"].data), np.asarray(b["blk.0.attn_q.weight"].data))
    assert "quantize.imatrix.file" not in gguf.GGUFReader(str(plain)).fields


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit 2, no file


def _no_file(folder):
    return [p.name for p in folder.iterdir() if ".gguf" in p.name and "imatrix" not in p.name] == []


@pytest.mark.parametrize("preset", [p.name for p in PRESETS.values() if p.needs_imatrix])
def test_imatrix_only_presets_are_refused_before_any_work(tiny_checkpoints, tmp_path, monkeypatch, preset):
    import llamalocal.convert.convert as cc

    def never(*_a, **_k):
        raise AssertionError("a shard was opened")

    monkeypatch.setattr(cc, "open_checkpoint", never)
    code, out = run("convert", tiny_checkpoints / "tiny-v1", f"--{preset}", "-o", tmp_path / "x.gguf")
    assert code == 2, out
    assert out.count("\n") == 1 and out.startswith("Error:") and "llamalocal imatrix" in out, out
    assert "Traceback" not in out and _no_file(tmp_path)


def test_imatrix_from_another_model(tiny_checkpoints, imatrices, tmp_path):
    code, out = run("convert", tiny_checkpoints / "tiny-v1", "--q4_k_m", "--imatrix", imatrices("tiny-v2"),
                    "-o", tmp_path / "x.gguf")
    assert code == 2 and out.count("\n") == 1, out
    assert "not for this model" in out and "llamalocal imatrix" in out
    assert _no_file(tmp_path)


def test_imatrix_of_a_model_with_other_layers(tiny_checkpoints, imatrices, tmp_path):
    imx = read_imatrix(imatrices("tiny-v1"))
    imx.entries["blk.9.attn_q.weight"] = imx.entries["blk.0.attn_q.weight"]
    bad = write_imatrix(tmp_path / "more-layers.imatrix.gguf", imx)
    with pytest.raises(BadInputError, match=r"blk\.9\.attn_q\.weight"):
        convert(tiny_checkpoints / "tiny-v1", "q4_k_m", tmp_path / "x.gguf", imatrix=bad)
    assert _no_file(tmp_path)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
@pytest.mark.parametrize("keep", [0.0, 0.02, 0.3, 0.97])
def test_truncated_imatrix_file(tiny_checkpoints, imatrices, tmp_path, fmt, keep):
    good = write_imatrix(tmp_path / f"good.imatrix.{fmt}", read_imatrix(imatrices("tiny-v1")))
    data = good.read_bytes()
    cut = tmp_path / f"cut.imatrix.{fmt}"
    cut.write_bytes(data[:int(len(data) * keep)])
    code, out = run("convert", tiny_checkpoints / "tiny-v1", "--q4_k_m", "--imatrix", cut, "-o", tmp_path / "x.gguf")
    assert code == 2 and out.count("\n") == 1 and "Traceback" not in out, out
    assert str(cut) in out
    assert _no_file(tmp_path)


def test_a_model_file_is_not_an_imatrix(tiny_checkpoints, converted, tmp_path):
    code, out = run("convert", tiny_checkpoints / "tiny-v1", "--q4_k_m", "--imatrix", converted("tiny-v1", "q8_0"),
                    "-o", tmp_path / "x.gguf")
    assert code == 2 and "not an imatrix" in out, out


def test_missing_imatrix_file(tiny_checkpoints, tmp_path):
    code, out = run("convert", tiny_checkpoints / "tiny-v1", "--q4_k_m", "--imatrix", tmp_path / "nope.gguf",
                    "-o", tmp_path / "x.gguf")
    assert code == 2 and "no imatrix file" in out, out


def test_imatrix_with_an_unquantized_preset(tiny_checkpoints, imatrices, tmp_path):
    code, out = run("convert", tiny_checkpoints / "tiny-v1", "--f16", "--imatrix", imatrices(), "-o",
                    tmp_path / "x.gguf")
    assert code == 2 and "quantized presets" in out, out


def test_an_imatrix_missing_a_needed_tensor(tiny_checkpoints, imatrices, tmp_path):
    imx = read_imatrix(imatrices("tiny-v1"))
    del imx.entries["blk.2.ffn_up.weight"]
    partial = write_imatrix(tmp_path / "partial.imatrix.gguf", imx)
    with pytest.raises(BadInputError, match=r"no entry for blk\.2\.ffn_up\.weight.*IQ2_XS"):
        convert(tiny_checkpoints / "tiny-v1", "iq2_xs", tmp_path / "x.gguf", imatrix=partial)
    # a preset that can do without: quantized anyway, with a warning (as llama-quantize does)
    r = convert(tiny_checkpoints / "tiny-v1", "q4_k_m", tmp_path / "y.gguf", imatrix=partial)
    assert any("no entry for 1 of 28" in w for w in r.warnings)
    assert r.imatrix_entries == 27
