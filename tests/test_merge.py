"""convert.merge: how model-parallel shards combine, checked on the shapes alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from llamalocal.convert.families import COLUMN, ROW
from llamalocal.convert.merge import ShardSlice, blocks, merged_shape
from llamalocal.errors import CheckpointError


@dataclass
class _Info:
    shape: tuple[int, ...]


@dataclass
class _Shard:
    tensors: dict[str, _Info]


def _shards(shapes: list[tuple[int, ...]]) -> list[_Shard]:
    return [_Shard({"w": _Info(s)}) for s in shapes]


def _assemble(shards_data: list[np.ndarray], plan) -> np.ndarray:
    """Put the merged tensor together from the planned blocks, as the converter does."""
    rows = []
    for first, slices in plan:
        pieces = [shards_data[s.shard][s.start:s.stop] for s in slices]
        block = np.concatenate(pieces, axis=1)
        assert first == sum(r.shape[0] for r in rows)  # blocks come in row order, none skipped
        rows.append(block)
    return np.concatenate(rows, axis=0)


@pytest.mark.parametrize("max_elements", [1, 24, 25, 1000])
def test_column_parallel_blocks_stay_inside_one_shard(max_elements):
    data = [np.arange(5 * 4).reshape(5, 4), 100 + np.arange(7 * 4).reshape(7, 4)]
    shape = merged_shape("w", [d.shape for d in data], COLUMN)
    plan = list(blocks("w", _shards([d.shape for d in data]), COLUMN, shape, max_elements))
    assert all(len(slices) == 1 for _, slices in plan)
    assert all((s.stop - s.start) * 4 <= max(max_elements, 4) for _, [s] in plan)
    assert np.array_equal(_assemble(data, plan), np.concatenate(data, axis=0))


@pytest.mark.parametrize("max_elements", [1, 30, 1000])
def test_row_parallel_blocks_take_every_shard(max_elements):
    data = [np.arange(6 * 3).reshape(6, 3), 50 + np.arange(6 * 2).reshape(6, 2), 90 + np.arange(6).reshape(6, 1)]
    shape = merged_shape("w", [d.shape for d in data], ROW)
    assert shape == (6, 6)
    plan = list(blocks("w", _shards([d.shape for d in data]), ROW, shape, max_elements))
    assert all([s.shard for s in slices] == [0, 1, 2] for _, slices in plan)
    assert np.array_equal(_assemble(data, plan), np.concatenate(data, axis=1))


def test_unsplit_and_single_shard_tensors_read_shard_zero():
    assert list(blocks("w", _shards([(8,), (8,)]), None, (8,), 2)) == [(0, [ShardSlice(0, 0, 8)])]
    plan = list(blocks("w", _shards([(10, 4)]), COLUMN, (10, 4), 12))
    assert plan == [(0, [ShardSlice(0, 0, 3)]), (3, [ShardSlice(0, 3, 6)]), (6, [ShardSlice(0, 6, 9)]),
                    (9, [ShardSlice(0, 9, 10)])]


def test_shapes_that_cannot_join_are_refused():
    with pytest.raises(CheckpointError, match="cannot be joined"):
        merged_shape("w", [(4, 3), (4, 2)], COLUMN)
    with pytest.raises(CheckpointError, match="disagree"):
        merged_shape("norm", [(8,), (9,)], None)
