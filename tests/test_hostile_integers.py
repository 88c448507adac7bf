"""Hostile checkpoints, class "integer wrap": sizes computed in int64 wrap around (a shape whose
element count is 2**64 looks empty), ints too big to print, negative or boolean dimensions, and
an embedding far larger than its tokenizer. Every size is a Python int checked against the bytes
actually in the file, so each is refused with one line, exit 2, in bounded time and memory."""

from __future__ import annotations

import hostile
import numpy as np
import pytest
from hostile import (
    MARK,
    TUPLE,
    assert_refused,
    i,
    run_convert,
    s,
    state,
    tensor,
    tup,
    write_shard,
)

base_model, model = hostile.base_model, hostile.model  # fixtures

F32x4 = {"0": np.arange(4, dtype="<f4").tobytes()}


def long_text(digits: int) -> bytes:
    """A `digits`-digit int as protocol 0/1 writes it (LONG: decimal digits, then L)."""
    return b"L1" + b"0" * (digits - 1) + b"L\n"


def test_the_wrap_is_real_in_int64():
    """Control: numpy's int64 product of this shape is 0, which passed the old storage-size check."""
    assert int(np.prod((2**31, 2**31, 4), dtype=np.int64)) == 0
    assert int(np.prod((2**58, 64), dtype=np.int64)) == 0


@pytest.mark.parametrize("case, pkl, needle", [
    # 2**64 elements: int64 says 0, Python says far more than the 16 bytes stored
    ("wraps_to_zero", state((s("tok_embeddings.weight"), tensor((2**31, 2**31, 4), numel=4))), "runs past the end"),
    # the embedding the issue saw padded "forever": 2**58 rows of the model's 64 columns
    ("embedding_rows_wrap", state((s("tok_embeddings.weight"), tensor((2**58, 64), numel=4))), "not an int from 0"),
    ("embedding_rows_past_storage", state((s("tok_embeddings.weight"), tensor((2**32 - 1, 64), numel=4))),
     "runs past the end"),
    ("dim_of_2_64", state((s("w"), tensor((2**64,), numel=4))), "not an int from 0"),
    ("dim_of_600_digits", state((s("w"), tensor((10**600,), numel=4))), "an int of"),
    ("dim_of_4000_digits_as_text", state((s("w"), tensor(raw_shape=MARK + long_text(4000) + TUPLE, numel=4))),
     "an int of"),
    ("dim_of_5000_digits_as_text", state((s("w"), tensor(raw_shape=MARK + long_text(5000) + TUPLE, numel=4))),
     "corrupt"),
    ("negative_dim", state((s("w"), tensor(raw_shape=tup(i(-1)), numel=4))), "not an int from 0"),
    ("boolean_dim", state((s("w"), tensor(raw_shape=tup(b"\x88"), numel=4))), "not an int from 0"),
    ("too_many_dims", state((s("w"), tensor(raw_shape=tup(*[i(1)] * 9), raw_stride=tup(*[i(1)] * 9), numel=4))),
     "at most 8"),
    ("huge_offset", state((s("w"), tensor((4,), numel=4, offset=2**70))), "offset"),
    ("offset_past_storage", state((s("w"), tensor((4,), numel=4, offset=2**40))), "runs past the end"),
    ("huge_stride", state((s("w"), tensor((4,), numel=4, stride=(2**70,)))), "stride"),
    ("storage_numel_of_2_100", state((s("w"), tensor((4,), numel=2**100))), "an int of"),
    ("negative_storage_numel", state((s("w"), tensor((4,), numel=-4))), "malformed storage"),
    ("storage_numel_wraps", state((s("w"), tensor((4,), numel=2**62 + 1))), "the pickle says"),
])
def test_sizes(model, case, pkl, needle):
    write_shard(model, pkl, F32x4)
    assert_refused(run_convert(model), needle, clean=(model.parent,), max_seconds=10)


def test_embedding_far_larger_than_the_tokenizer(model):
    """A consistent checkpoint whose embedding and output have 3,000 rows for a 400-piece tokenizer:
    padding the vocabulary that far is refused (Code Llama pads 16)."""
    from llamalocal.convert.params import load_params
    from llamalocal.convert.sample import random_weights
    from llamalocal.convert.torch_save import save_state_dict

    (model / "consolidated.00.pth").unlink()
    save_state_dict(model / "consolidated.00.pth", dict(random_weights(load_params(model), 3000, 0)))
    assert_refused(run_convert(model), "3000 rows", "tokenizer belongs to another model", clean=(model.parent,))
