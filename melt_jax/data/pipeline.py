"""Data pipeline of the training program: text sources, tokenization, packing, and the batch iterator.

    load_text_dataset(source)      "synthetic[:N]", a local .txt/.json/.jsonl/.parquet file or folder,
                                   or a Hugging Face hub dataset name -> datasets.Dataset
    tokenize_dataset(...)          one int32 id array per document, each ending with eos
    pack_documents(...)            documents concatenated into rows of seq_len tokens -> PackedData
                                   (melt_jax/data/packing.py)
    BatchIterator                  deterministic, resumable, process-sliced batches of packed rows
    build_train_data(...)          load + tokenize + pack in one call

Packed rows carry a `loss_mask` in the convention "loss_mask[n, s] weighs the prediction of
tokens[n, s] from tokens[n, :s]": it is 0 at column 0, at padding, and at the first token of a
document that starts inside a row (it is not predictable from the previous document).

The iterator's order is a pure function of (seed, global batch number): epoch e visits the rows in the
order `np.random.default_rng((seed, e)).permutation(N)`, and process p of P takes its contiguous
slice of every global batch. A run on P processes therefore sees the same global batches as a run on
one, and a run resumed from `BatchIterator.state()` (a small JSON-serialisable dict) sees the same
batches as an uninterrupted run, even when resumed on a different number of processes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from melt_jax.data import synthetic
from melt_jax.data.packing import PackedData, pack_documents
from melt_jax.errors import DataError

if TYPE_CHECKING:
    from melt_jax.data.tokenizer import Tokenizer


# --------------------------------------------------------------------------------------------------
# Text sources

SYNTHETIC_SOURCE = "synthetic"
# Seeds of the embedded synthetic task per split: train and eval draw different examples.
SYNTHETIC_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}

# File extension -> `datasets` builder that reads it without network access.
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_text_dataset(
    source: str,
    *,
    split: str = "train",
    text_field: str = "text",
    data_files: str | Sequence[str] | None = None,
    cache_dir: str | None = None,
    synthetic_task: Mapping[str, Any] | None = None,
) -> datasets.Dataset:
    """The dataset named by `source`, checked to have a string column `text_field`.

    `source` is one of:
      - "synthetic" or "synthetic:N": the embedded arithmetic task (melt_jax.data.synthetic) with
        its default config, or with the SyntheticTaskConfig fields in `synthetic_task` changed (N
        examples); `split` ("train", "validation", "test") selects the seed;
      - a local .txt / .json / .jsonl / .parquet file, or a folder of files of one of these kinds
        (a .txt file gives one document per line, in column "text");
      - otherwise a Hugging Face hub dataset name, read with `datasets.load_dataset(source,
        split=split, data_files=data_files)` (needs network access).
    """
    if not isinstance(source, str) or not source:
        raise DataError(f"data source must be a non-empty string, got {source!r}")
    if source == SYNTHETIC_SOURCE or source.startswith(SYNTHETIC_SOURCE + ":"):
        if data_files is not None:
            raise DataError(f"data_files={data_files!r} cannot be combined with the synthetic source {source!r}")
        dataset = _load_synthetic(source, split, synthetic_task or {})
    elif os.path.exists(os.path.expanduser(source)):
        dataset = _load_local(os.path.expanduser(source), split, data_files, cache_dir)
    elif looks_like_path(source):
        raise DataError(f"data file or folder not found: {source}")
    else:
        dataset = _load_hub(source, split, data_files, cache_dir)
    check_text_field(dataset, text_field, source)
    return dataset


def check_text_field(dataset: datasets.Dataset, text_field: str, source: str) -> None:
    """Raises DataError unless `dataset` has a string column `text_field`."""
    if text_field not in dataset.column_names:
        raise DataError(
            f"data source {source!r} has no text field {text_field!r}; its columns are {dataset.column_names}"
        )
    feature = dataset.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"text field {text_field!r} of data source {source!r} is not a string column: {feature}")


def _load_synthetic(source: str, split: str, fields: Mapping[str, Any]) -> datasets.Dataset:
    if split not in SYNTHETIC_SPLIT_SEEDS:
        raise DataError(
            f"unknown split {split!r} of the synthetic source; expected one of {list(SYNTHETIC_SPLIT_SEEDS)}"
        )
    try:
        config = synthetic.SyntheticTaskConfig(**dict(fields, seed=SYNTHETIC_SPLIT_SEEDS[split]))
    except TypeError as e:
        raise DataError(f"bad synthetic task settings {dict(fields)}: {e}") from None
    if source != SYNTHETIC_SOURCE:
        count = source[len(SYNTHETIC_SOURCE) + 1 :]
        if not count.isdigit() or int(count) < 1:
            raise DataError(f"bad data source {source!r}: expected 'synthetic:N' with N a positive integer")
        config = dataclasses.replace(config, num_examples=int(count))
    return synthetic.synthetic_reasoning_dataset(config)


def looks_like_path(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path rather than a hub name."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or os.path.splitext(source)[1].lower() in FILE_BUILDERS
        or source.count("/") > 1  # hub names are "name" or "owner/name"
    )


def local_data_files(path: str) -> list[str]:
    """The data files of a local file or folder (sorted; hidden files skipped)."""
    if os.path.isfile(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    files = [f for f in files if os.path.splitext(f)[1].lower() in FILE_BUILDERS]
    if not files:
        raise DataError(f"data folder {path} holds no {'/'.join(FILE_BUILDERS)} files")
    return files


def _load_local(path: str, split: str, data_files: Any, cache_dir: str | None) -> datasets.Dataset:
    if data_files is not None:
        raise DataError(f"data_files={data_files!r} cannot be combined with the local path {path}")
    files = local_data_files(path)
    builders = {}
    for f in files:
        extension = os.path.splitext(f)[1].lower()
        if extension not in FILE_BUILDERS:
            raise DataError(f"unknown data file extension {extension!r} of {f}; expected one of {list(FILE_BUILDERS)}")
        builders.setdefault(FILE_BUILDERS[extension], f)
    if len(builders) > 1:
        raise DataError(f"data folder {path} mixes file kinds: {sorted(builders.values())}; use one kind per folder")
    (builder,) = builders
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, cache_dir=cache_dir)
    except Exception as e:  # malformed json / parquet surface as various library errors
        raise DataError(f"cannot read data from {path} as {builder}: {type(e).__name__}: {e}") from e


def _load_hub(name: str, split: str, data_files: Any, cache_dir: str | None) -> datasets.Dataset:
    try:
        dataset = datasets.load_dataset(name, split=split, data_files=data_files, cache_dir=cache_dir)
    except Exception as e:  # network, missing dataset, missing split, ...
        raise DataError(f"cannot load dataset {name!r} (split {split!r}) from the hub: {type(e).__name__}: {e}") from e
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"dataset {name!r} split {split!r} is a {type(dataset).__name__}, expected a datasets.Dataset")
    return dataset


# --------------------------------------------------------------------------------------------------
# Tokenization


def tokenize_dataset(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    text_field: str = "text",
    *,
    batch_size: int = 1024,
) -> list[np.ndarray]:
    """The token ids of every non-empty document of `dataset[text_field]` followed by eos: a list of
    int32 arrays [len + 1]. Empty documents (e.g. blank lines of a .txt file) are skipped."""
    if isinstance(dataset, datasets.Dataset):
        if text_field not in dataset.column_names:
            raise DataError(f"dataset has no text field {text_field!r}; its columns are {dataset.column_names}")
        texts = dataset[text_field][:]  # one read of the whole column as a list
    else:
        texts = []
        for i, row in enumerate(dataset):
            if text_field not in row:
                raise DataError(f"row {i} has no text field {text_field!r}; its fields are {sorted(row)}")
            texts.append(row[text_field])
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"row {i} of text field {text_field!r} is a {type(text).__name__}, not a str")
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    docs = []
    for start in range(0, len(texts), batch_size):
        chunk = [t for t in texts[start : start + batch_size] if t]
        for ids in tokenizer.encode_batch(chunk):
            docs.append(np.concatenate([np.asarray(ids, dtype=np.int32), eos]))
    return docs


# --------------------------------------------------------------------------------------------------
# Batch iterator


class BatchIterator:
    """Deterministic, resumable, process-sliced batches of the rows of `data`.

    Global batch k (k = 0, 1, ... over the whole run) holds G = `global_batch_size` rows:
      - drop_remainder=True: epoch e = k // (N // G) contributes its rows perm_e[j*G:(j+1)*G] with
        j = k % (N // G); the last N % G rows of each epoch's order are left out;
      - drop_remainder=False: the epochs' orders are concatenated into one stream and batch k is
        stream[k*G:(k+1)*G], so a batch may end one epoch and begin the next.
    perm_e is `np.random.default_rng((seed, e)).permutation(N)` when shuffling, else arange(N).
    Process p of P receives rows [p*G/P, (p+1)*G/P) of each global batch. `__next__` returns a dict
    of numpy arrays [G/P, ...] and never stops (epochs roll over).
    """

    def __init__(
        self,
        data: PackedData | Mapping[str, np.ndarray],
        global_batch_size: int,
        *,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        drop_remainder: bool = True,
        start_step: int = 0,
    ):
        arrays = data.as_dict() if isinstance(data, PackedData) else dict(data)
        if not arrays:
            raise DataError("BatchIterator needs at least one array")
        lengths = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise DataError(f"BatchIterator arrays must share their leading dimension, got {lengths}")
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.num_rows = next(iter(lengths.values()))
        _check_int("global_batch_size", global_batch_size, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("process_count", process_count, minimum=1)
        _check_int("process_index", process_index, minimum=0)
        _check_int("start_step", start_step, minimum=0)
        if process_index >= process_count:
            raise DataError(f"process_index {process_index} must be < process_count {process_count}")
        if global_batch_size % process_count:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
        if self.num_rows == 0:
            raise DataError("BatchIterator got no rows of data")
        if drop_remainder and global_batch_size > self.num_rows:
            raise DataError(
                f"global_batch_size {global_batch_size} exceeds the {self.num_rows} rows of data "
                "(use more data, a smaller batch, or drop_remainder=False)"
            )
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.step = int(start_step)
        self._cached_epoch: int | None = None
        self._cached_permutation: np.ndarray | None = None

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches in one pass over the data, N // G."""
        return self.num_rows // self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch of the first row of the next batch."""
        if self.drop_remainder:
            return self.step // self.batches_per_epoch
        return self.step * self.global_batch_size // self.num_rows

    def permutation(self, epoch: int) -> np.ndarray:
        """The order int64 [N] in which `epoch` visits the rows (only the latest one is kept)."""
        if epoch != self._cached_epoch:
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._cached_epoch, self._cached_permutation = epoch, order
        return self._cached_permutation

    def global_rows(self, step: int) -> np.ndarray:
        """The row indices int64 [G] of global batch `step`."""
        g = self.global_batch_size
        if self.drop_remainder:
            epoch, j = divmod(step, self.batches_per_epoch)
            return self.permutation(epoch)[j * g : (j + 1) * g]
        pieces = []
        position, end = step * g, (step + 1) * g  # positions in the stream of concatenated epochs
        while position < end:
            epoch, i = divmod(position, self.num_rows)
            take = min(self.num_rows - i, end - position)
            pieces.append(self.permutation(epoch)[i : i + take])
            position += take
        return np.concatenate(pieces)

    def local_rows(self, step: int) -> np.ndarray:
        """The row indices int64 [G/P] of this process's slice of global batch `step`."""
        size = self.local_batch_size
        return self.global_rows(step)[self.process_index * size : (self.process_index + 1) * size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`, without moving the iterator."""
        rows = self.local_rows(step)
        return {name: array[rows] for name, array in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state(self) -> dict[str, Any]:
        """The position of the iterator as a JSON-serialisable dict: `step` (batches yielded so far)
        and the settings a resumed iterator must share. Process index and count are not part of it:
        a run may resume on another number of processes."""
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_rows": self.num_rows,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Moves the iterator to the position of `state()`, checking that the settings match."""
        if "step" not in state:
            raise DataError(f"iterator state has no 'step': {dict(state)}")
        _check_int("state['step']", state["step"], minimum=0)
        current = self.state()
        for key, value in state.items():
            if key == "step":
                continue
            if key not in current:
                raise DataError(f"unknown field {key!r} in iterator state")
            if value != current[key]:
                raise DataError(f"iterator state field {key!r} is {value!r} but this iterator has {current[key]!r}")
        self.step = int(state["step"])


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Convenience


def build_train_data(
    source: str,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    split: str = "train",
    text_field: str = "text",
    data_files: str | Sequence[str] | None = None,
    max_documents: int | None = None,
    cache_dir: str | None = None,
) -> PackedData:
    """Loads `source` (see `load_text_dataset`), tokenizes its `text_field` with eos after every
    document, and packs it into rows of `seq_len` tokens padded with the tokenizer's pad id."""
    dataset = load_text_dataset(source, split=split, text_field=text_field, data_files=data_files, cache_dir=cache_dir)
    if max_documents is not None:
        _check_int("max_documents", max_documents, minimum=1)
        dataset = dataset.select(range(min(max_documents, len(dataset))))
    docs = tokenize_dataset(dataset, tokenizer, text_field)
    packed = pack_documents(docs, seq_len, tokenizer.pad_id)
    if packed.num_rows == 0:
        raise DataError(f"data source {source!r} (split {split!r}, field {text_field!r}) has no text")
    return packed
