"""Chat: the prompt templates, the history that fits the context, and the REPL.

Three templates, in this one place:

- ``inst``: Meta's Llama-2 chat format, token for token as Meta's ``chat_completion`` builds it
  (llama/generation.py): each finished turn is ``BOS "[INST] {user} [/INST] {answer} " EOS``, the
  pending one ``BOS "[INST] {user} [/INST]"``, and the system prompt goes inside the first kept
  turn between ``<<SYS>>`` markers. Each piece is tokenized on its own, as sentencepiece's
  ``encode`` did there (so each gets its own dummy-prefix space).
- ``llama3``: Meta's Llama-3 dialog format, token for token as Meta's
  ``ChatFormat.encode_dialog_prompt`` builds it (llama-models, llama3/chat_format.py):
  ``<|begin_of_text|>``, then per message ``<|start_header_id|>ROLE<|end_header_id|>`` (the role
  tokenized on its own), ``"\n\n"`` on its own, the content on its own and as is, ``<|eot_id|>``;
  last an open assistant header. Generation ends at ``<|eot_id|>``, ``<|eom_id|>`` or
  ``<|end_of_text|>`` (all three are end-of-generation tokens to llama.cpp).
- ``plain``: a continuation dialogue for base models (LLaMA-1, Llama-2 base), which were never
  taught a chat format: a preamble, then ``User: ...`` / ``Assistant: ...`` lines; the answer
  ends where the model starts the user's next line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from llamalocal.convert.tiktoken_bpe import END_HEADER, EOT, START_HEADER
from llamalocal.errors import BadInputError
from llamalocal.runner import GenStats, Sampling, context_size, stream_tokens

TEMPLATES = ("inst", "llama3", "plain")

# Meta's markers (llama/generation.py)
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

PLAIN_PREAMBLE = ("A conversation between a curious User and a helpful, knowledgeable Assistant. "
                  "The Assistant answers clearly and briefly.")
PLAIN_USER, PLAIN_ASSISTANT = "User:", "Assistant:"
# a base model keeps writing the dialogue; its answer ends where it starts the next user line
PLAIN_STOPS = ("\nUser:", "\n\nUser:")


@dataclass
class Segment:
    """A piece of prompt text tokenized on its own, with BOS/EOS around it as Meta's format wants.
    `special`: the text is special-token markup (``<|eot_id|>``), parsed as special tokens;
    everything else, whatever the user typed, stays text."""

    text: str
    bos: bool = False
    eos: bool = False
    special: bool = False


@dataclass
class Turn:
    user: str
    assistant: str


# ---------------------------------------------------------------------------------------------
# Picking a template
# ---------------------------------------------------------------------------------------------

# GGUF header keys the choice reads (llama-cpp-python's `Llama.metadata`, values as strings)
_PRE, _CHAT_TEMPLATE, _EOS, _EOT = ("tokenizer.ggml.pre", "tokenizer.chat_template",
                                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's names for Llama 3's pre-tokenizer


def pick_template(override: str | None, model_name: str | None, path: Path,
                  metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(template, why).

    With the GGUF header (`metadata`): a chat template in it names the format; a Llama-3
    vocabulary whose end of sequence is <|eot_id|> is an instruct model. Otherwise the name
    decides: Meta's chat checkpoints are named `llama-2-*-chat` / `Llama3.1-8B-Instruct`; the
    converter keeps that name in general.name, and the file name usually carries it too.
    """
    if override is not None:
        if override not in TEMPLATES:
            raise BadInputError(f"unknown template {override!r}; use one of: {', '.join(TEMPLATES)}")
        return override, "chosen with --template"
    meta = metadata or {}
    chat_template = meta.get(_CHAT_TEMPLATE, "")
    if START_HEADER in chat_template:
        return "llama3", "the GGUF's chat template is Meta's Llama-3 dialog format"
    if "[INST]" in chat_template:
        return "inst", "the GGUF's chat template is Meta's Llama-2 [INST] format"
    llama3 = meta.get(_PRE) in _LLAMA3_PRE
    if llama3 and meta.get(_EOT) is not None and meta.get(_EOS) == meta.get(_EOT):
        return "llama3", "a Llama-3 vocabulary whose end of sequence is <|eot_id|> (an instruct model)"
    for label, text in (("model name", model_name or ""), ("file name", path.name)):
        if llama3 and any(w in text.lower() for w in ("instruct", "chat")):
            return "llama3", f"a Llama-3 vocabulary, and the {label} {text!r} says it is an instruct model"
        if not llama3 and "chat" in text.lower():
            return "inst", f"the {label} {text!r} says it is a chat model"
    if llama3:
        return "plain", ("a Llama-3 base model (no chat template, not named *Instruct*); "
                         "use --template llama3 if it was fine-tuned for Meta's Llama-3 dialog format")
    return "plain", ("a base model (no 'chat' in its name); "
                     "use --template inst if it was fine-tuned for Llama-2's [INST] format")


