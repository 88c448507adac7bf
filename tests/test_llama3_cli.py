"""Llama-3.x from the command line: metadata, the family summary, names under ~/.llama/checkpoints,
refusals (one line, exit 2, no file), and the measuring commands on a Llama-3 GGUF."""

from __future__ import annotations

import json
import shutil

import gguf
import gguf_header
import numpy as np
import pytest
from click.testing import CliRunner
from llama3_helpers import header_once, vocab_once  # noqa: F401  (autouse)

from llamalocal.cli import main
from llamalocal.convert import families
from llamalocal.convert.convert import convert
from llamalocal.convert.params import ModelParams
from llamalocal.convert.sample import TIED_SHARED, SampleSpec, build_sample


def llama3_params(scaled=True, **kw) -> ModelParams:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=families.LLAMA3_VOCAB, multiple_of=32,
                ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500_000.0, use_scaled_rope=scaled)
    return ModelParams(**(base | kw))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, llama3_tokenizer):
    """Llama3.1-tiny-Instruct: 2 bf16 shards in Meta's Llama-3 layout (a read-only template)."""
    root = tmp_path_factory.mktemp("l3")
    return build_sample(root, "Llama3.1-tiny-Instruct", SampleSpec(params=llama3_params(), n_shards=2, dtype="bf16"),
                        tokenizer=llama3_tokenizer)


@pytest.fixture
def model(llama3_dir, tmp_path):
    """A writable copy of llama3_dir."""
    d = tmp_path / "models" / llama3_dir.name
    shutil.copytree(llama3_dir, d)
    return d


@pytest.fixture(scope="module")
def q8(llama3_dir, tmp_path_factory):
    return convert(llama3_dir, "q8_0", tmp_path_factory.mktemp("q8") / "l3-q8_0.gguf").path


def run(*args, env=None):
    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return r.exit_code, r.output


def run_json(*args):
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def ggufs(folder):
    return sorted(p.name for p in folder.rglob("*") if ".gguf" in p.name)


def kv(header, key):
    return header.fields[key]


# ---------------------------------------------------------------------------------------------
# what the GGUF records
# ---------------------------------------------------------------------------------------------

def test_instruct_metadata_and_summary(model):
    code, out = run("convert", model, "--f16")
    assert code == 0, out
    assert "Model: Llama-3.1, context 131072, rope scaling factor 8 (Llama-3.1's)" in out
    assert "Warning" not in out  # checklist.chk lists tokenizer.model: nothing unverified
    r = gguf_header.read(model / "ggml-model-f16.gguf")
    assert kv(r, "general.name") == "Llama3.1-tiny-Instruct"
    assert kv(r, "llama.context_length") == 131072
    assert kv(r, "llama.rope.freq_base") == 500_000.0
    assert kv(r, "llama.attention.head_count_kv") == 2
    assert kv(r, "tokenizer.ggml.model") == "gpt2" and kv(r, "tokenizer.ggml.pre") == "llama-bpe"
    assert kv(r, "tokenizer.ggml.bos_token_id") == 128000
    assert kv(r, "tokenizer.ggml.eos_token_id") == 128009  # <|eot_id|>: an instruct model's end of turn
    assert "<|start_header_id|>" in kv(r, "tokenizer.chat_template")
    assert r.tensors["rope_freqs.weight"].ggml_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(r.f32("rope_freqs.weight"), families.rope_freq_factors(16, 500_000.0, 8))


def test_base_model_and_llama3_0_context(tmp_path, llama3_tokenizer):
    d = build_sample(tmp_path, "Meta-Llama-3-tiny", SampleSpec(params=llama3_params(scaled=False)),
                     tokenizer=llama3_tokenizer)
    code, out = run("convert", d, "--q8_0")
    assert code == 0, out
    assert "Model: Llama-3, context 8192" in out and "rope scaling" not in out
    r = gguf_header.read(d / "ggml-model-q8_0.gguf")
    assert kv(r, "llama.context_length") == 8192
    assert kv(r, "tokenizer.ggml.eos_token_id") == 128001  # <|end_of_text|>
    assert "tokenizer.chat_template" not in r.fields
    assert "rope_freqs.weight" not in r.tensors


