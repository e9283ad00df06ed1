"""Data pipeline of the training program: text sources, tokenization and packing.

    load_text_dataset(source)      "synthetic[:N]", a local .txt/.json/.jsonl/.parquet file or folder,
                                   or a Hugging Face hub dataset name -> datasets.Dataset
    tokenize_dataset(...)          one int32 id array per document, each ending with eos
    pack_documents(...)            documents concatenated into rows of seq_len tokens -> PackedData
                                   (melt_jax/data/packing.py)
    build_train_data(...)          load + tokenize + pack in one call

Packed rows carry a `loss_mask` in the convention "loss_mask[n, s] weighs the prediction of
tokens[n, s] from tokens[n, :s]": it is 0 at column 0, at padding, and at the first token of a
document that starts inside a row (it is not predictable from the previous document).

Training batches of the packed rows, like those of every source, come from the grain loader
(melt_jax/data/loader.py, `GrainBatches`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
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
