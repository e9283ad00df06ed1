"""A corpus tokenized once into ArrayRecord shards (melt_jax/data/tokenized_corpus.py reads them).

    tokenize_to_shards(source, output, ...)   text files (or a hub dataset, streamed) -> a tokenized folder

A tokenized folder holds:

    manifest.json                 format and version, the tokenizer's identity (spec, fingerprint, vocab
                                  size, eos and pad ids), the token dtype, and per shard its file, number
                                  of documents and of tokens
    shard-00000.array_record ...  one record per document: its token ids followed by eos, as the
                                  little-endian bytes of the manifest's dtype (uint16 when the vocabulary
                                  fits, else int32); documents are in source order (files sorted by name,
                                  records in file order), empty documents skipped
    offsets.npy                   int64 [D + 1]: the position of every document in the concatenation of
                                  all documents (offsets[d + 1] - offsets[d] is document d's length)

Tokenizing streams: each worker process reads one piece of the input (a byte range of a .txt or .jsonl
file, a row group of a .parquet file, a whole .json array file, a shard of a streamed hub dataset),
tokenizes it batch by batch and writes one shard, so no process holds more than a batch of text and
its own shard's document lengths. The folder is written beside its destination under a temporary name
and renamed when complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from melt_jax.data.pipeline import FILE_BUILDERS, local_data_files, looks_like_path
from melt_jax.data.tokenized_corpus import FORMAT, FORMAT_VERSION, MANIFEST, OFFSETS, tokenizer_identity
from melt_jax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from melt_jax.errors import DataError

# Records are written one per chunk so that reading one document decodes only that document.
WRITER_OPTIONS = "group_size:1"
# Texts tokenized per call of the tokenizer.
TEXT_BATCH = 1024
# .txt and .jsonl files are split into pieces of about this many bytes, one shard each.
DEFAULT_PIECE_BYTES = 64 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype the corpus stores ids of a `vocab_size` vocabulary in."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
    """The ids of every text followed by eos, one `dtype` array [len + 1] each (texts are non-empty)."""
    if isinstance(tokenizer, ByteTokenizer):  # its ids are the UTF-8 bytes: no Python list of ints
        encoded = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    else:
        encoded = [np.asarray(ids) for ids in tokenizer.encode_batch(list(texts))]
    eos = np.array([tokenizer.eos_id], dtype)
    return [np.concatenate([ids.astype(dtype), eos]) for ids in encoded]


# --------------------------------------------------------------------------------------------------
# Pieces of the input


@dataclasses.dataclass(frozen=True)
class Piece:
    """One worker's share of the input, written to one shard.

    kind   "lines" (a .txt file: one document per line), "jsonl" (one JSON object per line), "json"
           (a file holding one JSON array of objects), "parquet" (one row group), "hub" (one shard of a
           streamed hub dataset)
    path   the file, or the hub dataset name
    start, stop   byte range of a lines/jsonl file (the lines that start in it), the row group index of
                  a parquet file (start), the shard index and count of a hub dataset
    """

    kind: str
    path: str
    start: int = 0
    stop: int = 0
    split: str = "train"


def _file_pieces(path: str, piece_bytes: int) -> list[Piece]:
    extension = os.path.splitext(path)[1].lower()
    if extension == ".parquet":
        import pyarrow.parquet as pq

        try:
            groups = pq.ParquetFile(path).metadata.num_row_groups
        except Exception as e:  # pyarrow raises its own error kinds for a file that is not parquet
            raise DataError(f"cannot read {path} as parquet: {type(e).__name__}: {e}") from None
        return [Piece("parquet", path, g) for g in range(groups)]
    if extension == ".json" and _is_json_array(path):
        return [Piece("json", path)]
    kind = "lines" if extension == ".txt" else "jsonl"
    size = os.path.getsize(path)
    bounds = list(range(0, size, piece_bytes)) + [size]
    return [Piece(kind, path, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _is_json_array(path: str) -> bool:
    """Whether a .json file holds one JSON array (read whole) rather than JSON lines (streamed)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head and f.tell() < os.path.getsize(path):  # leading whitespace longer than a read
            head = f.read(4096).lstrip()
    return head.startswith(b"[")


