"""Model-parallel shards merged back into whole tensors, one block of rows at a time.

Meta's 13B/30B/65B/70B downloads split each weight over 2/4/8 files, Llama-3.1 405B over 8 or
16 (see convert.families for which dimension). A merged tensor is never assembled whole:
`blocks()` says which slices of which shards make up each block of its rows.

Replicated KV heads: a model-parallel size larger than the model's KV head count makes Meta's
`reshard_mp` (llama_models/checkpoint.py) repeat each KV head, so consecutive shards hold the
same wk/wv rows (405B's MP16 download: 8 KV heads over 16 shards, params.json says 16). The
converter writes the real heads once, from the first shard of each group, after checking that
the copies are equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from llamalocal.convert.direct_io import aligned_empty
from llamalocal.convert.errors import CheckpointError
from llamalocal.convert.families import COLUMN, ROW


@dataclass(frozen=True)
class ShardSlice:
    """Rows [start, stop) of one shard's piece of a tensor."""

    shard: int  # index into the shards, consolidated.NN order
    start: int
    stop: int


def blocks(name: str, shards: list, split_dim: int | None, shape: tuple[int, ...],
           max_elements: int, replicas: int = 1) -> Iterator[tuple[int, list[ShardSlice]]]:
    """The merged tensor's rows in blocks of at most `max_elements` values (at least one row).

    Yields (first merged row, the shard slices that make up the block, to be glued side by side).
    A column-parallel block lies inside one shard; a row-parallel block takes the same rows from
    every shard; a replicated or unsplit tensor is read from consolidated.00 alone. A 1-D tensor
    is one block. With `replicas` r > 1 (a column-parallel tensor whose consecutive groups of r
    shards hold copies of the same rows), a block is the same rows of each shard of one group:
    the first is the data, the others are copies to compare with it.
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
        for i in range(0, len(shards), replicas):
            n = shards[i].tensors[name].shape[0]
            for a in range(0, n, step):
                yield offset + a, [ShardSlice(i + j, a, min(n, a + step)) for j in range(replicas)]
            offset += n
    elif split_dim == ROW:
        for a in range(0, rows, step):
            yield a, [ShardSlice(i, a, min(rows, a + step)) for i in range(len(shards))]
    else:
        raise AssertionError(f"split_dim {split_dim}")


def merged_shape(name: str, shapes: list[tuple[int, ...]], split_dim: int | None,
                 replicas: int = 1) -> tuple[int, ...]:
    """The whole tensor's shape from its shards' shapes (each group of `replicas` shards counted
    once); CheckpointError if they cannot combine."""
    first = shapes[0]
    if len(shapes) == 1 or split_dim is None or len(first) == 1:
        if any(s != first for s in shapes):
            raise CheckpointError(f"{name}: shards disagree on its shape {shapes}; are they from the same model?")
        return first
    other = 1 - split_dim
    if any(len(s) != 2 or s[other] != first[other] for s in shapes):
        raise CheckpointError(f"{name}: shard shapes {shapes} cannot be joined on dim {split_dim}; "
                              "are the shards from the same model?")
    total = sum(s[split_dim] for s in shapes[::replicas])
    return (total, first[1]) if split_dim == 0 else (first[0], total)


def check_replicated(name: str, shards: list) -> None:
    """Norm weights are copied into every shard; differing copies mean mixed-up files."""
    ref = shards[0].rows(name, 0, shards[0].tensors[name].shape[0])
    for i, s in enumerate(shards[1:], start=1):
        if not np.array_equal(ref, s.rows(name, 0, s.tensors[name].shape[0])):
            raise CheckpointError(f"{name} differs between consolidated.00 and consolidated.{i:02d}; "
                                  "the shards are not from the same model")


def kv_replicas(shards: list, n_kv_heads: int) -> int:
    """How many consecutive shards hold copies of the same KV heads (1: none).

    Only a checkpoint with exactly one KV head per shard can be a resharded one (Meta repeats the
    heads so that each shard has one). The group size is read from layer 0's wk; `check_replicas`
    then compares every copy of every layer while the tensors stream.
    """
    name = "layers.0.attention.wk.weight"
    if len(shards) < 2 or n_kv_heads != len(shards) or any(name not in s.tensors for s in shards):
        return 1
    first = shards[0].rows(name)
    r = 1
    while r < len(shards) and np.array_equal(first, shards[r].rows(name)):
        r += 1
    if r == 1:
        return 1
    if len(shards) % r:
        raise CheckpointError(f"{name}: consolidated.00 to .{r - 1:02d} hold the same KV head, which does not "
                              f"divide {len(shards)} shards evenly; the shards are not from the same model")
    return r


def check_replicas(name: str, parts: list[np.ndarray], first_shard: int) -> None:
    """Copies of the same rows in a group of shards must be bit-for-bit equal."""
    ref = parts[0].view(np.uint8)
    for j, p in enumerate(parts[1:], start=1):
        if not np.array_equal(ref, p.view(np.uint8)):
            raise CheckpointError(
                f"{name}: consolidated.{first_shard + j:02d} should hold a copy of the KV heads in "
                f"consolidated.{first_shard:02d} (Meta repeats them when there are more shards than KV "
                "heads) but they differ; the shards are damaged or from different models")


def same_values(shard, a: str, b: str, max_elements: int) -> bool:
    """Whether tensors `a` and `b` of one shard hold the same bytes, compared a block of rows at a time."""
    ta, tb = shard.tensors[a], shard.tensors[b]
    if ta.shape != tb.shape or ta.dtype_name != tb.dtype_name:
        return False
    rows = ta.shape[0]
    step = max(1, max_elements // max(ta.numel // max(rows, 1), 1))
    size = shard.read_size(a, 0, min(step, rows))
    buf_a, buf_b = aligned_empty(size), aligned_empty(size)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if not np.array_equal(shard.read_rows(a, start, stop, buf_a).view(np.uint8),
                              shard.read_rows(b, start, stop, buf_b).view(np.uint8)):
            return False
    return True
