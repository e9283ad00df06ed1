"""The training batches of a random-access source of rows, read with grain.

    GrainBatches(rows, global_batch_size, seed=..., process_index=p, process_count=P)

The order is a pure function of (seed, position): the rows are shuffled by grain's index shuffle,
seeded with seed + epoch (each epoch in another order), and the epochs follow one another without a
gap, so a global batch may hold the last rows of one epoch and the first of the next. Global batch b
is rows b*G .. (b+1)*G - 1 of that stream; process p of P reads only its contiguous slice
b*G + p*G/P .. b*G + (p+1)*G/P - 1. A run on P processes therefore sees the same global batches as a
run on one.

The position is grain's iterator state (the number of batches drawn), saved with orbax in the
train-state checkpoint by grain's checkpoint handler (`checkpoint_item`), and restored from it: a
resumed run sees the same batches as an uninterrupted one. `state()` holds only the settings a resumed
run must share, checked by `restore`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from melt_jax.errors import DataError

# Rows are built on the host in a couple of threads, a few batches ahead of the training step.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class GrainBatches:
    """This process's slices of the global batches of `rows` (a grain random-access source whose
    elements are dicts of [S] arrays): an iterator of {name: [G/P, S]}."""

    def __init__(
        self,
        rows: Any,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ):
        for name, value, minimum in (
            ("global_batch_size", global_batch_size, 1),
            ("seed", seed, 0),
            ("process_count", process_count, 1),
            ("process_index", process_index, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if process_index >= process_count:
            raise DataError(f"process_index {process_index} must be < process_count {process_count}")
        if global_batch_size % process_count:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
        if len(rows) == 0:
            raise DataError("GrainBatches got no rows of data")
        if seed >= 2**32:
            raise DataError(f"seed must be below 2**32 for grain's shuffle, got {seed}")
        self.num_rows = len(rows)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        local = self.global_batch_size // process_count
        stream = grain.MapDataset.source(rows)
        if self.shuffle:
            stream = stream.shuffle(seed=self.seed)
        stream = stream.repeat()  # epochs back to back; shuffle reseeds each with seed + epoch
        # Local batch k of the stream is slice k % P of global batch k // P: process p takes every P-th.
        batches = stream.batch(local, drop_remainder=True)[process_index::process_count]
        self._iterator = batches.to_iter_dataset(READ_OPTIONS).__iter__()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    @property
    def checkpoint_item(self) -> Any:
        """The grain iterator whose state a checkpoint saves (grain.checkpoint.CheckpointSave)."""
        return self._iterator

    @property
    def step(self) -> int:
        """Global batches drawn so far."""
        return int(self._iterator.get_state()["next_index"])

    def state(self) -> dict[str, Any]:
        """The settings a resumed run must share (JSON-serialisable); the position is in `checkpoint_item`."""
        return {
            "loader": "grain",
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_rows": self.num_rows,
            "shuffle": self.shuffle,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Checks that `state` (a saved `state()`) has this loader's settings; the position itself is
        restored from the checkpoint's grain item."""
        current = self.state()
        for key in sorted(set(state) | set(current)):
            if state.get(key) != current.get(key):
                raise DataError(
                    f"data loader setting {key!r} is {state.get(key)!r} in the checkpoint but {current.get(key)!r} "
                    "in this run"
                )
