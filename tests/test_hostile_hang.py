"""Hostile checkpoints, class "hang": small pickles whose objects share structure, so that hashing
them (as a dict key) or repr'ing them (into an error message) takes 2**depth steps. Each is
refused with one line, exit 2, in bounded time and memory."""

from __future__ import annotations

import subprocess
import sys

import hostile
import pytest
from hostile import (
    BINPERSID,
    BUILD,
    DUP,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    MARK,
    POP,
    PROTO2,
    REDUCE,
    SETITEMS,
    STOP,
    TUPLE2,
    assert_refused,
    g,
    get,
    i,
    put,
    run_convert,
    s,
    state,
    storage,
    tensor,
    tup,
    write_shard,
)

base_model, model = hostile.base_model, hostile.model  # fixtures


def tuple_dag(levels: int) -> bytes:
    """t0 = (); t(k+1) = (tk, tk): 2**levels leaves behind `levels` objects (DUP shares them)."""
    return EMPTY_TUPLE + (DUP + TUPLE2) * levels


def list_dag(levels: int, memo_base: int = 0) -> bytes:
    """l0 = []; l(k+1) = [lk, lk], through the memo. repr(l40) would print 2**40 brackets."""
    out = EMPTY_LIST + put(memo_base)
    for k in range(levels):
        out += POP + MARK + get(memo_base + k) + get(memo_base + k) + b"l" + put(memo_base + k + 1)
    return out


def test_the_hang_is_live_under_plain_pickle():
    """Control: Python's own unpickler does not finish hashing the 64-level key in 3 seconds."""
    data = PROTO2 + EMPTY_DICT + MARK + tuple_dag(64) + i(0) + SETITEMS + STOP
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                       input=data, capture_output=True, timeout=3)


def test_tuple_dag_as_dict_key(model):
    write_shard(model, PROTO2 + EMPTY_DICT + MARK + tuple_dag(64) + i(0) + SETITEMS + STOP)
    assert_refused(run_convert(model), "as a dict key", clean=(model.parent,), max_seconds=10)


def test_tuple_dag_as_key_of_the_metadata_dict(model):
    """The same key inside an inner dict (where model.state_dict() keeps its _metadata)."""
    inner = EMPTY_DICT + MARK + tuple_dag(64) + i(1) + SETITEMS
    write_shard(model, state((s("w"), tensor()), (s("_metadata"), inner)), {"0": bytes(16)})
    assert_refused(run_convert(model), "as a dict key", clean=(model.parent,), max_seconds=10)


# Places a value from the file reaches an error message: each must be described in a few words,
# never repr()'d. The 40-level list DAG would take 2**40 steps (and as much memory) to print.
DAG = list_dag(40, memo_base=1000)
MESSAGE_SITES = {
    "shape": state((s("w"), tensor(raw_shape=DAG))),
    "stride": state((s("w"), tensor(raw_stride=DAG))),
    "offset": state((s("w"), g("torch._utils", "_rebuild_tensor_v2")
                     + tup(storage(), DAG, tup(i(4)), tup(i(1)), b"\x89", EMPTY_DICT) + REDUCE)),
    "storage": state((s("w"), g("torch._utils", "_rebuild_tensor_v2")
                      + tup(DAG, i(0), tup(i(4)), tup(i(1)), b"\x89", EMPTY_DICT) + REDUCE)),
    "persistent_id": state((s("w"), DAG + BINPERSID)),
    "storage_key": state((s("w"), tup(s("storage"), g("torch", "FloatStorage"), DAG, s("cpu"), i(4)) + BINPERSID)),
    "storage_type": state((s("w"), tup(s("storage"), DAG, s("0"), s("cpu"), i(4)) + BINPERSID)),
    "numel": state((s("w"), tup(s("storage"), g("torch", "FloatStorage"), s("0"), s("cpu"), DAG) + BINPERSID)),
    "v3_dtype": state((s("w"), g("torch._utils", "_rebuild_tensor_v3")
                       + tup(storage(numel=16, cls="UntypedStorage"), i(0), tup(i(4)), tup(i(1)), b"\x89",
                             EMPTY_DICT, DAG) + REDUCE)),
    "parameter": state((s("w"), g("torch._utils", "_rebuild_parameter") + tup(DAG, b"\x89", EMPTY_DICT) + REDUCE)),
    "reduce_callable": state((s("w"), DAG + EMPTY_TUPLE + REDUCE)),
    "reduce_arguments": state((s("w"), g("torch._utils", "_rebuild_tensor_v2") + DAG + REDUCE)),
    "build_target": state((s("w"), DAG + EMPTY_DICT + BUILD)),
    "dict_key": PROTO2 + EMPTY_DICT + MARK + DAG + i(0) + SETITEMS + STOP,
    "tensor_name": PROTO2 + EMPTY_DICT + MARK + i(7) + tensor() + SETITEMS + STOP,
    "not_a_dict": PROTO2 + DAG + STOP,
}


@pytest.mark.parametrize("site", list(MESSAGE_SITES))
def test_shared_structure_never_reaches_a_message_whole(model, site):
    write_shard(model, MESSAGE_SITES[site], {"0": bytes(16)})
    message = assert_refused(run_convert(model), "consolidated.00.pth", clean=(model.parent,), max_seconds=10)
    assert len(message) < 600, message
