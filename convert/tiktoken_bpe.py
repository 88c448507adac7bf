"""Meta's Llama-3 tokenizer.model (a tiktoken BPE file) -> the pieces of a GGUF `gpt2` vocabulary.

The file is one line per token, `base64(token bytes) rank`, 128000 lines for Llama 3. It holds
neither the special tokens (Meta's llama3/tokenizer.py appends 256 of them after the last rank)
nor any merges: tiktoken merges by rank (the pair whose concatenation has the lowest rank goes
first), llama.cpp by a merges list. The list is rebuilt from the ranks the way transformers'
TikTokenConverter (and so llama.cpp's own ggml-vocab-llama-bpe.gguf) does it: every split of a
token into two tokens of the vocabulary is a merge, ordered by the merged token's rank, the
splits of one token by the ranks of their halves. llama.cpp's `llama-bpe` pre-tokenizer uses a
whole pre-token found in the vocabulary as is (tiktoken does too), so the ranks decide.

Pure functions over bytes; `llamalocal.convert.tokenizer` builds its Vocab from them.
"""

from __future__ import annotations

import base64
import binascii
from functools import cache
from pathlib import Path

from llamalocal.convert.errors import BadInputError

# Meta's llama3/tokenizer.py (llama-models): these twelve, then reserved ones up to 256 in all,
# numbered from 2 because _0 and _1 are among the twelve.
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (after a tool call)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIALS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS)))

BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
EOT, EOM = "<|eot_id|>", "<|eom_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"


def looks_like_tiktoken(data: bytes) -> bool:
    """A tiktoken BPE file starts with a `<base64> <rank>` text line (a sentencepiece model is a
    protobuf, whose first byte is a field tag, never base64 text followed by a space)."""
    head = data[:256].split(b"\n", 1)[0].split(b" ")
    return len(head) == 2 and head[1].isdigit() and len(head[0]) > 0


def read_ranks(data: bytes, path: Path) -> list[bytes]:
    """The token bytes of a tiktoken file, indexed by rank.

    Raises:
        BadInputError: a line that is not `base64 rank`, ranks that are not 0..n-1 each once,
            a token listed twice, or a byte value with no token of its own (BPE needs all 256).
    """
    lines = data.split(b"\n")
    tokens: list[bytes | None] = [None] * len(lines)
    n = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise BadInputError(f"{path}, line {lineno}: not a tiktoken `base64 rank` line ({e}); "
                                "the tokenizer file is damaged, download it again") from None
        if not 0 <= rank < len(lines) or tokens[rank] is not None:
            raise BadInputError(f"{path}, line {lineno}: rank {rank} is out of order or repeated; "
                                "the tokenizer file is damaged, download it again")
        tokens[rank] = token
        n += 1
    ranked = tokens[:n]
    if any(t is None for t in ranked):
        missing = next(i for i, t in enumerate(ranked) if t is None)
        raise BadInputError(f"{path}: ranks are not contiguous (no token of rank {missing}); "
                            "the tokenizer file is damaged, download it again")
    out: list[bytes] = ranked  # type: ignore[assignment]  # no None left
    if len(set(out)) != len(out):
        raise BadInputError(f"{path}: a token is listed twice; the tokenizer file is damaged, download it again")
    singles = {t[0] for t in out if len(t) == 1}
    if len(singles) != 256:
        raise BadInputError(f"{path}: only {len(singles)} of the 256 byte values have a token; "
                            "not a byte-level BPE tokenizer")
    return out


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes_to_unicode in GPT-2's encoder.py):
    printable Latin-1 bytes stand for themselves, the other 68 are moved to U+0100 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


def token_text(token: bytes) -> str:
    """A token's bytes as GGUF `gpt2` vocabularies store it: one character per byte."""
    return token.decode("latin-1").translate(_byte_to_unicode())


def texts(tokens: list[bytes]) -> list[str]:
    table = _byte_to_unicode()
    return [t.decode("latin-1").translate(table) for t in tokens]


def merges(tokens: list[bytes], token_texts: list[str]) -> list[str]:
    """The merges list ("left right", in GGUF text form) rebuilt from the ranks.

    Each byte of a token is one character of its text, so a split at byte i is a split of the
    text at character i.
    """
    rank = {t: r for r, t in enumerate(tokens)}
    out: list[str] = []
    for token, text in zip(tokens, token_texts, strict=True):
        if len(token) < 2:
            continue
        local = [(rank[token[:i]], rank[token[i:]], i) for i in range(1, len(token))
                 if token[:i] in rank and token[i:] in rank]
        if len(local) > 1:
            local.sort()
        out += [f"{text[:i]} {text[i:]}" for _, _, i in local]
    return out
