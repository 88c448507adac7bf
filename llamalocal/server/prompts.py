"""A checked request to what the model runs: prompt token ids, a token budget, stop strings.

Chat requests are formatted exactly as `llamalocal chat` formats them, through llamalocal.chat
(`format_dialog`, `encode`, `stops_for`), so a template added there needs nothing here. Token
ids (a prompt given as ids, logit_bias keys) are checked against the vocabulary and lengths
against the context window before anything reaches llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamalocal.server.errors import bad_request
from llamalocal.server.requests import CHAT, DEFAULT_COMPLETION_TOKENS, Message, Request


@dataclass
class Prepared:
    prompt: list[int]
    limit: int  # tokens to generate at most, per choice
    stops: tuple[str, ...]
    strip_leading: bool  # chat: the space or newline after "[/INST]" / "Assistant:" is not the answer's
    echo: str = ""  # completions with echo: the prompt's text, sent before the completion


def messages_to_dialog(messages: list[Message]) -> tuple[str | None, list[Any], str]:
    """OpenAI messages as llamalocal.chat's (system, finished turns, pending user message).
    System (and developer) messages are joined into the system prompt; consecutive messages of
    one role are joined; the last message must be the user's."""
    from llamalocal.chat import Turn

    system = "\n".join(m.text for m in messages if m.role == "system") or None
    runs: list[tuple[str, str]] = []  # (role, text), consecutive roles merged
    for m in messages:
        if m.role == "system":
            continue
        if runs and runs[-1][0] == m.role:
            runs[-1] = (m.role, runs[-1][1] + "\n" + m.text)
        else:
            runs.append((m.role, m.text))
    if not runs or runs[-1][0] != "user":
        raise bad_request("the last message must be the user's", param="messages")
    if runs[0][0] == "assistant":
        runs.insert(0, ("user", ""))
    turns = [Turn(runs[k][1], runs[k + 1][1]) for k in range(0, len(runs) - 1, 2)]
    return system, turns, runs[-1][1]


def chat_tokens(llm: Any, template: str, messages: list[Message]) -> list[int]:
    """The prompt `llamalocal chat` would build for this dialogue, token for token."""
    from llamalocal.chat import encode, format_dialog

    system, turns, pending = messages_to_dialog(messages)
    return encode(llm, format_dialog(template, system, turns, pending))


def prepare(req: Request, llm: Any, template: str, n_ctx: int, n_vocab: int,
            max_token_bytes: Callable[[], int] = lambda: 1 << 30) -> Prepared:
    """Prompt ids, budget and stops for `req`, or ApiError(400) for ids outside the vocabulary,
    a prompt that fills the context, or a max_tokens that does not fit beside the prompt.

    `max_token_bytes()` is the longest token's length: a text of more than that many bytes per
    context position cannot fit, and is refused without tokenizing it (8 MiB takes seconds)."""
    from llamalocal.chat import stops_for
    from llamalocal.convert import native
    from llamalocal.runner import tokenize_prompt

    text_bytes = (sum(len(m.text.encode("utf-8")) for m in req.messages) if req.kind == CHAT
                  else len(req.prompt.encode("utf-8")) if isinstance(req.prompt, str) else 0)
    if text_bytes > 4 * n_ctx and text_bytes > max_token_bytes() * n_ctx:
        raise bad_request(f"the prompt is over {text_bytes // max_token_bytes()} tokens but the context window is "
                          f"{n_ctx}; shorten it, or restart the server with a larger --ctx",
                          param="messages" if req.kind == CHAT else "prompt", code="context_length_exceeded")
    bad_bias = [t for t in req.sampling.logit_bias if t >= n_vocab]
    if bad_bias:
        raise bad_request(f"logit_bias names token {bad_bias[0]}, outside the vocabulary (0..{n_vocab - 1})",
                          param="logit_bias")
    echo = ""
    if req.kind == CHAT:
        ids = chat_tokens(llm, template, req.messages)
        stops = tuple(dict.fromkeys(stops_for(template) + req.stop))
        param = "messages"
    else:
        stops, param = req.stop, "prompt"
        if isinstance(req.prompt, list) and req.prompt:
            outside = [t for t in req.prompt if not 0 <= t < n_vocab]
            if outside:
                raise bad_request(f"prompt token {outside[0]} is outside the vocabulary (0..{n_vocab - 1})",
                                  param="prompt")
            ids = list(req.prompt)
            if req.echo:
                echo = b"".join(native.token_piece(llm.model, t) for t in ids).decode("utf-8", "replace")
        else:
            text = req.prompt if isinstance(req.prompt, str) else ""
            ids = tokenize_prompt(llm, text)
            echo = text if req.echo else ""

    n_prompt = len(ids)
    if n_prompt >= n_ctx:
        raise bad_request(f"the prompt is {n_prompt} tokens but the context window is {n_ctx}; "
                          "shorten it, or restart the server with a larger --ctx",
                          param=param, code="context_length_exceeded")
    room = n_ctx - n_prompt
    wanted = req.max_tokens
    if wanted is None:
        wanted = DEFAULT_COMPLETION_TOKENS if req.kind != CHAT else 0
    if wanted > room:
        raise bad_request(f"max_tokens={wanted} does not fit: the context window is {n_ctx} tokens and the "
                          f"prompt takes {n_prompt}, so at most {room} can be generated",
                          param="max_tokens", code="context_length_exceeded")
    return Prepared(prompt=ids, limit=wanted or room, stops=stops, strip_leading=req.kind == CHAT, echo=echo)
