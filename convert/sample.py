"""Sample checkpoints in Meta's download layout, built locally (no weights downloaded).

For users without Meta's weights (to try the whole pipeline), for tests and for benchmarks:
random weights with the right shapes, split into model-parallel shards the way Meta split them
(convert.families), written in torch's zip format without torch, with params.json, checklist.chk
and a sentencepiece tokenizer trained on text from Python's own standard library, or a given
tokenizer.model. Given Meta's Llama-3 tokenizer (tiktoken), the sample is laid out as Meta's
Llama-3 downloads are: tokenizer.model beside the shards and listed in checklist.chk, the
embedding split on the vocabulary, optionally the output tied to the embeddings (Llama-3.2 1B/3B)
or KV heads copied over more shards than there are heads (405B's MP16 download). The model talks
nonsense, but every file is exactly what a real download looks like.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from llamalocal.convert.checklist import md5_file
from llamalocal.convert.families import SPM, Family, detect, expected_shapes, meta_names
from llamalocal.convert.params import ModelParams
from llamalocal.convert.tokenizer import TOKENIZER_FILE, load_vocab
from llamalocal.convert.torch_save import save_state_dict

# SampleSpec.tie_output
UNTIED, TIED_SHARED, TIED_ABSENT = "untied", "shared", "absent"


@dataclass(frozen=True)
class SampleSpec:
    """A model to build. Defaults: a few-MB LLaMA-1-style model that converts in a second."""

    params: ModelParams = ModelParams(dim=256, n_layers=4, n_heads=4, vocab_size=-1, multiple_of=256,
                                      norm_eps=1e-6)
    n_shards: int = 1
    dtype: str = "f16"  # what the checkpoint stores: f16 (LLaMA-1/2), bf16, f32
    vocab_size: int = 512  # pieces of the trained tokenizer (ignored when a tokenizer is given)
    seed: int = 0
    rope_freqs: bool = True  # LLaMA-1 checkpoints carry rope.freqs, which converters skip (never in Llama-3)
    # output.weight: its own tensor, the same storage as tok_embeddings, or absent (Llama-3.2 1B/3B tie them)
    tie_output: str = UNTIED
    # each KV head in this many consecutive shards, params.json saying n_kv_heads x this (405B MP16)
    kv_replicas: int = 1
    weight_std: float = 0.02  # of the 2-D weights; larger makes attention (and so rope) matter in tests


_STAGE_BYTES = 64 * 1024 * 1024


def _corpus() -> list[str]:
    """Deterministic English-ish text from the standard library's own sources and docstrings."""
    import argparse
    import collections
    import json as json_mod
    import logging
    import pathlib
    import textwrap

    lines: list[str] = []
    for mod in (argparse, collections, json_mod, logging, pathlib, textwrap, inspect):
        lines += [ln.strip() for ln in inspect.getsource(mod).splitlines() if ln.strip()]
    return lines


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def train_tokenizer(vocab_size: int = 512) -> bytes:
    """A LLaMA-style sentencepiece BPE model (byte fallback, split digits, identity normalisation)."""
    import sentencepiece as spm

    out = io.BytesIO()
    with _quiet_stderr():  # the trainer logs every piece at C++ level, ignoring minloglevel
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus()), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
            character_coverage=0.995,  # rare characters fall back to bytes
            remove_extra_whitespaces=False,  # as LLaMA's tokenizer (llama.cpp never strips spaces)
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, max_sentence_length=100000,
        )
    return out.getvalue()


def _write_checklist(folder: Path, names: list[str], listing: str) -> None:
    (folder / listing).write_text("".join(f"{md5_file(folder / n)}  {n}\n" for n in names))