# ---------------------------------------------------------------------------------------------
# Formatting a dialogue into segments
# ---------------------------------------------------------------------------------------------

def format_dialog(template: str, system: str | None, turns: list[Turn], pending: str) -> list[Segment]:
    """The segments for `turns` (finished) followed by the `pending` user message."""
    if template == "inst":
        return _format_inst(system, turns, pending)
    if template == "llama3":
        return _format_llama3(system, turns, pending)
    if template == "plain":
        return _format_plain(system, turns, pending)
    raise BadInputError(f"unknown template {template!r}; use one of: {', '.join(TEMPLATES)}")


def _format_inst(system: str | None, turns: list[Turn], pending: str) -> list[Segment]:
    users = [t.user for t in turns] + [pending]
    if system:
        # Meta folds the system prompt into the first user message
        users[0] = B_SYS + system + E_SYS + users[0]
    segments = [Segment(f"{B_INST} {u.strip()} {E_INST} {t.assistant.strip()} ", bos=True, eos=True)
                for u, t in zip(users[:-1], turns, strict=True)]
    segments.append(Segment(f"{B_INST} {users[-1].strip()} {E_INST}", bos=True))
    return segments


def _llama3_message(role: str, content: str) -> list[Segment]:
    # Meta's encode_message: the header's role and "\n\n" and the content are encoded apart
    return [Segment(f"{START_HEADER}{role}{END_HEADER}", special=True), Segment("\n\n"), Segment(content),
            Segment(EOT, special=True)]


def _format_llama3(system: str | None, turns: list[Turn], pending: str) -> list[Segment]:
    segments = [Segment("", bos=True)]
    if system:
        segments += _llama3_message("system", system)
    for t in turns:
        segments += _llama3_message("user", t.user) + _llama3_message("assistant", t.assistant)
    segments += _llama3_message("user", pending)
    return segments + _llama3_message("assistant", "")[:2]  # the open header the model completes


def _format_plain(system: str | None, turns: list[Turn], pending: str) -> list[Segment]:
    lines = [(system or PLAIN_PREAMBLE).strip(), ""]
    for t in turns:
        lines += [f"{PLAIN_USER} {t.user.strip()}", f"{PLAIN_ASSISTANT} {t.assistant.strip()}"]
    lines += [f"{PLAIN_USER} {pending.strip()}", PLAIN_ASSISTANT]
    return [Segment("\n".join(lines), bos=True)]


def stops_for(template: str) -> tuple[str, ...]:
    return PLAIN_STOPS if template == "plain" else ()


def encode(llm: Any, segments: list[Segment]) -> list[int]:
    """Token ids for `segments`: each tokenized on its own, BOS/EOS added as ids (never as text)."""
    ids: list[int] = []
    for s in segments:
        if s.bos:
            ids.append(llm.token_bos())
        if s.text:
            ids += llm.tokenize(s.text.encode("utf-8"), add_bos=False, special=s.special)
        if s.eos:
            ids.append(llm.token_eos())
    return ids


# ---------------------------------------------------------------------------------------------
# Stop strings while streaming
# ---------------------------------------------------------------------------------------------

