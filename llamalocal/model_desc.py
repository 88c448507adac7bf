"""What a model needs, read from its GGUF header only: shapes, and bytes per layer.

The planner works from a `ModelDesc`. `read_model_desc` fills one from a real file's header
(llamalocal.gguf_header: tensor data and the vocabulary are never read). `reference_model` builds
one for the sizes Meta published (convert.families.PUBLISHED) at a preset, from the per-tensor
types llama.cpp's quantizer would choose (convert.presets.tensor_type) — no file needed, which is
what `requirements` and the planner tests use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from llamalocal.errors import GGUFError

_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass
class ModelDesc:
    """Shapes and byte counts of one model. Byte counts are the tensors' sizes in the file."""

    name: str
    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    file_type: str                      # "q4_0", "f16", ... (the preset, from general.file_type)
    file_bytes: int                     # the whole file (header included); 0 for reference models
    layer_bytes: list[int]              # blk.N.* tensors, per layer
    token_embd_bytes: int               # always stays on the CPU in llama.cpp
    output_bytes: int                   # output.weight + output_norm.weight: "the output layer"
                                        # (tied: output_norm only; the matrix is token_embd's)
    other_bytes: int                    # anything else (rope_freqs, ...)
    tensor_type_bytes: dict[str, int]   # ggml type name -> bytes of tensors of that type
    n_params: int
    # per layer, ggml type name -> bytes
    layer_type_bytes: list[dict[str, int]] = field(default_factory=list)
    n_merges: int = 0                   # BPE merges in the vocabulary (Llama 3: 280147)
    tied_output: bool = False           # no output.weight: token_embd is the output matrix too
    # the tensors in file order, as (layer, ggml type, bytes); layer -1 is token_embd, n_layers the
    # output layer, -2 anything else. Empty for reference models (no file).
    file_order: list[tuple[int, str, int]] = field(default_factory=list)
    output_type: str = ""               # ggml type of output.weight (token_embd's when tied)
    token_embd_type: str = ""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.token_embd_bytes + self.output_bytes + self.other_bytes

    @property
    def offloaded_output_bytes(self) -> int:
        """The output layer's weights on a device it is offloaded to: its own, plus a copy of
        token_embd when tied (llama.cpp loads one there; on the CPU the one tensor serves both)."""
        return self.output_bytes + (self.token_embd_bytes if self.tied_output else 0)


# ---------------------------------------------------------------------------------------------
# from a GGUF file
# ---------------------------------------------------------------------------------------------

