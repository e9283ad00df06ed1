"""Packed rows of tokens: documents concatenated into rows of a fixed length, with the loss mask and
segment ids of every position (the convention is explained in melt_jax/data/pipeline.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from melt_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class PackedData:
    """Documents packed into N rows of S tokens.

    tokens       int32 [N, S]    token ids, right-padded with the pad id in the last row
    loss_mask    float32 [N, S]  weight of predicting tokens[n, s] from tokens[n, :s]
    segment_ids  int32 [N, S]    1-based index of the document within its row, 0 at padding
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray

    def __post_init__(self):
        for name in ("tokens", "loss_mask", "segment_ids"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 2:
                raise DataError(
                    f"PackedData.{name} must be a 2-d numpy array, got {getattr(array, 'shape', type(array))}"
                )
            if array.shape != self.tokens.shape:
                raise DataError(f"PackedData.{name} has shape {array.shape}, tokens has {self.tokens.shape}")

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by name, the form the loader reads rows of (melt_jax/data/loader.py, `ArrayRows`)."""
        return {"tokens": self.tokens, "loss_mask": self.loss_mask, "segment_ids": self.segment_ids}


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int, pad_id: int) -> PackedData:
    """Concatenates `docs` (token id sequences, each normally ending with eos) into rows of `seq_len`.

    Documents are taken as given (no eos is added) and in order; a document longer than the space
    left in a row continues at column 0 of the next row; the last row is right-padded with `pad_id`.
    Empty documents are skipped.
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
        raise DataError(f"pad_id must be a non-negative integer, got {pad_id!r}")
    arrays = []
    for i, doc in enumerate(docs):
        doc = np.asarray(doc)
        if doc.ndim != 1 or (doc.size and not np.issubdtype(doc.dtype, np.integer)):
            raise DataError(f"document {i} must be a 1-d sequence of integer token ids, got {doc.dtype} {doc.shape}")
        if doc.size and doc.min() < 0:
            raise DataError(f"document {i} has a negative token id {int(doc.min())}")
        if doc.size:
            arrays.append(doc.astype(np.int32))
    if not arrays:
        empty = np.zeros((0, seq_len), np.int32)
        return PackedData(empty, empty.astype(np.float32), empty.copy())

    lengths = np.array([len(a) for a in arrays])
    total = int(lengths.sum())
    num_rows = -(-total // seq_len)
    size = num_rows * seq_len
    flat = np.full(size, pad_id, np.int32)  # [N*S]
    flat[:total] = np.concatenate(arrays)
    starts = np.zeros(size, bool)  # first token of a document
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    real = np.arange(size) < total

    tokens = flat.reshape(num_rows, seq_len)  # [N, S]
    starts = starts.reshape(num_rows, seq_len)
    real = real.reshape(num_rows, seq_len)
    loss_mask = real & ~starts
    loss_mask[:, 0] = False
    # A row that begins inside a document (continued from the previous row) counts it as segment 1.
    segment_ids = np.cumsum(starts, axis=1) + ~starts[:, :1]
    segment_ids = np.where(real, segment_ids, 0)
    return PackedData(tokens, loss_mask.astype(np.float32), segment_ids.astype(np.int32))
