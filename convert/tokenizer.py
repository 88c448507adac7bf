"""tokenizer.model (sentencepiece) -> the GGUF `llama` vocabulary.

Pieces, scores and piece types are read from the sentencepiece ModelProto itself (the
processor API cannot tell user-defined pieces apart). Llama-3's Meta `tokenizer.model` is a
tiktoken BPE file instead; it is recognised and refused with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from llamalocal.convert.errors import BadInputError
from llamalocal.convert.inputs import read_input

TOKENIZER_FILE = "tokenizer.model"
MAX_TOKENIZER_BYTES = 64 * 2**20  # LLaMA's is 500 KB, Llama-3's 2.2 MB

# sentencepiece ModelProto.SentencePiece.Type -> GGUF token type (the numbers happen to agree;
# the table keeps that an explicit fact rather than a coincidence).
_PIECE_TYPES = {
    1: gguf.TokenType.NORMAL,
    2: gguf.TokenType.UNKNOWN,
    3: gguf.TokenType.CONTROL,
    4: gguf.TokenType.USER_DEFINED,
    5: gguf.TokenType.UNUSED,
    6: gguf.TokenType.BYTE,
}


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    path: Path

    def __len__(self) -> int:
        return len(self.tokens)

    def padded(self, n_vocab: int) -> Vocab:
        """Extend to `n_vocab` entries for checkpoints whose embedding is larger than the tokenizer
        (Code Llama's 32016). The extra ids never come out of the tokenizer."""
        extra = n_vocab - len(self.tokens)
        if extra <= 0:
            return self
        return Vocab(
            tokens=self.tokens + [f"[PAD{i}]" for i in range(len(self.tokens), n_vocab)],
            scores=self.scores + [-1000.0] * extra,
            token_types=self.token_types + [int(gguf.TokenType.UNUSED)] * extra,
            bos_id=self.bos_id, eos_id=self.eos_id, unk_id=self.unk_id, pad_id=self.pad_id, path=self.path,
        )


def find_tokenizer(model_dir: Path) -> Path:
    """tokenizer.model in the model directory or its parent (Meta's download puts it in the parent)."""
    for d in (Path(model_dir), Path(model_dir).resolve().parent):
        if (d / TOKENIZER_FILE).is_file():
            return d / TOKENIZER_FILE
    raise BadInputError(
        f"no {TOKENIZER_FILE} in {model_dir} or its parent; Meta's download has it beside the size folders "
        "(copy it there or next to params.json)"
    )


def _looks_like_tiktoken(data: bytes) -> bool:
    # tiktoken BPE files are text lines "<base64 token> <rank>"
    head = data[:200].split(b"\n")[0].split(b" ")
    return len(head) == 2 and head[1].isdigit()


def load_vocab(path: Path) -> Vocab:
    """Read a sentencepiece tokenizer.model. Raises BadInputError for anything else."""
    import sentencepiece as spm
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    data = read_input(path, MAX_TOKENIZER_BYTES)
    if _looks_like_tiktoken(data):
        raise BadInputError(f"{path} is a tiktoken (Llama-3) tokenizer; llamalocal converts sentencepiece "
                            "tokenizers (LLaMA-1, Llama-2, Code Llama) only for now")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (DecodeError, RuntimeError, OSError) as e:
        raise BadInputError(f"{path} is not a sentencepiece model ({e}); re-download tokenizer.model") from e
    if len(proto.pieces) == 0 or proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM=1, BPE=2
        raise BadInputError(f"{path} is not a LLaMA sentencepiece model (no pieces or unsupported model type)")
    missing = [what for what, i in (("BOS (<s>)", sp.bos_id()), ("EOS (</s>)", sp.eos_id()), ("unknown", sp.unk_id()))
               if not 0 <= i < len(proto.pieces)]
    if missing:
        raise BadInputError(f"{path} has no {' or '.join(missing)} piece, which every LLaMA tokenizer has; "
                            "re-download tokenizer.model")
    pieces = proto.pieces
    return Vocab(
        tokens=[p.piece for p in pieces],
        scores=[p.score for p in pieces],
        token_types=[int(_PIECE_TYPES.get(p.type, gguf.TokenType.NORMAL)) for p in pieces],
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
        unk_id=sp.unk_id(),
        pad_id=sp.pad_id() if sp.pad_id() >= 0 else None,
        path=Path(path),
    )


def add_to_gguf(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """The `tokenizer.ggml.*` keys llama.cpp's SPM tokenizer reads."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