def read_model_desc(path: str | Path) -> ModelDesc:
    """Describe the model in a GGUF file from its header (llamalocal.gguf_header: the vocabulary
    is skipped, not read, so this costs the same for 32k and 128k tokens).

    Args:
        path: a .gguf file.

    Returns:
        ModelDesc with real per-tensor byte counts.

    Raises:
        ModelNotFoundError: no such file.
        GGUFError: not a GGUF, unreadable header, missing keys, or truncated (tensor data
            extends past the end of the file).
    """
    from llamalocal.gguf_header import Keys, LlamaFileType, read_header

    h = read_header(path)
    p = h.path
    end = max((t.offset + t.n_bytes for t in h.tensors), default=0)
    if end > h.file_bytes:
        raise GGUFError(f"{p} is truncated: its tensors need {end:,} bytes but the file has {h.file_bytes:,}; "
                        "convert or download it again")

    arch = h.get(Keys.General.ARCHITECTURE, "")
    if not arch or not isinstance(arch, str):
        raise GGUFError(f"{p}: no general.architecture in the header; not a model GGUF")

    def key(template: str, default=None) -> int:
        v = h.arch_key(template, default)
        if v is None:
            raise GGUFError(f"{p}: header lacks {template.format(arch=arch)}; not a usable {arch} model")
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise GGUFError(f"{p}: {template.format(arch=arch)} is {v!r}, not a number; the file is corrupt")
        return int(v)

    n_layers = key(Keys.LLM.BLOCK_COUNT)
    n_embd = key(Keys.LLM.EMBEDDING_LENGTH)
    n_head = key(Keys.Attention.HEAD_COUNT)
    n_head_kv = key(Keys.Attention.HEAD_COUNT_KV, n_head)
    n_ff = key(Keys.LLM.FEED_FORWARD_LENGTH, 0)
    n_ctx_train = key(Keys.LLM.CONTEXT_LENGTH)
    if n_head <= 0 or n_embd <= 0 or n_layers < 0 or n_embd % n_head:
        raise GGUFError(f"{p}: inconsistent shape (n_embd {n_embd}, n_head {n_head}, n_layer {n_layers})")
    tokens = h.get(Keys.Tokenizer.LIST)
    merges = h.get(Keys.Tokenizer.MERGES)
    n_vocab = key(Keys.LLM.VOCAB_SIZE, 0) or (len(tokens) if tokens is not None else 0)

    ftype_id = h.get(Keys.General.FILE_TYPE)
    try:
        file_type = LlamaFileType(int(ftype_id)).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except (TypeError, ValueError):
        file_type = "unknown"

    layer_bytes = [0] * n_layers
    layer_type_bytes: list[dict[str, int]] = [{} for _ in range(n_layers)]
    type_bytes: dict[str, int] = {}
    token_embd = output = other = 0
    output_type = token_embd_type = ""
    n_params = 0
    order: list[tuple[int, str, int]] = []
    for t in sorted(h.tensors, key=lambda t: t.offset):
        nbytes, tname = t.n_bytes, t.type.name.lower()
        n_params += t.n_elements
        type_bytes[tname] = type_bytes.get(tname, 0) + nbytes
        m = _BLOCK.match(t.name)
        layer = int(m.group(1)) if m and int(m.group(1)) < n_layers else None
        order.append((layer if layer is not None else {"token_embd.weight": -1, "output.weight": n_layers,
                                                        "output_norm.weight": n_layers}.get(t.name, -2), tname, nbytes))
        if layer is not None:
            i = layer
            layer_bytes[i] += nbytes
            layer_type_bytes[i][tname] = layer_type_bytes[i].get(tname, 0) + nbytes
        elif t.name == "token_embd.weight":
            token_embd, token_embd_type = nbytes, tname
            if not n_vocab:
                n_vocab = int(t.shape[-1])
        elif t.name in ("output.weight", "output_norm.weight"):
            output += nbytes
            if t.name == "output.weight":
                output_type = tname
        else:
            other += nbytes
    tied = not output_type  # llama.cpp reuses token_embd as the output matrix
    if tied:
        output_type = token_embd_type

    name = h.get(Keys.General.NAME) or p.stem
    return ModelDesc(
        name=str(name), arch=arch, n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=n_ctx_train, file_type=file_type, file_bytes=h.file_bytes,
        layer_bytes=layer_bytes, token_embd_bytes=token_embd, output_bytes=output, other_bytes=other,
        tensor_type_bytes=type_bytes, n_params=n_params, layer_type_bytes=layer_type_bytes,
        output_type=output_type, token_embd_type=token_embd_type,
        n_merges=len(merges) if merges is not None else 0, file_order=order, tied_output=tied,
    )


# ---------------------------------------------------------------------------------------------
# the real LLaMA sizes, header-only
# ---------------------------------------------------------------------------------------------

REFERENCE_QUANTS = ("f16", "q8_0", "q5_1", "q4_0", "q2_k")
# The sizes `requirements` lists, as convert.families.PUBLISHED names them ("Llama-3.1 8B").
REFERENCE_SHAPES = ("LLaMA 7B", "LLaMA 13B", "LLaMA 30B", "LLaMA 65B", "Llama-2 70B",
                    "Llama-3.2 1B", "Llama-3.2 3B", "Llama-3.1 8B", "Llama-3.1 70B", "Llama-3.1 405B")
# the short names `reference_model` has always taken
_ALIASES = {"7B": "LLaMA 7B", "13B": "LLaMA 13B", "30B": "LLaMA 30B", "65B": "LLaMA 65B", "70B": "Llama-2 70B"}
# Header bytes (metadata, vocabulary) per token of the vocabulary, measured on llamalocal's own
# files: a sentencepiece vocab (piece, score, type) ~23 bytes, Llama-3's BPE vocab with its
# 280,147 merges and chat template ~61 bytes.
_HEADER_BYTES_PER_TOKEN = {"spm": 23.0, "tiktoken": 61.0}


def _tensor_bytes(ggml_type, shape: tuple[int, ...]) -> int:
    from llamalocal.gguf_header import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * nbytes