def _shard(meta_name: str, w: np.ndarray, n_shards: int, family: Family, kv_replicas: int = 1) -> list[np.ndarray]:
    split_dim = family.split_dim(meta_name)
    if split_dim is None or w.ndim == 1:
        return [w] * n_shards
    if kv_replicas > 1 and meta_name.endswith(("attention.wk.weight", "attention.wv.weight")):
        # Meta's reshard_mp: each head repeated, so consecutive shards hold the same one
        return [part for part in np.split(w, n_shards // kv_replicas, axis=0) for _ in range(kv_replicas)]
    return np.split(w, n_shards, axis=split_dim)


def random_weights(p: ModelParams, n_vocab: int, seed: int, std: float = 0.02):
    """(meta_name, float32 array) in Meta's order: small normal weights, norms near 1."""
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(p, n_vocab)
    for name in meta_names(p.n_layers):
        shape = shapes[name]
        if len(shape) == 1:
            yield name, (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
        else:
            yield name, rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def build_sample(target: Path, name: str = "sample", spec: SampleSpec = SampleSpec(),
                 tokenizer: Path | None = None) -> Path:
    """Write a checkpoint in Meta's layout and return TARGET/NAME.

    A sentencepiece tokenizer (trained, or `tokenizer`) goes where LLaMA-1/Llama-2 downloads put
    it: TARGET/tokenizer.model, TARGET/tokenizer_checklist.chk, TARGET/NAME/{consolidated.NN.pth,
    params.json, checklist.chk}. A tiktoken one (Llama-3) goes beside the shards:
    TARGET/NAME/{consolidated.NN.pth, params.json, tokenizer.model, checklist.chk}.
    """
    target = Path(target)
    model_dir = target / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = target / TOKENIZER_FILE
    tok.write_bytes(Path(tokenizer).read_bytes() if tokenizer else train_tokenizer(spec.vocab_size))
    vocab = load_vocab(tok)
    p = spec.params
    family = detect(p, vocab.kind, model_dir, tok)
    listed = []
    if family.tokenizer == SPM:
        _write_checklist(target, [TOKENIZER_FILE], "tokenizer_checklist.chk")
    else:
        tok = tok.rename(model_dir / TOKENIZER_FILE)
        listed.append(TOKENIZER_FILE)
    n_vocab = len(vocab)
    if spec.kv_replicas > 1 and p.kv_heads * spec.kv_replicas != spec.n_shards:
        raise ValueError(f"kv_replicas {spec.kv_replicas}: Meta copies KV heads so that each of the "
                         f"{spec.n_shards} shards holds one, which needs n_kv_heads = n_shards / kv_replicas")
    # Big samples (benchmarks with LLaMA-7B shapes) are staged in memory-mapped scratch files,
    # so building one needs page cache, not RAM.
    scratch = model_dir / ".scratch"
    scratch.mkdir(exist_ok=True)
    store = np.float16 if spec.dtype == "f16" else np.float32
    shards: list[dict[str, np.ndarray]] = [{} for _ in range(spec.n_shards)]
    try:
        for meta_name, w in random_weights(p, n_vocab, spec.seed, spec.weight_std):
            if meta_name == "output.weight" and spec.tie_output != UNTIED:
                if spec.tie_output == TIED_SHARED:  # the very tensor: one storage in each shard's pickle
                    for sd in shards:
                        sd[meta_name] = sd["tok_embeddings.weight"]
                continue
            if w.nbytes > _STAGE_BYTES:
                staged = np.lib.format.open_memmap(scratch / f"{meta_name}.npy", mode="w+", dtype=store, shape=w.shape)
                staged[...] = w
                w = staged
            for i, part in enumerate(_shard(meta_name, w, spec.n_shards, family, spec.kv_replicas)):
                # a tied piece gets a storage of its own (not a view of the whole), as in Meta's files
                tied = spec.tie_output == TIED_SHARED and meta_name == "tok_embeddings.weight"
                shards[i][meta_name] = np.ascontiguousarray(part) if tied else part
        if spec.rope_freqs and family.tokenizer == SPM:
            freqs = 1.0 / (10000.0 ** (np.arange(0, p.head_dim, 2, dtype=np.float32) / p.head_dim))
            for sd in shards:
                sd["rope.freqs"] = freqs
        files = []
        for i, sd in enumerate(shards):
            f = model_dir / f"consolidated.{i:02d}.pth"
            save_state_dict(f, sd, dtype=spec.dtype)
            files.append(f.name)
    finally:
        shards.clear()
        shutil.rmtree(scratch, ignore_errors=True)
    if spec.kv_replicas > 1:
        p = replace(p, n_kv_heads=p.kv_heads * spec.kv_replicas)
    params = {k: v for k, v in asdict(p).items() if v is not None and k != "extra"}
    if not p.use_scaled_rope:
        del params["use_scaled_rope"]  # as in LLaMA-1/Llama-2 and Llama-3.0 downloads
    (model_dir / "params.json").write_text(json.dumps(params))
    _write_checklist(model_dir, files + ["params.json"] + listed, "checklist.chk")
    return model_dir


def llama3_tokenizer_file(shared: Path | None = None) -> Path | None:
    """Meta's Llama-3 tokenizer.model, for building Llama-3 samples: `shared` (the team's fixtures)
    if it is there, else the identical copy llama-models ships; None when neither is."""
    if shared is not None and shared.is_file():
        return shared
    import importlib.util

    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    return bundled if bundled.is_file() else None
