"""Model-parallel shards merged back into whole tensors, one block of rows at a time.

Meta's 13B/30B/65B/70B downloads split each weight over 2/4/8 files (see tensor_names for
which dimension). A merged tensor is never assembled whole: `blocks()` says which slices of which
shards make up each block of its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from llamalocal.convert.errors import CheckpointError
from llamalocal.convert.tensor_names import COLUMN, ROW


@dataclass(frozen=True)
class ShardSlice:
    """Rows [start, stop) of one shard's piece of a tensor."""

    shard: int  # index into the shards, consolidated.NN order
    start: int
    stop: int


def blocks(name: str, shards: list, split_dim: int | None, shape: tuple[int, ...],
           max_elements: int) -> Iterator[tuple[int, list[ShardSlice]]]:
    """The merged tensor's rows in blocks of at most `max_elements` values (at least one row).

    Yields (first merged row, the shard slices that make up the block, to be glued side by side).
    A column-parallel block lies inside one shard; a row-parallel block takes the same rows from
    every shard; a replicated or unsplit tensor is read from consolidated.00 alone. A 1-D tensor
    is one block.
    """
    if len(shape) == 1:
        yield 0, [ShardSlice(0, 0, shape[0])]
        return
    rows, cols = shape
    step = max(1, max_elements // max(cols, 1))
    if len(shards) == 1 or split_dim is None:
        for a in range(0, rows, step):
            yield a, [ShardSlice(0, a, min(rows, a + step))]
    elif split_dim == COLUMN:
        offset = 0
        for i, s in enumerate(shards):
            n = s.tensors[name].shape[0]
            for a in range(0, n, step):
                yield offset + a, [ShardSlice(i, a, min(n, a + step))]
            offset += n
    elif split_dim == ROW:
        for a in range(0, rows, step):
            yield a, [ShardSlice(i, a, min(rows, a + step)) for i in range(len(shards))]
    else:
        raise AssertionError(f"split_dim {split_dim}")


def merged_shape(name: str, shapes: list[tuple[int, ...]], split_dim: int | None) -> tuple[int, ...]:
    """The whole tensor's shape from its shards' shapes; CheckpointError if they cannot combine."""
    first = shapes[0]
    if len(shapes) == 1 or split_dim is None or len(first) == 1:
        if any(s != first for s in shapes):
            raise CheckpointError(f"{name}: shards disagree on its shape {shapes}; are they from the same model?")
        return first
    other = 1 - split_dim
    if any(len(s) != 2 or s[other] != first[other] for s in shapes):
        raise CheckpointError(f"{name}: shard shapes {shapes} cannot be joined on dim {split_dim}; "
                              "are the shards from the same model?")
    total = sum(s[split_dim] for s in shapes)
    return (total, first[1]) if split_dim == 0 else (first[0], total)


def check_replicated(name: str, shards: list) -> None:
    """Norm weights are copied into every shard; differing copies mean mixed-up files."""
    ref = shards[0].rows(name, 0, shards[0].tensors[name].shape[0])
    for i, s in enumerate(shards[1:], start=1):
        if not np.array_equal(ref, s.rows(name, 0, s.tensors[name].shape[0])):
            raise CheckpointError(f"{name} differs between consolidated.00 and consolidated.{i:02d}; "
                                  "the shards are not from the same model")
