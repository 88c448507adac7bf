"""Hostile checkpoints, class "crash": pickles that make the interpreter itself die (SIGSEGV) when
an object built from them is hashed or walked. Each is refused with one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import hostile
import pytest
from hostile import (
    APPEND,
    DUP,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    MARK,
    POP,
    PROTO2,
    SETITEMS,
    STOP,
    TUPLE1,
    assert_refused,
    get,
    i,
    put,
    run_convert,
    s,
    state,
    tensor,
    write_shard,
)

base_model, model = hostile.base_model, hostile.model  # fixtures

DEEP = 150_000


def deep_tuple_key() -> bytes:
    """{((((...)))): 0} with the key 150,000 tuples deep: hashing it overflows the C stack."""
    return PROTO2 + EMPTY_DICT + MARK + EMPTY_TUPLE + TUPLE1 * DEEP + i(0) + SETITEMS + STOP


DEEP_LISTS = 60_000  # within the opcode and memo budgets


def deep_list_value() -> bytes:
    """{"w": tensor, "x": [[[...]]]}: lists 60,000 deep, linked one inside the other after all were
    made and stored in the memo, which a depth count by construction does not see. Nothing hashes,
    compares or prints a value, and freeing it does not recurse."""
    made = b"".join(EMPTY_LIST + put(n) + POP for n in range(DEEP_LISTS))
    links = b"".join(get(n - 1) + get(n) + APPEND + POP for n in range(1, DEEP_LISTS))
    return PROTO2 + made + links + state((s("w"), tensor()), (s("x"), get(0)))[len(PROTO2):]


def test_the_crash_is_live_under_plain_pickle(tmp_path):
    """Control: Python's own unpickler dies of the deep key (so the refusal below is a real one)."""
    r = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                       input=deep_tuple_key(), capture_output=True, timeout=60)
    assert r.returncode < 0 or r.returncode >= 128, r  # killed by a signal (SIGSEGV), not an exception


def test_deep_tuple_as_dict_key(model):
    write_shard(model, deep_tuple_key())
    assert_refused(run_convert(model), "consolidated.00.pth", "more than 100 deep", clean=(model.parent,))


@pytest.mark.parametrize("depth", [1, 50, 150])
def test_a_key_within_the_depth_budget_is_still_refused_before_hashing(model, depth):
    write_shard(model, PROTO2 + EMPTY_DICT + MARK + EMPTY_TUPLE + TUPLE1 * depth + i(0) + SETITEMS + STOP)
    needle = "as a dict key" if depth < 99 else "more than 100 deep"
    assert_refused(run_convert(model), needle, clean=(model.parent,))


def test_deep_lists_built_through_the_memo_are_harmless(model):
    """Depth grown through shared references escapes the depth count; it must still be harmless:
    the value is not a tensor, so the file holds one tensor 'w', whose shape params.json rejects."""
    write_shard(model, deep_list_value(), {"0": bytes(16)})
    assert_refused(run_convert(model), clean=(model.parent,))


def test_many_marks_at_once(model):
    write_shard(model, PROTO2 + MARK * 100_000 + STOP)
    assert_refused(run_convert(model), "MARKs", clean=(model.parent,))


def test_dup_chain_of_a_dict_is_fine_for_the_scan(model):
    """DUP pushes the same object again: 200,000 of them cost a stack slot each, within budget,
    and the file is then refused for what it is (no tensors)."""
    write_shard(model, PROTO2 + EMPTY_DICT + DUP * 200_000 + STOP)
    assert_refused(run_convert(model), "holds no tensors", clean=(model.parent,))