def plan_pieces(source: str, *, split: str, workers: int, piece_bytes: int) -> list[Piece]:
    """The pieces of `source` (a local .txt/.json/.jsonl/.parquet file or folder, or a hub dataset
    name), in document order."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        files = local_data_files(path)
        kinds = {FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
        if len(kinds) > 1:
            raise DataError(f"data folder {path} mixes file kinds ({sorted(kinds)}); use one kind per folder")
        return [piece for f in files for piece in _file_pieces(f, piece_bytes)]
    if looks_like_path(source):
        raise DataError(f"data file or folder not found: {source}")
    import datasets

    try:
        stream = datasets.load_dataset(source, split=split, streaming=True)
    except Exception as e:  # network, missing dataset, missing split, ...
        raise DataError(
            f"cannot stream dataset {source!r} (split {split!r}) from the hub: {type(e).__name__}: {e}"
        ) from e
    count = max(1, min(workers, stream.num_shards))
    return [Piece("hub", source, i, count, split) for i in range(count)]


def _line_range(path: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) of every line of `path` that starts in [start, stop)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that starts before `start` belongs to the piece before
        while (position := f.tell()) < stop:
            line = f.readline()
            if not line:
                break
            yield position, line.rstrip(b"\n").rstrip(b"\r")


def _texts(piece: Piece, text_field: str) -> Iterator[str]:
    """The texts of `piece`'s records, in order (empty ones included)."""
    if piece.kind == "lines":
        for position, line in _line_range(piece.path, piece.start, piece.stop):
            yield _decode(line, piece.path, position)
    elif piece.kind == "jsonl":
        for position, line in _line_range(piece.path, piece.start, piece.stop):
            if line.strip():
                yield _text_of(_json_record(line, piece.path, position), text_field, f"byte {position} of {piece.path}")
    elif piece.kind == "json":
        with open(piece.path, "rb") as f:
            records = _json_record(f.read(), piece.path, 0)
        if not isinstance(records, list):
            raise DataError(f"{piece.path} does not hold a JSON array of records")
        for i, record in enumerate(records):
            yield _text_of(record, text_field, f"record {i} of {piece.path}")
    elif piece.kind == "parquet":
        yield from _parquet_texts(piece, text_field)
    else:
        yield from _hub_texts(piece, text_field)


def _decode(line: bytes, path: str, position: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"the line at byte {position} of {path} is not UTF-8 text: {e}") from None


def _json_record(text: bytes, path: str, position: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"the record at byte {position} of {path} is not valid JSON: {e}") from None


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with a text field")
    if text_field not in record:
        raise DataError(f"{where} has no text field {text_field!r}; its fields are {sorted(record)}")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"text field {text_field!r} of {where} is a {type(text).__name__}, not a string")
    return text


