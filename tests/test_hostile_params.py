"""Hostile checkpoints, class "params.json": values of the wrong type or range, NaN, deep or huge
JSON. params.json is checked against a schema (convert.params.SCHEMA) before anything is derived
from it, so each is one line, exit 2 — and Meta's real params.json files, Llama-3 included, pass."""

from __future__ import annotations

import json
from dataclasses import fields

import hostile
import pytest
from hostile import assert_refused, run_convert

from llamalocal.convert.errors import BadInputError
from llamalocal.convert.params import SCHEMA, ModelParams, load_params, validate

base_model, model = hostile.base_model, hostile.model  # fixtures

BASE = {"dim": 64, "n_layers": 2, "n_heads": 2, "multiple_of": 32, "norm_eps": 1e-6, "vocab_size": -1}


def write_params(folder, text: str | bytes) -> None:
    (folder / "params.json").write_bytes(text.encode() if isinstance(text, str) else text)


def with_(**changes) -> str:
    return json.dumps({**BASE, **changes}, allow_nan=True)


# ---------------------------------------------------------------------------------------------
# Through the CLI, in a limited child: the examples
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    (with_(n_layers=10**7), "n_layers is 10000000"),  # the expected-shape table would take 8.9 GB
    (with_(dim=2**30, ffn_dim_multiplier="1"), "is 1073741824"),  # str x int, after 2.8 GB
    (with_(norm_eps=float("nan")), "norm_eps is NaN"),
    (with_(ffn_dim_multiplier=1e-9), "FFN width of 0"),  # hidden_dim 0: a ZeroDivisionError later
    ("[" * 200_000 + "]" * 200_000, "nests JSON too deeply"),
    ('{"dim": 1' + "0" * 5000 + "}", "not valid JSON"),
])
def test_cli_refuses(model, text, needle):
    write_params(model, text)
    assert_refused(run_convert(model), "params.json", needle, clean=(model.parent,), max_seconds=10)


# ---------------------------------------------------------------------------------------------
# The schema, key by key (in-process: load_params raises the BadInputError the CLI prints)
# ---------------------------------------------------------------------------------------------

BAD = [
    ("dim", "4096"), ("dim", 64.0), ("dim", True), ("dim", None), ("dim", 0), ("dim", -64), ("dim", 2**19),
    ("dim", [64]), ("n_layers", 0), ("n_layers", 2049), ("n_layers", "2"), ("n_heads", 0), ("n_heads", 3),
    ("n_kv_heads", 0), ("n_kv_heads", 4), ("n_kv_heads", "1"), ("vocab_size", "32000"), ("vocab_size", -2),
    ("vocab_size", 2**25), ("vocab_size", 1.5), ("multiple_of", 0), ("multiple_of", "256"),
    ("norm_eps", "1e-5"), ("norm_eps", float("inf")), ("norm_eps", -1e-5), ("norm_eps", 0), ("norm_eps", 2),
    ("norm_eps", None), ("rope_theta", "10000"), ("rope_theta", float("-inf")), ("rope_theta", 0),
    ("rope_theta", 1e300), ("ffn_dim_multiplier", "1.3"), ("ffn_dim_multiplier", 0), ("ffn_dim_multiplier", -1),
    ("ffn_dim_multiplier", float("nan")), ("ffn_dim_multiplier", {"x": 1}), ("ffn_dim_multiplier", 10**400),
    ("rope_theta", 10**400), ("norm_eps", -(10**400)), ("use_scaled_rope", "yes"),
    ("use_scaled_rope", 1),
]


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_schema_refuses(tmp_path, key, value):
    write_params(tmp_path, with_(**{key: value}))
    with pytest.raises(BadInputError) as e:
        load_params(tmp_path)
    message = str(e.value)
    assert "params.json" in message
    assert key in message or "fit together" in message, message
    assert len(message) < 400 and "\n" not in message


@pytest.mark.parametrize("text, needle", [
    ("[1, 2]", "JSON object"),
    ('"dim"', "JSON object"),
    (b'{"dim": "\xff\xfe"}', "not UTF-8"),
    ("{" + " " * (2 << 20) + "}", "far smaller"),
    (json.dumps({"n_layers": 2, "n_heads": 2}), "lacks dim"),
    (json.dumps({**BASE, "dim": "x" * 100_000}), "..."),  # a long value is shown cut
])
def test_file_level_refusals(tmp_path, text, needle):
    write_params(tmp_path, text)
    with pytest.raises(BadInputError, match=None) as e:
        load_params(tmp_path)
    assert needle in str(e.value) and len(str(e.value)) < 400


def test_unknown_keys_are_tolerated(tmp_path):
    write_params(tmp_path, with_(max_seq_len=2048, max_batch_size=32, a_key_from_the_future=[{"x": None}]))
    assert load_params(tmp_path).dim == 64


def test_every_field_of_model_params_is_in_the_schema():
    """A field added to ModelParams without a schema row would reach the converter unchecked
    (`extra` holds the keys not modelled, which convert.families reads only to refuse them)."""
    assert {f.name for f in fields(ModelParams)} - {"extra"} <= set(SCHEMA)


# Meta's own params.json files (as published with each download) and the FFN width Hugging Face's
# config for the same model gives (intermediate_size): the schema accepts them all.
META = {
    "llama-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                  "vocab_size": -1}, 11008),
    "llama-65b": ({"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-05,
                   "vocab_size": -1}, 22016),
    "llama-2-70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                     "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 28672),
    "codellama-34b": ({"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
                       "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 1000000},
                      22016),
    "llama-3.1-8b": ({"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                      "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "vocab_size": 128256}, 14336),
    "llama-3.1-405b": ({"dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "n_heads": 128,
                        "n_kv_heads": 8, "n_layers": 126, "norm_eps": 1e-05, "rope_theta": 500000.0,
                        "use_scaled_rope": True, "vocab_size": 128256}, 53248),
    "llama-3.2-1b": ({"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
                      "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "vocab_size": 128256}, 8192),
}


@pytest.mark.parametrize("name", list(META))
def test_real_params_pass_the_schema(tmp_path, name):
    raw, ffn = META[name]
    validate(raw, tmp_path / "params.json")
    known = {f.name for f in fields(ModelParams)} - {"extra"}
    assert ModelParams(**{k: v for k, v in raw.items() if k in known}).hidden_dim == ffn
