"""The training batches of every data source, read with grain.

    GrainBatches(rows, global_batch_size, seed=..., order=..., process_index=p, process_count=P)

`rows` is a grain random-access source whose elements are dicts of [S] arrays (a tokenized corpus's
`PackedRows`), or rows held in memory (`PackedData`, or a dict of arrays sharing their leading
dimension, wrapped in `ArrayRows`). Its rows form one stream, epoch after epoch, in one of two orders:

  - order="permutation": epoch e visits the rows in the order `np.random.default_rng((seed, e)).permutation(N)`
    (arange(N) with shuffle=False). With drop_remainder (its default) each epoch ends at its last full
    global batch, the last N % G rows of its order left out; without, the epochs follow one another
    and a global batch may hold the end of one and the start of the next. The order of the synthetic
    task and of text sources: the embedded default's measured figures depend on these exact batches.
  - order="index_shuffle": grain's index shuffle seeded with seed + epoch (index order with
    shuffle=False), epochs back to back. It holds no permutation in memory, whatever the number of rows:
    the order of a tokenized corpus.

Global batch b is rows b*G .. (b+1)*G - 1 of the stream; process p of P reads only its contiguous
slice b*G + p*G/P .. b*G + (p+1)*G/P - 1. A run on P processes therefore sees the same global batches
as a run on one.

The position is grain's iterator state, the number of global batches drawn (the same on every
process), saved with orbax in the train-state checkpoint by grain's checkpoint handler
(`checkpoint_item`) and restored from it: a resumed run sees the same batches as an uninterrupted one.
`state()` holds only the settings a resumed run must share, checked by `restore`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from melt_jax.data.packing import PackedData
from melt_jax.errors import DataError

# Rows are built on the host in a couple of threads, a few batches ahead of the training step.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
ORDERS = ("permutation", "index_shuffle")


class ArrayRows:
    """Rows held in memory as a grain random-access source: element n is {name: array[n]}."""

    def __init__(self, data: PackedData | Mapping[str, np.ndarray]):
        arrays = data.as_dict() if isinstance(data, PackedData) else dict(data)
        if not arrays:
            raise DataError("the rows of data need at least one array")
        lengths = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise DataError(f"the arrays of the rows of data must share their leading dimension, got {lengths}")
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.num_rows = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: array[index] for name, array in self.arrays.items()}


class EpochPermutations(grain.MapDataset):
    """The first `epoch_length` rows of each epoch's order of `parent`: index i of epoch e = i // L is
    parent[perm_e[i % L]], perm_e = `np.random.default_rng((seed, e)).permutation(len(parent))` (arange
    without shuffle). Its length is one epoch; `repeat()` after it reads the epochs that follow."""

    _MUTATES_ELEMENT_SPEC = False  # its elements are the parent's

    def __init__(self, parent: grain.MapDataset, *, seed: int, shuffle: bool, epoch_length: int):
        super().__init__(parent)
        self._seed, self._shuffle, self._length = seed, shuffle, epoch_length
        self._num_rows = len(parent)
        # The reading threads ask for the epochs around the position: the last two permutations are kept.
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"EpochPermutations(seed={self._seed}, shuffle={self._shuffle}, epoch_length={self._length})"

    def permutation(self, epoch: int) -> np.ndarray:
        """The order int64 [N] in which `epoch` visits the rows."""
        with self._lock:
            order = self._cache.get(epoch)
            if order is None:
                if self._shuffle:
                    order = np.random.default_rng((self._seed, epoch)).permutation(self._num_rows)
                else:
                    order = np.arange(self._num_rows)
                self._cache = {e: o for e, o in self._cache.items() if e >= epoch - 1}
                self._cache[epoch] = order
            return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, self._length)
        return self._parent[int(self.permutation(epoch)[i])]


class GrainBatches:
    """This process's slices of the global batches of `rows` (a grain random-access source of dicts of
    [S] arrays, or PackedData / a dict of arrays held in memory): an iterator of {name: [G/P, S]}.
    `drop_remainder` (order="permutation" only) defaults to True there, and is False for the index
    shuffle, whose epochs always follow one another."""

    def __init__(
        self,
        rows: Any,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        order: str = "index_shuffle",
        drop_remainder: bool | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if isinstance(rows, (PackedData, Mapping)):
            rows = ArrayRows(rows)
        if drop_remainder is None:
            drop_remainder = order == "permutation"
        _check_settings(len(rows), global_batch_size, seed, order, drop_remainder, process_index, process_count)
        self.num_rows = len(rows)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.order = order
        self.drop_remainder = bool(drop_remainder)
        local = self.global_batch_size // process_count
        stream = grain.MapDataset.source(rows)
        if order == "permutation":
            epoch_length = self.num_rows - self.num_rows % self.global_batch_size if drop_remainder else self.num_rows
            stream = EpochPermutations(stream, seed=self.seed, shuffle=self.shuffle, epoch_length=epoch_length)
        elif self.shuffle:
            stream = stream.shuffle(seed=self.seed)
        stream = stream.repeat()  # epoch e of the stream reads index e * len + i of the one before
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
            "order": self.order,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_rows": self.num_rows,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
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


def _check_settings(
    num_rows: int,
    global_batch_size: int,
    seed: int,
    order: str,
    drop_remainder: bool,
    process_index: int,
    process_count: int,
) -> None:
    """DataError naming the first setting of GrainBatches that cannot be used."""
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
    if order not in ORDERS:
        raise DataError(f"unknown batch order {order!r}; expected one of {list(ORDERS)}")
    if drop_remainder and order != "permutation":
        raise DataError("drop_remainder needs order='permutation': the index shuffle's epochs follow one another")
    if num_rows == 0:
        raise DataError("GrainBatches got no rows of data")
    if drop_remainder and global_batch_size > num_rows:
        raise DataError(
            f"global_batch_size {global_batch_size} exceeds the {num_rows} rows of data "
            "(use more data, a smaller batch, or drop_remainder=False)"
        )
    if order == "index_shuffle" and seed >= 2**32:
        raise DataError(f"seed must be below 2**32 for grain's shuffle, got {seed}")
