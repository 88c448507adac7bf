"""llamalocal.server's pure parts: request bodies to checked requests, chat messages to a dialogue,
and the grammar pre-check. No model, no server."""

from __future__ import annotations

import json

import pytest

from llamalocal.server.errors import ApiError
from llamalocal.server.grammar import lint
from llamalocal.server.prompts import messages_to_dialog
from llamalocal.server.requests import CHAT, COMPLETION, parse_json, parse_request


def parse(kind: str, **body) -> object:
    return parse_request(kind, parse_json(json.dumps(body).encode()))


def test_defaults_follow_llama_cpp_python_and_temperature_zero_is_plain_argmax():
    req = parse(COMPLETION, prompt="x")
    assert (req.max_tokens, req.n, req.stream, req.sampling.temperature, req.sampling.repeat_penalty) == \
        (None, 1, False, 0.8, 1.1)
    assert parse(COMPLETION, prompt="x", temperature=0).sampling.repeat_penalty == 1.0
    assert parse(COMPLETION, prompt="x", temperature=0, repeat_penalty=1.3).sampling.repeat_penalty == 1.3


def test_max_completion_tokens_is_max_tokens_and_wins():
    assert parse(CHAT, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7).max_tokens == 7
    assert parse(CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=3, max_completion_tokens=7).max_tokens == 7
    assert parse(COMPLETION, prompt="x", max_tokens=3).max_tokens == 3


@pytest.mark.parametrize("prompt,expected", [("x", "x"), (["x"], "x"), ([1, 2], [1, 2]), ([[1, 2]], [1, 2]),
                                             (None, ""), ([], "")])
def test_prompt_forms(prompt, expected):
    assert parse(COMPLETION, prompt=prompt).prompt == expected


def test_developer_is_system_and_parts_are_joined():
    req = parse(CHAT, messages=[{"role": "developer", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "Who "}, {"type": "text", "text": "is it?"}]}])
    assert [(m.role, m.text) for m in req.messages] == [("system", "Be brief."), ("user", "Who is it?")]
    system, turns, pending = messages_to_dialog(req.messages)
    assert (system, turns, pending) == ("Be brief.", [], "Who is it?")


def test_dialogue_needs_the_user_last():
    req = parse(CHAT, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(ApiError, match="last message must be the user's"):
        messages_to_dialog(req.messages)


def test_response_formats():
    msgs = [{"role": "user", "content": "hi"}]
    assert parse(CHAT, messages=msgs, response_format={"type": "text"}).grammar is None
    assert parse(CHAT, messages=msgs, response_format={"type": "json_object"}).grammar.kind == "json"
    g = parse(CHAT, messages=msgs, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}).grammar
    assert (g.kind, json.loads(g.text)) == ("schema", {"type": "object"})
    assert parse(COMPLETION, prompt="x", grammar='root ::= "a"').grammar.kind == "gbnf"


@pytest.mark.parametrize("body,needle", [
    (b"\xff", "not UTF-8"), (b"{", "not valid JSON"), (b"[]", "must be a JSON object"), (b"null", "must be a JSON object"),
    (b'{"a": NaN, "prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
])
def test_bad_bodies(body, needle):
    with pytest.raises(ApiError) as e:
        parse_request(COMPLETION, parse_json(body))
    assert e.value.status == 400 and needle in e.value.message


@pytest.mark.parametrize("gbnf,problem", [
    ('root ::= "a"{5,2}', "maximum below its minimum"),
    ('root ::= "a"{ 3 , 1 }', "maximum below its minimum"),
    ("root ::= " + "(" * 101 + '"a"' + ")" * 101, "nested more than 100"),
    ('root ::= "a"{2,5} "b"{3} "c"{1,}', None),
    ('root ::= "{5,2}" [{(] "\\"{5,2}"', None),  # inside literals and classes: text, not syntax
    ('root ::= "a" # a comment ((((( {5,2}\n', None),
    ("root ::= " + "(" * 100 + '"a"' + ")" * 100, None),
])
def test_grammar_lint(gbnf, problem):
    found = lint(gbnf)
    assert (found is None) if problem is None else (problem in (found or ""))
