"""A tokenized folder read by index: its documents, and the packed rows training reads from them.

    TokenizedCorpus(folder)                   its documents by global index
    PackedRows(corpus, seq_len, pad_id)       row n of the documents packed into rows of seq_len tokens

The folder's layout (manifest.json, the ArrayRecord shards, offsets.npy) is described in
melt_jax/data/tokenized.py, which writes it. `PackedRows` lays the documents out exactly as
`pack_documents` does with all of them at once (same rows, loss mask and segment ids), but builds each
row on demand from the few documents it overlaps, found by binary search in the memory-mapped offsets:
no host holds the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from melt_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from melt_jax.errors import DataError

MANIFEST = "manifest.json"
OFFSETS = "offsets.npy"
FORMAT = "melt_jax.tokenized"
FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------------
# Tokenizer identity


def tokenizer_identity(spec: str, tokenizer: Tokenizer) -> dict[str, Any]:
    """What a tokenized corpus records of the tokenizer it was made with: the spec it was loaded from,
    its vocabulary size, eos and pad ids, and a fingerprint (sha256 of the tokenizer.json file and those
    ids; "byte" for the byte tokenizer) that a run compares with its own tokenizer's."""
    if isinstance(tokenizer, ByteTokenizer):
        fingerprint = "byte"
    elif isinstance(tokenizer, HFTokenizer):
        digest = hashlib.sha256(Path(tokenizer.path).read_bytes())
        digest.update(f"eos={tokenizer.eos_id},pad={tokenizer.pad_id}".encode())
        fingerprint = "sha256:" + digest.hexdigest()
    else:
        raise DataError(f"cannot fingerprint a tokenizer of type {type(tokenizer).__name__}")
    return {
        "spec": spec,
        "fingerprint": fingerprint,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "pad_id": int(tokenizer.pad_id),
    }


# --------------------------------------------------------------------------------------------------
# Reading


def is_tokenized(source: str) -> bool:
    """Whether `source` is a tokenized folder (a folder holding a manifest.json)."""
    return isinstance(source, str) and os.path.isfile(os.path.join(os.path.expanduser(source), MANIFEST))


class TokenizedCorpus:
    """The documents of a tokenized folder, by global index (shards in manifest order).

    `manifest` is the folder's manifest; `offsets` the memory-mapped int64 [D + 1] positions."""

    def __init__(self, folder: str | os.PathLike):
        import grain

        self.folder = Path(os.path.expanduser(folder))
        self.manifest = read_manifest(self.folder)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.offsets = np.load(self.folder / OFFSETS, mmap_mode="r")  # [D + 1]
        if self.offsets.shape != (self.manifest["num_documents"] + 1,):
            raise DataError(
                f"{self.folder / OFFSETS} has {self.offsets.shape[0] - 1} documents, the manifest "
                f"{self.manifest['num_documents']}"
            )
        paths = [str(self.folder / s["file"]) for s in self.manifest["shards"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"tokenized folder {self.folder} lacks the shard files {missing[:3]}")
        self.records = grain.sources.ArrayRecordDataSource(paths)

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def documents(self, start: int, stop: int) -> list[np.ndarray]:
        """The token ids of documents start..stop-1, int32 arrays."""
        records = self.records.__getitems__(list(range(start, stop)))
        return [np.frombuffer(r, self.dtype).astype(np.int32) for r in records]

    def check_tokenizer(self, spec: str, tokenizer: Tokenizer) -> None:
        """DataError unless `tokenizer` is the one the corpus was tokenized with (same fingerprint)."""
        recorded = self.manifest["tokenizer"]
        current = tokenizer_identity(spec, tokenizer)
        if recorded["fingerprint"] != current["fingerprint"]:
            raise DataError(
                f"the tokenized corpus {self.folder} was made with tokenizer {recorded['spec']!r} "
                f"(fingerprint {recorded['fingerprint'][:23]}, vocab {recorded['vocab_size']}), but the run's "
                f"tokenizer is {spec!r} (fingerprint {current['fingerprint'][:23]}, vocab {current['vocab_size']}); "
                "tokenize the corpus again with the run's tokenizer, or set data.tokenizer to the corpus's"
            )


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a tokenized folder, checked to be of this format and version."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder} is not a tokenized folder: it has no {MANIFEST}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a manifest of a {FORMAT} folder")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.get('version')!r}; this reader reads {FORMAT_VERSION}")
    return manifest


class PackedRows:
    """The documents of `corpus` packed into rows of `seq_len` tokens, a grain random-access source.

    Row n holds tokens n*S .. (n+1)*S - 1 of the concatenated documents, the last row right-padded
    with `pad_id`: row for row what `pack_documents(all documents, seq_len, pad_id)` makes. Rows
    `start`..`stop`-1 of that packing are this source's rows 0..len-1 (a held-out tail is cut off
    this way). Each element is {"tokens": int32 [S], "loss_mask": float32 [S], "segment_ids": int32 [S]}.
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, pad_id: int, start: int = 0, stop: int | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        self.corpus = corpus
        self.seq_len = seq_len
        self.pad_id = int(pad_id)
        total_rows = -(-corpus.num_tokens // seq_len)
        self.start = start
        self.stop = total_rows if stop is None else stop
        if not 0 <= self.start <= self.stop <= total_rows:
            raise DataError(f"rows {start}..{stop} are outside the {total_rows} rows of {corpus.folder}")

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        S, offsets = self.seq_len, self.corpus.offsets
        low = (self.start + index) * S
        high = min(low + S, self.corpus.num_tokens)
        first = int(np.searchsorted(offsets, low, side="right")) - 1  # the document holding token `low`
        last = int(np.searchsorted(offsets, high, side="left"))  # the first document starting at or after `high`
        docs = self.corpus.documents(first, last)
        flat = np.concatenate(docs)[low - int(offsets[first]) :][: high - low]
        tokens = np.full(S, self.pad_id, np.int32)  # [S]
        tokens[: len(flat)] = flat
        starts = np.zeros(S, bool)  # first token of a document
        doc_starts = np.asarray(offsets[first:last]) - low
        starts[doc_starts[doc_starts >= 0]] = True
        real = np.arange(S) < high - low
        loss_mask = real & ~starts
        loss_mask[0] = False
        # A row that begins inside a document (continued from the row before) counts it as segment 1.
        segment_ids = np.where(real, np.cumsum(starts) + (not starts[0]), 0)
        return {
            "tokens": tokens,
            "loss_mask": loss_mask.astype(np.float32),
            "segment_ids": segment_ids.astype(np.int32),
        }

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows start..stop-1 stacked: {name: [stop - start, S]}."""
        items = [self[i] for i in range(start, stop)]
        return {name: np.stack([item[name] for item in items]) for name in items[0]}
