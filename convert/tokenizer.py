"""tokenizer.model -> the GGUF vocabulary llama.cpp reads, in either of Meta's two formats.

- sentencepiece (LLaMA-1, Llama-2, Code Llama): GGUF tokenizer model `llama`. Pieces, scores and
  piece types are read from the sentencepiece ModelProto itself (the processor API cannot tell
  user-defined pieces apart).
- tiktoken (Llama 3.x): GGUF tokenizer model `gpt2` with llama.cpp's `llama-bpe` pre-tokenizer:
  tokens in GPT-2's byte-to-unicode form, Meta's 256 special tokens after them, and the merges
  rebuilt from the ranks (llamalocal.convert.tiktoken_bpe).

The format is told from the file's content, never its name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from llamalocal.convert import tiktoken_bpe
from llamalocal.convert.errors import BadInputError
from llamalocal.convert.inputs import read_input

TOKENIZER_FILE = "tokenizer.model"
SPM, TIKTOKEN = "spm", "tiktoken"
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

# tokenizer.chat_template for instruct models, rendered by llama-server (--jinja), LM Studio,
# llama-cpp-python and recognised by Ollama. Both are the dialog formats llamalocal.chat writes
# token by token.
#
# Llama 3 as Meta's ChatFormat.encode_dialog_prompt (llama-models, llama3/chat_format.py):
# <|begin_of_text|>, per message a header `<|start_header_id|>ROLE<|end_header_id|>\n\n`, the
# content as is (Meta does not strip it), <|eot_id|>; then an open assistant header. Meta names
# the tool role `ipython`.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Llama 2 chat as Meta's chat_completion (llama/generation.py): BOS "[INST] user [/INST] answer " EOS
# per turn, the system prompt inside the first user message between <<SYS>> markers.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set content = message['content'] %}"
    "{%- if loop.first and system %}{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + content | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass
class Vocab:
    """Everything the GGUF tokenizer keys need, for either format. `len()` counts every token,
    special ones included (128256 for Llama 3)."""

    tokens: list[str]
    scores: list[float]  # sentencepiece scores; empty for BPE (llama.cpp's gpt2 model reads none)
    token_types: list[int]
    bos_id: int
    eos_id: int  # end of text: what a base model emits (Llama 3: <|end_of_text|>)
    unk_id: int | None  # None for BPE: every byte has a token
    pad_id: int | None
    path: Path
    kind: str = SPM  # SPM or TIKTOKEN
    merges: list[str] = field(default_factory=list)  # BPE merges, "left right", highest priority first
    eot_id: int | None = None  # end of turn (Llama 3: <|eot_id|>): what an instruct model emits
    eom_id: int | None = None  # end of message, after a tool call (Llama 3: <|eom_id|>)

    def __len__(self) -> int:
        return len(self.tokens)

    def padded(self, n_vocab: int) -> Vocab:
        """Extend to `n_vocab` entries for checkpoints whose embedding is larger than the tokenizer
        (Code Llama's 32016). The extra ids never come out of the tokenizer."""
        extra = n_vocab - len(self.tokens)
        if extra <= 0:
            return self
        return dataclasses.replace(
            self,
            tokens=self.tokens + [f"[PAD{i}]" for i in range(len(self.tokens), n_vocab)],
            scores=self.scores + [-1000.0] * extra if self.scores else [],
            token_types=self.token_types + [int(gguf.TokenType.UNUSED)] * extra,
        )

    def eos_for(self, instruct: bool) -> int:
        """The id generation ends at: an instruct model's turn ends with <|eot_id|> (Llama 3)."""
        return self.eot_id if instruct and self.eot_id is not None else self.eos_id


def find_tokenizer(model_dir: Path) -> Path:
    """tokenizer.model in the model directory or its parent (Meta's download puts it in the parent)."""
    for d in (Path(model_dir), Path(model_dir).resolve().parent):
        if (d / TOKENIZER_FILE).is_file():
            return d / TOKENIZER_FILE
    raise BadInputError(
        f"no {TOKENIZER_FILE} in {model_dir} or its parent; Meta's download has it beside the size folders "
        "(copy it there or next to params.json)"
    )


def load_vocab(path: Path) -> Vocab:
    """Read a tokenizer.model, sentencepiece or tiktoken (told apart by content).

    Raises:
        BadInputError: the file is neither, or is damaged.
    """
    data = read_input(Path(path), MAX_TOKENIZER_BYTES)
    if tiktoken_bpe.looks_like_tiktoken(data):
        return _load_tiktoken(data, Path(path))
    return _load_sentencepiece(data, Path(path))


def _load_sentencepiece(data: bytes, path: Path) -> Vocab:
    import sentencepiece as spm
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    try:
        proto.ParseFromString(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (DecodeError, RuntimeError, OSError) as e:
        raise BadInputError(f"{path} is neither a sentencepiece model ({e}) nor a tiktoken BPE file; "
                            "re-download tokenizer.model") from e
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
        path=path,
    )


def _load_tiktoken(data: bytes, path: Path) -> Vocab:
    ranked = tiktoken_bpe.read_ranks(data, path)
    texts = tiktoken_bpe.texts(ranked)
    merges = tiktoken_bpe.merges(ranked, texts)
    special = {name: len(ranked) + i for i, name in enumerate(tiktoken_bpe.SPECIAL_TOKENS)}
    return Vocab(
        tokens=texts + list(tiktoken_bpe.SPECIAL_TOKENS),
        scores=[],
        # as llama.cpp's own ggml-vocab-llama-bpe.gguf: every special token, reserved ones too, is a
        # control token (never produced from text unless special tokens are parsed)
        token_types=[int(gguf.TokenType.NORMAL)] * len(ranked) + [int(gguf.TokenType.CONTROL)] * len(special),
        bos_id=special[tiktoken_bpe.BEGIN_OF_TEXT],
        eos_id=special[tiktoken_bpe.END_OF_TEXT],
        unk_id=None,
        pad_id=None,  # as llama.cpp's vocab file; Meta pads fine-tuning batches with <|finetune_right_pad_id|>
        path=path,
        kind=TIKTOKEN,
        merges=merges,
        eot_id=special[tiktoken_bpe.EOT],
        eom_id=special[tiktoken_bpe.EOM],
    )


def add_to_gguf(writer: gguf.GGUFWriter, vocab: Vocab, *, instruct: bool = False) -> None:
    """Every `tokenizer.*` key llama.cpp reads for this vocabulary.

    Args:
        writer: the GGUF being written (metadata phase).
        vocab: from `load_vocab` (padded to the embedding's rows if need be).
        instruct: a chat / instruct fine-tune: end of sequence is the end of a turn (Llama 3's
            <|eot_id|>), and the dialog format goes in as `tokenizer.chat_template`.
    """
    if vocab.kind == TIKTOKEN:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.token_types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_for(instruct))
    if vocab.eot_id is not None:
        writer.add_eot_token_id(vocab.eot_id)
    if vocab.eom_id is not None:
        writer.add_eom_token_id(vocab.eom_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if instruct:
        writer.add_chat_template(LLAMA3_CHAT_TEMPLATE if vocab.kind == TIKTOKEN else LLAMA2_CHAT_TEMPLATE)