def _parquet_texts(piece: Piece, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(piece.path)
    if text_field not in file.schema_arrow.names:
        raise DataError(f"{piece.path} has no text field {text_field!r}; its columns are {file.schema_arrow.names}")
    column = file.read_row_group(piece.start, columns=[text_field]).column(0)
    for i, text in enumerate(column.to_pylist()):
        if not isinstance(text, str):
            raise DataError(
                f"row {i} of row group {piece.start} of {piece.path}: text field {text_field!r} is a "
                f"{type(text).__name__}, not a string"
            )
        yield text


def _hub_texts(piece: Piece, text_field: str) -> Iterator[str]:
    import datasets

    stream = datasets.load_dataset(piece.path, split=piece.split, streaming=True)
    for i, record in enumerate(stream.shard(num_shards=piece.stop, index=piece.start)):
        yield _text_of(record, text_field, f"record {i} of shard {piece.start} of {piece.path}")


# --------------------------------------------------------------------------------------------------
# Writing


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a worker needs to write shard `index` from `piece` (picklable: the tokenizer is loaded
    again in the worker from its spec)."""

    index: int
    piece: Piece
    folder: str
    tokenizer: str
    eos_token: str | None
    pad_token: str | None
    text_field: str


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        if text:  # empty documents (blank lines) are skipped, as by tokenize_dataset
            batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shard(job: _Job) -> tuple[int, int, int]:
    """Tokenizes `job.piece` into `job.folder`/shard-<index>.array_record and writes its document
    lengths (int64 [D]) beside it; returns (index, documents, tokens). A piece without text writes no
    shard."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tokenizer = load_tokenizer(job.tokenizer, eos_token=job.eos_token, pad_token=job.pad_token)
    dtype = token_dtype(tokenizer.vocab_size)
    path = os.path.join(job.folder, shard_name(job.index))
    lengths: list[int] = []
    writer = None
    try:
        for batch in _batches(_texts(job.piece, job.text_field), TEXT_BATCH):
            if writer is None:
                writer = ArrayRecordWriter(path, WRITER_OPTIONS)
            for ids in encode_documents(tokenizer, batch, dtype):
                writer.write(ids.tobytes())
                lengths.append(len(ids))
    finally:
        if writer is not None:
            writer.close()
    if lengths:
        np.save(path + ".lengths.npy", np.asarray(lengths, np.int64))
    return job.index, len(lengths), int(sum(lengths))


@dataclasses.dataclass(frozen=True)
class TokenizeReport:
    """What `tokenize_to_shards` wrote: the folder, its documents, tokens and shards, and the time."""

    output: Path
    num_documents: int
    num_tokens: int
    num_shards: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


def tokenize_to_shards(
    source: str,
    output: str | os.PathLike,
    *,
    tokenizer: str = "byte",
    text_field: str = "text",
    split: str = "train",
    workers: int = 1,
    eos_token: str | None = None,
    pad_token: str | None = None,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    overwrite: bool = False,
) -> TokenizeReport:
    """Tokenizes the `text_field` of every record of `source` (see `plan_pieces`) with the tokenizer
    `tokenizer` ("byte" or a tokenizer.json path), eos after every document, into the tokenized folder
    `output` (layout in the module docstring), with `workers` processes. Bad input raises DataError and
    leaves no `output` behind."""
    from melt_jax.checkpoint import atomic_directory

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers must be an integer >= 1, got {workers!r}")
    if isinstance(piece_bytes, bool) or not isinstance(piece_bytes, int) or piece_bytes < 1:
        raise DataError(f"piece_bytes must be an integer >= 1, got {piece_bytes!r}")
    output = Path(output)
    if os.path.lexists(output) and not overwrite:
        raise DataError(f"output {output} already exists (pass overwrite=True / --overwrite to replace it)")
    loaded = load_tokenizer(tokenizer, eos_token=eos_token, pad_token=pad_token)
    identity = tokenizer_identity(tokenizer, loaded)
    started = time.perf_counter()
    pieces = plan_pieces(source, split=split, workers=workers, piece_bytes=piece_bytes)
    with atomic_directory(output, overwrite=overwrite) as folder:
        jobs = [_Job(i, p, str(folder), tokenizer, eos_token, pad_token, text_field) for i, p in enumerate(pieces)]
        results = sorted(_run_jobs(jobs, workers))
        shards = [(index, docs, tokens) for index, docs, tokens in results if docs]
        if not shards:
            raise DataError(f"data source {source!r} (field {text_field!r}) has no text")
        _write_offsets(folder, [index for index, _, _ in shards])
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": source,
            "text_field": text_field,
            "tokenizer": identity,
            "dtype": token_dtype(loaded.vocab_size).str,
            "num_documents": sum(docs for _, docs, _ in shards),
            "num_tokens": sum(tokens for _, _, tokens in shards),
            "shards": [{"file": shard_name(i), "documents": docs, "tokens": tokens} for i, docs, tokens in shards],
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    seconds = time.perf_counter() - started
    return TokenizeReport(output, manifest["num_documents"], manifest["num_tokens"], len(shards), seconds)


def _run_jobs(jobs: list[_Job], workers: int) -> list[tuple[int, int, int]]:
    """write_shard of every job, in `workers` spawned processes (in this one for a single worker). A
    worker's error is raised here; the others are stopped."""
    if workers == 1 or len(jobs) == 1:
        return [write_shard(job) for job in jobs]
    # Spawned, not forked: the parent may hold jax's and the Rust tokenizer's threads. An executor
    # rather than a Pool: a worker that dies makes it raise instead of waiting forever.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(write_shard, job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _write_offsets(folder: Path, indices: list[int]) -> None:
    """Joins the shards' document lengths into offsets.npy (int64 [D + 1]), one shard at a time."""
    lengths_files = [folder / (shard_name(i) + ".lengths.npy") for i in indices]
    total = sum(np.load(f, mmap_mode="r").shape[0] for f in lengths_files)
    offsets = np.lib.format.open_memmap(folder / OFFSETS, mode="w+", dtype=np.int64, shape=(total + 1,))
    offsets[0], d, position = 0, 0, 0
    for f in lengths_files:
        lengths = np.load(f)
        offsets[d + 1 : d + 1 + len(lengths)] = position + np.cumsum(lengths)
        d, position = d + len(lengths), position + int(lengths.sum())
        f.unlink()
    offsets.flush()
    del offsets