def test_rope_scaling_factor_override_and_32_for_llama3_2(tmp_path, llama3_tokenizer):
    d = build_sample(tmp_path, "Llama3.2-tiny", SampleSpec(params=llama3_params(), tie_output=TIED_SHARED),
                     tokenizer=llama3_tokenizer)
    code, out = run("convert", d, "--f32", "-o", tmp_path / "a.gguf")
    assert code == 0, out
    assert "rope scaling factor 32 (Llama-3.2's)" in out and "output tied to the embeddings" in out
    code, out = run("convert", d, "--f32", "-o", tmp_path / "b.gguf", "--rope-scaling-factor", "16")
    assert code == 0, out
    assert "rope scaling factor 16 (--rope-scaling-factor)" in out
    for name, factor in (("a.gguf", 32), ("b.gguf", 16)):
        r = gguf_header.read(tmp_path / name)
        np.testing.assert_array_equal(r.f32("rope_freqs.weight"), families.rope_freq_factors(16, 500_000.0, factor))
        assert "output.weight" not in r.tensors


def test_huggingface_original_folder_without_checklist(tmp_path, llama3_dir):
    """Every meta-llama repository carries Meta's files under original/, without checklist.chk."""
    d = tmp_path / "Meta-Llama-3.1-8B" / "original"
    shutil.copytree(llama3_dir, d)
    (d / "checklist.chk").unlink()
    code, out = run("convert", d, "--q8_0")
    assert code == 0, out
    assert out.count("Warning") == 1 and "no checklist.chk" in out
    r = gguf_header.read(d / "ggml-model-q8_0.gguf")
    assert kv(r, "general.name") == "Meta-Llama-3.1-8B"
    assert kv(r, "tokenizer.ggml.eos_token_id") == 128001  # not an instruct model


def test_names_under_meta_checkpoints(tmp_path, llama3_dir):
    """`llama model download` puts models in ~/.llama/checkpoints; names are found there after
    --models-dir / $LLAMALOCAL_MODELS, and chat/plan find the converted file there too."""
    home = tmp_path / "home"
    shutil.copytree(llama3_dir, home / ".llama" / "checkpoints" / llama3_dir.name)
    empty = tmp_path / "models"
    empty.mkdir()
    env = {"HOME": str(home), "LLAMALOCAL_MODELS": str(empty)}
    code, out = run("convert", llama3_dir.name, "--q8_0", "--quiet", env=env)
    assert code == 0, out
    assert ggufs(home) == ["ggml-model-q8_0.gguf"]
    # the models directory still comes first
    shutil.copytree(llama3_dir, empty / llama3_dir.name)
    code, out = run("convert", llama3_dir.name, "--q8_0", "--quiet", env=env)
    assert code == 0, out
    assert ggufs(empty) == ["ggml-model-q8_0.gguf"]


def test_checklist_covers_the_tokenizer(model):
    tok = model / "tokenizer.model"
    data = bytearray(tok.read_bytes())
    data[-3] = ord("A") if data[-3] != ord("A") else ord("B")  # a rank changes: still a valid file
    tok.write_bytes(bytes(data))
    _expect_bad(model, "tokenizer.model")


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit 2, no file
# ---------------------------------------------------------------------------------------------

def _expect_bad(model, needle, *extra):
    code, out = run("convert", model, "--q4_0", "--quiet", *extra)
    assert code == 2, out
    assert needle in out, out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out
    assert ggufs(model.parent) == []