class StopFilter:
    """Passes streamed text through, holding back anything that could be the start of a stop
    string, so the user never sees half of `\\nUser:` before the answer is cut there."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---------------------------------------------------------------------------------------------
# A session: history within the context window
# ---------------------------------------------------------------------------------------------

@dataclass
class ChatSession:
    """The running dialogue with one loaded model.

    `reserve` tokens of the context are kept free for each answer; when the history does not
    leave that much, the oldest turns are dropped (and `on_notice` says so).
    """

    llm: Any
    template: str
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None
    reserve: int | None = None
    on_notice: Callable[[str], None] = lambda msg: None
    turns: list[Turn] = field(default_factory=list)
    last_stats: GenStats | None = None

    def reset(self) -> None:
        self.turns.clear()

    def _reserve(self) -> int:
        n_ctx = context_size(self.llm)
        if self.reserve is not None:
            return self.reserve
        if self.max_tokens is not None:
            return min(self.max_tokens, n_ctx // 2)
        return min(512, n_ctx // 4)

    def prompt_tokens(self, user: str) -> list[int]:
        """The prompt for `user` after the kept history; drops the oldest turns that do not fit."""
        n_ctx, reserve = context_size(self.llm), self._reserve()
        dropped = 0
        while True:
            ids = encode(self.llm, format_dialog(self.template, self.system, self.turns, user))
            if len(ids) + reserve <= n_ctx or not self.turns:
                break
            self.turns.pop(0)
            dropped += 1
        if dropped:
            self.on_notice(f"[history: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} "
                           f"to fit the {n_ctx}-token context]")
        if len(ids) >= n_ctx:
            raise BadInputError(f"this message needs {len(ids)} tokens but the context holds {n_ctx}; "
                                "send a shorter message or restart with a larger --ctx")
        return ids

    def respond(self, user: str) -> Iterator[str]:
        """Stream the answer to `user`; the turn joins the history even when interrupted
        (with what was shown so far), so the dialogue stays what the user saw."""
        ids = self.prompt_tokens(user)
        stats = GenStats()
        self.last_stats = stats
        stop = StopFilter(stops_for(self.template))
        shown: list[str] = []
        try:
            for piece in stream_tokens(self.llm, ids, max_tokens=self.max_tokens, sampling=self.sampling,
                                       stats=stats):
                out = stop.feed(piece)
                if not shown:
                    out = out.lstrip()  # the space or newline after "[/INST]" / "Assistant:"
                if out:
                    shown.append(out)
                    yield out
                if stop.stopped:
                    stats.stop = "stop"
                    break
            if not stop.stopped:
                rest = stop.flush()
                if rest:
                    shown.append(rest)
                    yield rest
        finally:
            if shown:  # an answer stopped before its first word leaves no turn behind
                self.turns.append(Turn(user, "".join(shown)))


# ---------------------------------------------------------------------------------------------
# The REPL
# ---------------------------------------------------------------------------------------------

HELP = "/reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops an answer."


def format_stats(stats: GenStats) -> str:
    parts = [f"{stats.n_generated} tokens, {stats.tg_tps:.1f} tokens/s"]
    if stats.n_prompt_eval:
        parts.append(f"prompt {stats.n_prompt_eval} tokens at {stats.pp_tps:.1f} tokens/s")
    if stats.stop in ("length", "context"):
        parts.append("stopped: " + ("answer length limit" if stats.stop == "length" else "context full"))
    elif stats.stop == "interrupted":
        parts.append("stopped by Ctrl-C")
    return "[" + "; ".join(parts) + "]"


def repl(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr, prompt: str = "> ") -> None:
    """Read a line, stream the answer, repeat; returns on /exit or end of input (Ctrl-D)."""
    while True:
        try:
            line = read(prompt)
        except EOFError:
            out.write("\n")
            out.flush()
            return
        except KeyboardInterrupt:
            # at the prompt Ctrl-C only clears the line, as in a shell
            err.write("\n(Ctrl-D or /exit to leave)\n")
            err.flush()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            session.reset()
            err.write("[history cleared]\n")
            err.flush()
            continue
        if text in ("/help", "/?"):
            err.write(HELP + "\n")
            err.flush()
            continue
        answer = session.respond(text)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            answer.close()  # records the partial turn now, not at garbage collection
            if session.last_stats is not None:
                session.last_stats.stop = "interrupted"
        except BadInputError as e:
            err.write(f"Error: {e}\n")
            err.flush()
            continue
        out.write("\n")
        out.flush()
        if session.last_stats is not None:
            err.write(format_stats(session.last_stats) + "\n")
            err.flush()
