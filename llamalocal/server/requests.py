"""Request bodies: bytes to a checked `Request`, or ApiError(400) saying which field is wrong.

Pure Python, no model: everything a body can get wrong that does not need the vocabulary is
caught here (not JSON, not UTF-8, lone surrogates, nesting, types, ranges, NaN, unsupported
options); token ids and lengths are checked against the model in `llamalocal.server.prompts`.
Unknown fields are ignored, as OpenAI-compatible servers do; fields that would change what
the answer means and are not supported (logprobs, suffix, forced tool calls, images) are
refused rather than ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from llamalocal.server.config import MAX_CHOICES, MAX_GRAMMAR_BYTES, MAX_STOPS
from llamalocal.server.errors import bad_request

COMPLETION, CHAT = "completion", "chat"
MAX_NESTING = 100  # JSON levels in a body: deeper than any real request, shallower than a stack overflow
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's (and llama-cpp-python's) default for /v1/completions


@dataclass
class Sampling:
    """Sampling knobs with llama-cpp-python's server defaults. temperature 0 is plain argmax and,
    unless repeat_penalty is given, without the repeat penalty (as `llamalocal generate --temp 0`)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class GrammarSource:
    """What the output must match: GBNF text (`grammar`), any JSON (`json_object`) or a JSON
    schema (`json_schema`, or llama-cpp-python's `json_object` with a `schema`)."""

    kind: str  # "gbnf", "json", "schema"
    text: str = ""  # the GBNF, or the schema as JSON text


@dataclass
class Message:
    role: str  # "system" (also for "developer"), "user" or "assistant"
    text: str


@dataclass
class Request:
    kind: str  # COMPLETION or CHAT
    model: str | None = None
    prompt: str | list[int] = ""  # completions: text, or token ids
    messages: list[Message] = field(default_factory=list)  # chat
    max_tokens: int | None = None  # None: the kind's default; 0: until the context is full
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    echo: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    grammar: GrammarSource | None = None


# ---------------------------------------------------------------------------------------------
# Bytes to JSON
# ---------------------------------------------------------------------------------------------

def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, whatever Content-Type came with it (curl -d sends a form type)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid JSON: not UTF-8 at byte {e.start}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request(f"request body is nested too deeply (more than {MAX_NESTING} levels)") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request(f"invalid request: the body must be a JSON object, not {_type_name(data)}")
    _check_strings(data)
    return data


def _check_strings(data: Any) -> None:
    """Every string (keys too) encodable as UTF-8 (JSON allows a lone surrogate such as \\ud800;
    nothing downstream can use it) and no nesting deeper than MAX_NESTING. Iterative: a deep
    body must not be able to exhaust the stack here either."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "body")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_NESTING:
            raise bad_request(f"request body is nested too deeply (more than {MAX_NESTING} levels)")
        if isinstance(item, str):
            _utf8(item, where)
        elif isinstance(item, dict):
            for k, v in item.items():
                _utf8(k, where)
                stack.append((v, depth + 1, k if where == "body" else f"{where}.{k}"))
        elif isinstance(item, list):
            stack.extend((v, depth + 1, where) for v in item)


def _utf8(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise bad_request(f"{where} is not valid Unicode: it holds a lone surrogate (\\u{ord(bad):04x})",
                          param=where) from None


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


# ---------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------

class _Fields:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def given(self, name: str) -> bool:
        return self.data.get(name) is not None

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        v = self.data.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_request(f"{name} must be a number, not {_type_name(v)}", param=name)
        if not math.isfinite(v) or not lo <= v <= hi:
            raise bad_request(f"{name} must be between {lo:g} and {hi:g} (got {v})", param=name)
        return float(v)

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        v = self.data.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_request(f"{name} must be an integer, not {_type_name(v)}", param=name)
        if not lo <= v <= hi:
            raise bad_request(f"{name} must be between {lo} and {hi} (got {v})", param=name)
        return v

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.data.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad_request(f"{name} must be true or false, not {_type_name(v)}", param=name)
        return v

    def text(self, name: str) -> str | None:
        v = self.data.get(name)
        if v is not None and not isinstance(v, str):
            raise bad_request(f"{name} must be a string, not {_type_name(v)}", param=name)
        return v

    def obj(self, name: str) -> dict[str, Any] | None:
        v = self.data.get(name)
        if v is not None and not isinstance(v, dict):
            raise bad_request(f"{name} must be an object, not {_type_name(v)}", param=name)
        return v


def parse_request(kind: str, data: dict[str, Any]) -> Request:
    """A checked Request of `kind` (COMPLETION or CHAT) from a parsed body."""
    f = _Fields(data)
    req = Request(kind=kind, model=f.text("model"))
    if kind == CHAT:
        req.messages = _messages(data.get("messages"))
        _refuse_tools(data)
        if f.boolean("logprobs") or f.integer("top_logprobs", 0, 0, 20):
            raise bad_request("logprobs are not supported by this server", param="logprobs")
    else:
        req.prompt = _prompt(data.get("prompt"))
        if data.get("logprobs") is not None:
            raise bad_request("logprobs are not supported by this server", param="logprobs")
        if f.text("suffix"):
            raise bad_request("suffix (insertion) is not supported by this server", param="suffix")
        req.echo = f.boolean("echo")

    # max_completion_tokens is the current name of max_tokens; it wins where both are sent
    big = 1 << 31
    limit = f.integer("max_tokens", None, 0, big)
    if f.given("max_completion_tokens"):
        limit = f.integer("max_completion_tokens", None, 0, big)
    req.max_tokens = limit
    req.n = f.integer("n", 1, 1, MAX_CHOICES) or 1
    best_of = f.integer("best_of", None, 1, MAX_CHOICES) if kind == COMPLETION else None
    if best_of is not None and best_of != req.n:
        raise bad_request("best_of is not supported (only best_of equal to n)", param="best_of")
    req.stream = f.boolean("stream")
    options = f.obj("stream_options") or {}
    req.include_usage = _Fields(options).boolean("include_usage")
    req.stop = _stops(data.get("stop"))
    req.sampling = _sampling(f)
    req.grammar = _grammar(f)
    return req


def _sampling(f: _Fields) -> Sampling:
    s = Sampling()
    s.temperature = f.number("temperature", s.temperature, 0.0, 2.0)
    s.top_p = f.number("top_p", s.top_p, 0.0, 1.0)
    s.top_k = f.integer("top_k", s.top_k, 0, 1 << 31) or 0
    s.min_p = f.number("min_p", s.min_p, 0.0, 1.0)
    s.typical_p = f.number("typical_p", s.typical_p, 0.0, 1.0)
    default_repeat = 1.0 if s.temperature == 0 else s.repeat_penalty
    s.repeat_penalty = f.number("repeat_penalty", default_repeat, 1e-6, 100.0)
    s.frequency_penalty = f.number("frequency_penalty", 0.0, -2.0, 2.0)
    s.presence_penalty = f.number("presence_penalty", 0.0, -2.0, 2.0)
    s.seed = f.integer("seed", None, -(1 << 63), (1 << 64) - 1)
    bias = f.obj("logit_bias") or {}
    for key, value in bias.items():
        try:
            token = int(key, 10)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids (integers as strings), not {key!r}",
                              param="logit_bias") from None
        if token < 0:
            raise bad_request(f"logit_bias names token {token}; token ids are 0 or more", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be numbers from -100 to 100 (token {key}: {value!r})",
                              param="logit_bias")
        s.logit_bias[token] = float(value)
    return s


def _prompt(v: Any) -> str | list[int]:
    """OpenAI's prompt: a string, token ids, or a list of one of either."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise bad_request(f"prompt must be a string or a list of token ids, not {_type_name(v)}", param="prompt")
    if not v:
        return ""
    if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return list(v)
    if len(v) > 1:
        raise bad_request("send one prompt per request (got a list of several)", param="prompt")
    if isinstance(v[0], str) or (isinstance(v[0], list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in v[0])):
        return _prompt(v[0])
    raise bad_request("prompt must be a string, a list of token ids, or a list of one of either", param="prompt")