def _published(size: str):
    from llamalocal.convert.families import PUBLISHED
    from llamalocal.errors import BadInputError

    key = _ALIASES.get(size.upper(), size)
    found = PUBLISHED.get(key) or next((m for k, m in PUBLISHED.items() if k.lower() == key.lower()), None)
    if found is None:
        raise BadInputError(f"unknown model size {size!r}; choose one of {', '.join(REFERENCE_SHAPES)} "
                            f"(or {', '.join(_ALIASES)})")
    return found


def reference_model(size: str, quant: str) -> ModelDesc:
    """A header-only description of a model Meta published, at `quant`.

    `size` is a name as `requirements` prints it ("LLaMA 13B", "Llama-3.1 8B") or one of the
    short names 7B ... 65B (LLaMA-1) and 70B (Llama-2). Shapes come from the model's params.json
    (convert.families.PUBLISHED); per-tensor types are the ones llama.cpp's quantizer picks
    (convert.presets.tensor_type), so the byte counts are those of a real converted file (less its
    header). A model whose output is tied to the embeddings has no output.weight: its token_embd
    is counted once in the parameters and the file, and also as the output layer, which llama.cpp
    loads as a copy of it where it offloads that layer.

    Raises:
        BadInputError: unknown size or preset.
    """
    from llamalocal.convert.families import expected_shapes, meta_names
    from llamalocal.convert.presets import parse_preset, tensor_type

    m = _published(size)
    p, family = m.params, m.family
    preset = parse_preset(quant)
    kw = dict(n_layers=p.n_layers, n_head=p.n_heads, n_head_kv=p.kv_heads, tied_embeddings=m.tied)
    shapes = expected_shapes(p, m.n_vocab)

    type_bytes: dict[str, int] = {}
    layer_bytes = [0] * p.n_layers
    layer_type_bytes: list[dict[str, int]] = [{} for _ in range(p.n_layers)]
    n_params = embd = out = other = 0
    embd_type = out_type = ""
    for meta in meta_names(p.n_layers):
        if m.tied and meta == "output.weight":
            continue
        name, _ = family.lookup(meta)  # type: ignore[misc]
        shape = shapes[meta]
        t = tensor_type(preset, name, shape, **kw)
        b, tname = _tensor_bytes(t, shape), t.name.lower()
        type_bytes[tname] = type_bytes.get(tname, 0) + b
        n = 1
        for d in shape:
            n *= d
        n_params += n
        if name.startswith("blk."):
            i = int(name.split(".")[1])
            layer_bytes[i] += b
            layer_type_bytes[i][tname] = layer_type_bytes[i].get(tname, 0) + b
        elif name == "token_embd.weight":
            embd, embd_type = b, tname
        else:  # output.weight, output_norm.weight
            out += b
            if name == "output.weight":
                out_type = tname
    if m.tied:  # as read_model_desc describes a tied file
        out_type = embd_type
    if p.use_scaled_rope:  # rope_freqs.weight: head_dim / 2 f32
        other = p.head_dim // 2 * 4
        type_bytes["f32"] = type_bytes.get("f32", 0) + other

    return ModelDesc(
        name=f"{m.label} {preset.name}", arch="llama", n_layers=p.n_layers, n_embd=p.dim,
        n_head=p.n_heads, n_head_kv=p.kv_heads, n_ff=p.hidden_dim, n_vocab=m.n_vocab, n_ctx_train=family.n_ctx,
        file_type=preset.name, file_bytes=0, layer_bytes=layer_bytes, token_embd_bytes=embd,
        output_bytes=out, other_bytes=other, tensor_type_bytes=type_bytes, n_params=n_params,
        layer_type_bytes=layer_type_bytes, output_type=out_type, token_embd_type=embd_type, tied_output=m.tied,
        n_merges=LLAMA3_MERGES if family.tokenizer == "tiktoken" else 0,
    )


# merges rebuilt from Meta's Llama-3 tokenizer.model (tests/test_tokenizer_llama3.py checks the count
# against llama.cpp's own ggml-vocab-llama-bpe.gguf)
LLAMA3_MERGES = 280147


def reference_file_bytes(desc: ModelDesc) -> int:
    """The file size of a reference model: its tensors (a tied embedding once) plus the header
    llamalocal writes (about 0.74 MB for a 32000-piece vocabulary, 7.8 MB for Llama-3's)."""
    kind = "tiktoken" if desc.n_vocab >= 128_000 else "spm"
    return sum(desc.tensor_type_bytes.values()) + int(desc.n_vocab * _HEADER_BYTES_PER_TOKEN[kind])