def _edit_params(model, **changes):
    params = json.loads((model / "params.json").read_text())
    params.update(changes)
    (model / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("changes,needle", [
    ({"moe_args": {"num_experts": 16, "top_k": 1}}, "Llama-4"),
    ({"vision_chunk_size": 560, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 8}, "vision model"),
    ({"quantization_args": {"scheme": "int4_weight_int8_dynamic_activation", "group_size": 32}}, "pre-quantized"),
    ({"lora_args": {"rank": 16, "scale": 2.0}}, "pre-quantized"),
    ({"vocab_size": 128000}, "vocab_size 128000"),
])
def test_not_a_plain_llama3_text_model(model, changes, needle):
    _edit_params(model, **changes)
    _expect_bad(model, needle, "--no-verify")


def test_fp8_405b_download(model):
    (model / "fp8_scales_0.pt").write_bytes(b"\0" * 64)
    _expect_bad(model, "FP8", "--no-verify")


def test_cross_attention_layers(model):
    from llamalocal.convert.checkpoint import open_checkpoint
    from llamalocal.convert.torch_save import save_state_dict

    for f in sorted(model.glob("consolidated.*.pth")):
        with open_checkpoint(f) as ck:
            sd = {n: ck.rows(n) for n in ck.tensors}
        sd["cross_attention_layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"]
        save_state_dict(f, sd, dtype="bf16")
    _expect_bad(model, "cross-attention", "--no-verify")


def test_llama3_params_with_a_sentencepiece_tokenizer(model, tiny_checkpoints):
    shutil.copy(tiny_checkpoints / "tokenizer.model", model / "tokenizer.model")
    _expect_bad(model, "sentencepiece", "--no-verify")


def test_llama2_params_with_the_tiktoken_tokenizer(tiny_checkpoints, tmp_path, llama3_tokenizer):
    d = tmp_path / "models" / "tiny-v2"
    shutil.copytree(tiny_checkpoints / "tiny-v2", d)
    shutil.copy(llama3_tokenizer, d / "tokenizer.model")
    _expect_bad(d, "tiktoken (Llama-3)", "--no-verify")


def test_shards_of_mixed_families(model, tmp_path):
    """consolidated.01 from a Llama-2 checkpoint of the same dims (embedding split the other way)."""
    p = ModelParams(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3)
    other = build_sample(tmp_path / "l2", "llama-2-tiny", SampleSpec(params=p, n_shards=2, vocab_size=400))
    shutil.copy(other / "consolidated.01.pth", model / "consolidated.01.pth")
    _expect_bad(model, "same model", "--no-verify")


@pytest.mark.parametrize("folder", ["llama-2-tiny", "Meta-Llama-3-tiny"])
def test_rope_scaling_factor_needs_scaled_rope(tmp_path, folder, llama3_tokenizer):
    if folder.startswith("llama-2"):
        p = ModelParams(dim=64, n_layers=1, n_heads=4, multiple_of=32)
        d = build_sample(tmp_path, folder, SampleSpec(params=p, vocab_size=400))
    else:
        d = build_sample(tmp_path, folder, SampleSpec(params=llama3_params(scaled=False)), tokenizer=llama3_tokenizer)
    _expect_bad(d, "--rope-scaling-factor applies", "--no-verify", "--rope-scaling-factor", "8")


# ---------------------------------------------------------------------------------------------
# the other commands on a Llama-3 GGUF
# ---------------------------------------------------------------------------------------------

def test_info_and_list(q8):
    info = run_json("info", q8)
    assert (info["n_vocab"], info["n_ctx_train"], info["n_head_kv"], info["file_type"]) == (128256, 131072, 2, "q8_0")
    assert info["plan"]["n_ctx"] == 4096  # the runner's default context stays capped
    listed = run_json("list", "--models-dir", q8.parent)
    assert q8.name in json.dumps(listed)


def test_plan_shows_what_a_long_context_costs(q8):
    j = run_json("plan", q8, "--ctx", "131072")
    kv_bytes = sum(d["kv_bytes"] for d in j["devices"])
    assert j["n_ctx"] == 131072
    assert kv_bytes == 2 * 131072 * 2 * 16 * 2 * 2  # K+V x ctx x kv heads x head_dim x f16 x layers


def test_bench_perplexity_compare(q8, llama3_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    b = run_json("bench", q8, "-p", "16", "-n", "4", "-r", "1", "--bandwidth-mib", "0", "--threads", "1", "-ngl", "0")
    assert b["tg"]["n_tokens"] == 4
    assert run_json("perplexity", q8, "-f", text, "--ctx", "64", "--chunks", "2", "-ngl", "0")["ppl"] > 1
    f32 = convert(llama3_dir, "f32", tmp_path / "l3-f32.gguf").path
    rows = run_json("compare", f32, q8, "-f", text, "--ctx", "64", "--chunks", "2", "-ngl", "0", "--tg-tokens", "2")["rows"]
    assert [r["is_base"] for r in rows] == [True, False] and rows[1]["top1"] > 0.5
