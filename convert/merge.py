"""Model-parallel shards merged back into whole tensors, one block of rows at a time.

Meta's 13B/30B/65B/70B downloads split each weight over 2/4/8 files (see tensor_names for
which dimension). A MergedTensor never assembles the whole tensor: `rows(a, b)` reads only the
slices of each shard that rows a..b need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convert.tensor_names import COLUMN, ROW
from llamalocal.errors import CheckpointError


@dataclass
class MergedTensor:
    meta_name: str
    shards: list  # list[convert.checkpoint.Checkpoint], in consolidated.NN order
    split_dim: int | None
    shape: tuple[int, ...]

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) == 2 else 1

    def rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 rows [start, stop) of the merged 2-D tensor, or the whole 1-D vector.
        `out`: an optional float32 buffer of exactly that many elements to fill."""
        if len(self.shape) == 1:
            return self.shards[0].rows(self.meta_name, 0, self.shape[0], out=out)
        if len(self.shards) == 1 or self.split_dim is None:
            return self.shards[0].rows(self.meta_name, start, stop, out=out)
        if self.split_dim == ROW:
            # every shard holds a vertical slice: glue the pieces of the same rows side by side
            dest = None if out is None else out.reshape(stop - start, self.shape[1])
            return np.concatenate([s.rows(self.meta_name, start, stop) for s in self.shards], axis=1, out=dest)
        if self.split_dim == COLUMN:
            parts, offset = [], 0
            for s in self.shards:
                n = s.tensors[self.meta_name].shape[0]
                a, b = max(start, offset), min(stop, offset + n)
                if a < b:
                    parts.append(s.rows(self.meta_name, a - offset, b - offset))
                offset += n
            if out is not None:
                return np.concatenate(parts, axis=0, out=out.reshape(stop - start, self.shape[1]))
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        raise AssertionError(f"split_dim {self.split_dim}")


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
