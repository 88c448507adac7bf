"""convert.families against Meta's own model registry (llama-models' sku_list: every model's
params.json arguments, context length and shard count), and the reference models built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalocal.convert import families
from llamalocal.convert.families import FAMILIES, PUBLISHED, SPM, TIKTOKEN, check_supported, detect
from llamalocal.convert.params import ModelParams
from llamalocal.errors import BadInputError

sku_list = pytest.importorskip("llama_models.sku_list", reason="Meta's model registry is in llama-models")


def _skus():
    """Meta's Llama-3.x text models (its Llama-2 entries carry Llama-3's arguments, so are skipped)."""
    out = {}
    for m in sku_list.all_registered_models():
        name = m.descriptor()
        if name.startswith(("Llama3", "Llama-3")) and m.arch_args:
            out[name] = m
    return out


SKUS = _skus()


def _params(args: dict) -> ModelParams:
    known = {k: v for k, v in args.items() if k in ModelParams.__dataclass_fields__ and k != "extra"}
    return ModelParams(**known, extra={k: v for k, v in args.items() if k not in known})


def _folder(descriptor: str) -> Path:
    return Path("/models") / descriptor.replace(":", "-")


def test_the_registry_has_every_size():
    assert {"Llama3.2-1B", "Llama3.2-3B", "Llama3.1-8B", "Llama3.1-70B", "Llama3.1-405B", "Llama3.3-70B-Instruct",
            "Llama-3-8B", "Llama3.1-405B:bf16-mp16"} <= set(SKUS)


@pytest.mark.parametrize("descriptor", sorted(SKUS))
def test_family_and_context_of_every_meta_sku(descriptor):
    m = SKUS[descriptor]
    args = m.arch_args
    if "vision_chunk_size" in args or "quantization_args" in args:
        with pytest.raises(BadInputError, match="vision model|pre-quantized"):
            check_supported(args, _folder(descriptor))
        return
    check_supported(args, _folder(descriptor))
    fam = detect(_params(args), TIKTOKEN, _folder(descriptor))
    assert fam.n_ctx == m.max_seq_length
    # "Llama3.1-8B" -> Llama-3.1; "Llama-3-8B" (3.0) -> Llama-3
    version = descriptor.split("-")[0].removeprefix("Llama") or "3"
    assert fam.label == f"Llama-{version}"
    if version == "3.2":
        assert fam.rope_scaling_factor == 32 and fam.tied_output
    elif fam.key != "llama-3":
        assert fam.rope_scaling_factor == 8
    # the 405B MP16 download: one KV head per shard, which is when Meta copies them
    if args["n_kv_heads"] > 8:
        assert args["n_kv_heads"] == m.pth_file_count


@pytest.mark.parametrize("descriptor", ["Llama3.2-1B", "Llama3.2-3B-Instruct", "Llama3.1-8B", "Llama3.1-70B-Instruct"])
def test_3_2_is_recognised_by_its_shapes_alone(descriptor):
    fam = detect(_params(SKUS[descriptor].arch_args), TIKTOKEN, Path("/models/my-model"))
    assert fam.key == ("llama-3.2" if descriptor.startswith("Llama3.2") else "llama-3.1")


def test_published_params_are_metas():
    pairs = {"Llama-3.2 1B": "Llama3.2-1B", "Llama-3.2 3B": "Llama3.2-3B", "Llama-3.1 8B": "Llama3.1-8B",
             "Llama-3.1 70B": "Llama3.1-70B", "Llama-3.1 405B": "Llama3.1-405B"}
    for label, descriptor in pairs.items():
        assert PUBLISHED[label].params == _params(SKUS[descriptor].arch_args), label
        assert PUBLISHED[label].family.n_ctx == SKUS[descriptor].max_seq_length


# Parameter counts Meta / Hugging Face publish for these models (safetensors metadata), and the
# LLaMA-1 7B / Llama-2 70B figures of their papers' code.
@pytest.mark.parametrize("label,n_params", [
    ("Llama-3.2 1B", 1_235_814_400), ("Llama-3.2 3B", 3_212_749_824), ("Llama-3.1 8B", 8_030_261_248),
    ("Llama-3.1 70B", 70_553_706_496), ("Llama-3.1 405B", 405_853_388_800), ("LLaMA 7B", 6_738_415_616),
    ("Llama-2 70B", 68_976_648_192),
])
def test_reference_parameter_counts(label, n_params):
    from llamalocal.model_desc import reference_model

    assert reference_model(label, "f16").n_params == n_params


# Sizes of published llama.cpp conversions (bartowski's Llama-3.x GGUFs, in GB of 1e9 bytes).
@pytest.mark.parametrize("label,quant,gb", [
    ("Llama-3.2 1B", "f16", 2.48), ("Llama-3.2 1B", "q8_0", 1.32), ("Llama-3.2 3B", "f16", 6.43),
    ("Llama-3.2 3B", "q8_0", 3.42), ("Llama-3.1 8B", "f16", 16.07), ("Llama-3.1 8B", "q8_0", 8.54),
])
def test_reference_file_sizes_match_published_ggufs(label, quant, gb):
    from llamalocal.model_desc import reference_file_bytes, reference_model

    assert reference_file_bytes(reference_model(label, quant)) / 1e9 == pytest.approx(gb, rel=0.01)


def test_tied_reference_and_long_context_kv():
    from llamalocal import planner
    from llamalocal.model_desc import reference_model

    d = reference_model("Llama-3.2 1B", "q4_0")
    assert d.output_type == d.token_embd_type == "q6_k"  # the output's type (llama-quantize's tied rule)
    assert d.n_ctx_train == 131072 and d.n_head_kv == 8 and d.n_vocab == 128256
    d8 = reference_model("Llama-3.1 8B", "q4_0")
    assert d8.output_type == "q6_k" and d8.token_embd_type == "q4_0"
    # the figure: 128k tokens of f16 KV for 8B is 16 GiB
    assert planner.kv_bytes_per_layer(d8, 131072, "f16") * d8.n_layers == 16 * 2**30
    assert planner.default_ctx(d8) == 4096


def test_reference_names():
    from llamalocal.model_desc import reference_model

    assert reference_model("70B", "q4_0").name == "Llama-2 70B q4_0"
    assert reference_model("llama-3.1 8b", "q4_0").name == "Llama-3.1 8B q4_0"
    with pytest.raises(BadInputError, match="Llama-3.1 405B"):
        reference_model("8B", "q4_0")


# ---------------------------------------------------------------------------------------------
# detection from params.json, tokenizer kind and folder
# ---------------------------------------------------------------------------------------------

def test_sentencepiece_families():
    assert detect(ModelParams(dim=64, n_layers=1, n_heads=2, norm_eps=1e-6), SPM, Path("7B")).key == "llama-1"
    assert detect(ModelParams(dim=64, n_layers=1, n_heads=2), SPM, Path("llama-2-7b")).key == "llama-2"
    assert detect(ModelParams(dim=64, n_layers=1, n_heads=2, rope_theta=1e6), SPM, Path("CodeLlama-7b")).key \
        == "code-llama"


@pytest.mark.parametrize("folder,key", [
    ("Llama3.1-8B-Instruct", "llama-3.1"), ("Meta-Llama-3.1-8B/original", "llama-3.1"),
    ("Llama-3.2-1B", "llama-3.2"), ("Llama3.3-70B-Instruct", "llama-3.3"), ("weights", "llama-3.1"),
])
def test_llama3_versions_by_folder(folder, key):
    p = PUBLISHED["Llama-3.1 8B"].params
    assert detect(p, TIKTOKEN, Path("/m") / folder).key == key


def test_mismatched_tokenizer_is_refused():
    with pytest.raises(BadInputError, match="sentencepiece"):
        detect(PUBLISHED["Llama-3.1 8B"].params, SPM, Path("Llama3.1-8B"))
    with pytest.raises(BadInputError, match="tiktoken"):
        detect(PUBLISHED["LLaMA 7B"].params, TIKTOKEN, Path("7B"))


@pytest.mark.parametrize("folder,name,instruct", [
    ("Llama3.1-8B-Instruct", "Llama3.1-8B-Instruct", True), ("Meta-Llama-3.1-8B-Instruct/original",
                                                             "Meta-Llama-3.1-8B-Instruct", True),
    ("llama-2-7b-chat", "llama-2-7b-chat", True), ("CodeLlama-7b-Instruct", "CodeLlama-7b-Instruct", True),
    ("Llama3.2-1B", "Llama3.2-1B", False), ("13B", "13B", False), ("chatterbox-7b", "chatterbox-7b", False),
])
def test_names_and_instruct(tmp_path, folder, name, instruct):
    d = tmp_path / folder
    d.mkdir(parents=True)
    assert families.model_name(d) == name
    assert families.is_instruct(d) is instruct


def test_every_family_names_every_tensor():
    for fam in FAMILIES.values():
        for n in families.meta_names(2):
            gguf_name, _ = fam.lookup(n)
            assert gguf_name.endswith(".weight")
        assert fam.lookup("layers.0.attention.wz.weight") is None
