"""What a model needs, read from its GGUF header only: shapes, and bytes per layer.

The planner works from a `ModelDesc`. `read_model_desc` fills one from a real file's header
(llamalocal.gguf_header: tensor data and the vocabulary are never read).
`reference_model` builds one for the real LLaMA sizes at a preset, from the per-tensor types
llama.cpp's quantizer would choose (convert.presets.tensor_type) — no file needed, which is what
`requirements` and the planner tests use.
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
    other_bytes: int                    # anything else (rope_freqs, ...)
    tensor_type_bytes: dict[str, int]   # ggml type name -> bytes of tensors of that type
    n_params: int
    # per layer, ggml type name -> bytes
    layer_type_bytes: list[dict[str, int]] = field(default_factory=list)
    n_merges: int = 0                   # BPE merges in the vocabulary (Llama 3: 280147)
    # the tensors in file order, as (layer, ggml type, bytes); layer -1 is token_embd, n_layers the
    # output layer, -2 anything else. Empty for reference models (no file).
    file_order: list[tuple[int, str, int]] = field(default_factory=list)
    output_type: str = ""               # ggml type of output.weight ("" when tied to token_embd)
    token_embd_type: str = ""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.token_embd_bytes + self.output_bytes + self.other_bytes


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
    import gguf

    from llamalocal.gguf_header import read_header

    h = read_header(path)
    p = h.path
    end = max((t.offset + t.n_bytes for t in h.tensors), default=0)
    if end > h.file_bytes:
        raise GGUFError(f"{p} is truncated: its tensors need {end:,} bytes but the file has {h.file_bytes:,}; "
                        "convert or download it again")

    arch = h.get(gguf.Keys.General.ARCHITECTURE, "")
    if not arch or not isinstance(arch, str):
        raise GGUFError(f"{p}: no general.architecture in the header; not a model GGUF")

    def key(template: str, default=None) -> int:
        v = h.arch_key(template, default)
        if v is None:
            raise GGUFError(f"{p}: header lacks {template.format(arch=arch)}; not a usable {arch} model")
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise GGUFError(f"{p}: {template.format(arch=arch)} is {v!r}, not a number; the file is corrupt")
        return int(v)

    n_layers = key(gguf.Keys.LLM.BLOCK_COUNT)
    n_embd = key(gguf.Keys.LLM.EMBEDDING_LENGTH)
    n_head = key(gguf.Keys.Attention.HEAD_COUNT)
    n_head_kv = key(gguf.Keys.Attention.HEAD_COUNT_KV, n_head)
    n_ff = key(gguf.Keys.LLM.FEED_FORWARD_LENGTH, 0)
    n_ctx_train = key(gguf.Keys.LLM.CONTEXT_LENGTH)
    if n_head <= 0 or n_embd <= 0 or n_layers < 0 or n_embd % n_head:
        raise GGUFError(f"{p}: inconsistent shape (n_embd {n_embd}, n_head {n_head}, n_layer {n_layers})")
    tokens = h.get(gguf.Keys.Tokenizer.LIST)
    merges = h.get(gguf.Keys.Tokenizer.MERGES)
    n_vocab = key(gguf.Keys.LLM.VOCAB_SIZE, 0) or (len(tokens) if tokens is not None else 0)

    ftype_id = h.get(gguf.Keys.General.FILE_TYPE)
    try:
        file_type = gguf.LlamaFileType(int(ftype_id)).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
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
    if not output_type:
        # tied embeddings: llama.cpp reuses token_embd as the output matrix
        output += token_embd
        output_type = token_embd_type

    name = h.get(gguf.Keys.General.NAME) or p.stem
    return ModelDesc(
        name=str(name), arch=arch, n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=n_ctx_train, file_type=file_type, file_bytes=h.file_bytes,
        layer_bytes=layer_bytes, token_embd_bytes=token_embd, output_bytes=output, other_bytes=other,
        tensor_type_bytes=type_bytes, n_params=n_params, layer_type_bytes=layer_type_bytes,
        output_type=output_type, token_embd_type=token_embd_type,
        n_merges=len(merges) if merges is not None else 0, file_order=order,
    )


# ---------------------------------------------------------------------------------------------
# the real LLaMA sizes, header-only
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shape:
    n_embd: int
    n_layers: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    family: str


# Meta's published hyper-parameters (params.json + the FFN size Meta's formula gives).
REFERENCE_SHAPES: dict[str, _Shape] = {
    "7B": _Shape(4096, 32, 32, 32, 11008, 2048, "LLaMA"),
    "13B": _Shape(5120, 40, 40, 40, 13824, 2048, "LLaMA"),
    "30B": _Shape(6656, 60, 52, 52, 17920, 2048, "LLaMA"),
    "65B": _Shape(8192, 80, 64, 64, 22016, 2048, "LLaMA"),
    "70B": _Shape(8192, 80, 64, 8, 28672, 4096, "Llama-2"),
}
REFERENCE_QUANTS = ("f16", "q8_0", "q5_1", "q4_0", "q2_k")
N_VOCAB = 32000


def _tensor_bytes(ggml_type, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * nbytes


def reference_model(size: str, quant: str) -> ModelDesc:
    """A header-only description of Meta's LLaMA `size` ('7B' ... '65B', '70B' = Llama-2) at `quant`.

    Per-tensor types are the ones llama.cpp's quantizer picks (convert.presets.tensor_type), so
    the byte counts are those of a real converted file (less its few-MB header).

    Raises:
        BadInputError: unknown size or preset.
    """
    from llamalocal.convert.presets import parse_preset, tensor_type
    from llamalocal.errors import BadInputError

    key = size.upper()
    if key not in REFERENCE_SHAPES:
        raise BadInputError(f"unknown model size {size!r}; choose one of {', '.join(REFERENCE_SHAPES)}")
    s = REFERENCE_SHAPES[key]
    preset = parse_preset(quant)
    head_dim = s.n_embd // s.n_head
    n_kv = head_dim * s.n_head_kv
    kw = dict(n_layers=s.n_layers, n_head=s.n_head, n_head_kv=s.n_head_kv)

    type_bytes: dict[str, int] = {}
    n_params = 0

    def add(name: str, shape: tuple[int, ...], i_layer: int | None = None) -> tuple[int, str]:
        nonlocal n_params
        t = tensor_type(preset, name, shape, i_layer=i_layer, **kw)
        b = _tensor_bytes(t, shape)
        tname = t.name.lower()
        type_bytes[tname] = type_bytes.get(tname, 0) + b
        n = 1
        for d in shape:
            n *= d
        n_params += n
        return b, tname

    # numpy shapes (rows, cols); Meta's names in the comments
    layer_shapes = {
        "attn_norm": (s.n_embd,),               # attention_norm
        "attn_q": (s.n_embd, s.n_embd),         # wq
        "attn_k": (n_kv, s.n_embd),             # wk
        "attn_v": (n_kv, s.n_embd),             # wv
        "attn_output": (s.n_embd, s.n_embd),    # wo
        "ffn_norm": (s.n_embd,),                # ffn_norm
        "ffn_gate": (s.n_ff, s.n_embd),         # w1
        "ffn_down": (s.n_embd, s.n_ff),         # w2
        "ffn_up": (s.n_ff, s.n_embd),           # w3
    }
    layer_bytes, layer_type_bytes = [], []
    for i in range(s.n_layers):
        total, by_type = 0, {}
        for role, shape in layer_shapes.items():
            b, tname = add(f"blk.{i}.{role}.weight", shape, i)
            total += b
            by_type[tname] = by_type.get(tname, 0) + b
        layer_bytes.append(total)
        layer_type_bytes.append(by_type)
    embd, embd_type = add("token_embd.weight", (N_VOCAB, s.n_embd))      # tok_embeddings
    out, out_type = add("output.weight", (N_VOCAB, s.n_embd))            # output
    out_norm, _ = add("output_norm.weight", (s.n_embd,))                 # norm

    return ModelDesc(
        name=f"{s.family} {key} {preset.name}", arch="llama", n_layers=s.n_layers, n_embd=s.n_embd,
        n_head=s.n_head, n_head_kv=s.n_head_kv, n_ff=s.n_ff, n_vocab=N_VOCAB, n_ctx_train=s.n_ctx_train,
        file_type=preset.name, file_bytes=0, layer_bytes=layer_bytes, token_embd_bytes=embd,
        output_bytes=out + out_norm, other_bytes=0, tensor_type_bytes=type_bytes, n_params=n_params,
        layer_type_bytes=layer_type_bytes, output_type=out_type, token_embd_type=embd_type,
    )


def reference_file_bytes(desc: ModelDesc) -> int:
    """The file size of a reference model: tensors plus the header llamalocal writes (vocab ~0.7 MB)."""
    return desc.weights_bytes + 750_000