def _stops(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop takes at most {MAX_STOPS} strings (got {len(stops)})", param="stop")
    return tuple(s for s in stops if s)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(v: Any) -> list[Message]:
    if not isinstance(v, list):
        raise bad_request(f"messages must be a list of messages, not {_type_name(v)}", param="messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object, not {_type_name(m)}", param="messages")
        role = m.get("role")
        if role in ("tool", "function"):
            raise bad_request(f"{where}: tool results are not supported (this server never calls tools)",
                              param="messages")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(_ROLES)} (got {role!r})", param="messages")
        out.append(Message(_ROLES[role], _content(m.get("content"), where)))
    return out


def _content(content: Any, where: str) -> str:
    """Message content: a string or a list of parts, of which only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param="messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content: only text parts are supported (got {kind or _type_name(part)!r})",
                              param="messages")
        texts.append(part["text"])
    return "".join(texts)


def _refuse_tools(data: dict[str, Any]) -> None:
    """Tools may be offered (the model answers in text, as `auto` allows), but a call cannot be forced:
    these chat formats have no tool calls."""
    tools = data.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("tools must be a list", param="tools")
        for t in tools:
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                                  param="tools")
            names.add(fn["name"])
    for key, listed in (("tool_choice", names), ("function_call", None)):
        choice = data.get(key)
        if choice is None or choice in ("none", "auto"):
            continue
        if isinstance(choice, dict):
            fn = choice.get("function") if key == "tool_choice" else choice
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str):
                raise bad_request(f"{key} must be 'none', 'auto' or name a function", param=key)
            if listed is not None and name not in listed:
                raise bad_request(f"{key} names the tool {name!r}, which is not in tools", param=key)
        elif choice != "required":
            raise bad_request(f"{key} must be 'none', 'auto', 'required' or name a function (got {choice!r})",
                              param=key)
        raise bad_request(f"{key} cannot force a tool call: this server's chat formats have no tool calls; "
                          "use 'auto' or 'none'", param=key)


def _grammar(f: _Fields) -> GrammarSource | None:
    grammar = f.text("grammar")
    fmt = f.obj("response_format")
    kind = fmt.get("type") if fmt else None
    if kind not in (None, "text", "json_object", "json_schema"):
        raise bad_request(f"response_format.type must be text, json_object or json_schema (got {kind!r})",
                          param="response_format")
    if grammar and kind not in (None, "text"):
        raise bad_request("give either grammar or response_format, not both", param="grammar")
    if grammar:
        if len(grammar.encode("utf-8")) > MAX_GRAMMAR_BYTES:
            raise bad_request(f"grammar is over {MAX_GRAMMAR_BYTES} bytes", param="grammar")
        return GrammarSource("gbnf", grammar)
    if kind in (None, "text"):
        return None
    assert fmt is not None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with the schema",
                              param="response_format")
        schema = spec.get("schema")
    else:
        schema = fmt.get("schema")  # llama-cpp-python's extension of json_object
    if schema is None:
        return GrammarSource("json")
    if not isinstance(schema, dict):
        raise bad_request("the JSON schema must be an object", param="response_format")
    text = json.dumps(schema)
    if len(text.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise bad_request(f"the JSON schema is over {MAX_GRAMMAR_BYTES} bytes", param="response_format")
    return GrammarSource("schema", text)

