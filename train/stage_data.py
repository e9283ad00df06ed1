"""The data of a stage: packed training rows, held-out rows and, for the synthetic task, held-out
examples for exact-match accuracy. The training rows of every source are read by the grain loader
(melt_jax.data.loader): rows packed in memory, or, for a tokenized corpus (a folder with a manifest,
made by `melt-train tokenize`), rows kept on disk and built by index (melt_jax.data.tokenized_corpus)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from melt_jax.data.packing import PackedData, pack_documents
from melt_jax.data.pipeline import build_train_data, tokenize_dataset
from melt_jax.data.synthetic import answer_batch, pack_answer_examples, synthetic_reasoning_dataset
from melt_jax.data.tokenized_corpus import PackedRows, TokenizedCorpus, is_tokenized
from melt_jax.data.tokenizer import Tokenizer, load_tokenizer
from melt_jax.train.config import TrainConfig


@dataclasses.dataclass
class StageData:
    tokenizer: Tokenizer
    train: PackedData | PackedRows  # PackedRows: a tokenized corpus, rows built on demand
    held_out: PackedData
    answers: dict[str, np.ndarray] | None  # synthetic task: tokens / answer_mask of eval examples


def held_out_examples(cfg: TrainConfig):
    """The synthetic task's held-out examples of a run (drawn with seed train.seed + 10,000)."""
    return synthetic_reasoning_dataset(cfg.data.synthetic_task(cfg.data.eval_examples, seed=cfg.seed + 10_000))


def held_out_answers(cfg: TrainConfig, tokenizer: Tokenizer | None = None, held=None) -> dict[str, np.ndarray]:
    """Tokens and answer mask of the synthetic task's held-out examples, [N, seq_len] each: what the
    run's exact-match accuracy is computed on."""
    tokenizer = load_tokenizer(cfg.data.tokenizer) if tokenizer is None else tokenizer
    held = held_out_examples(cfg) if held is None else held
    return answer_batch(tokenizer, held["prompt"], held["answer"], cfg.data.seq_len)


def build_data(cfg: TrainConfig) -> StageData:
    """Packed training rows, held-out rows for the per-loop loss and, for the synthetic task, the
    held-out examples for exact-match accuracy."""
    d = cfg.data
    tokenizer = load_tokenizer(d.tokenizer)
    if d.source == "synthetic":
        train = synthetic_reasoning_dataset(d.synthetic_task(d.num_examples, seed=cfg.seed))
        held = held_out_examples(cfg)
        if d.loss == "answer":
            packed = pack_answer_examples(tokenizer, train["prompt"], train["answer"], d.seq_len)
            held_out = pack_answer_examples(tokenizer, held["prompt"], held["answer"], d.seq_len)
        else:
            packed = pack_documents(tokenize_dataset(train, tokenizer, "text"), d.seq_len, tokenizer.pad_id)
            held_out = pack_documents(tokenize_dataset(held, tokenizer, "text"), d.seq_len, tokenizer.pad_id)
        return StageData(tokenizer, packed, held_out, held_out_answers(cfg, tokenizer, held))
    if is_tokenized(d.source):
        return _tokenized_data(cfg, tokenizer)
    packed = build_train_data(d.source, tokenizer, d.seq_len, text_field=d.text_field)
    n_held = min(cfg.eval_batches * cfg.batch_size, packed.num_rows // 10)
    if n_held == 0:  # too little data to hold some out: evaluate on training rows
        return StageData(tokenizer, packed, packed, None)
    rows = packed.as_dict()
    train = {k: v[:-n_held] for k, v in rows.items()}
    held = {k: v[-n_held:] for k, v in rows.items()}
    return StageData(tokenizer, PackedData(**train), PackedData(**held), None)


def _tokenized_data(cfg: TrainConfig, tokenizer: Tokenizer) -> StageData:
    """The rows of the tokenized corpus cfg.data.source, its last rows held out as for a text source
    (the same rows that packing the text would give)."""
    corpus = TokenizedCorpus(cfg.data.source)
    corpus.check_tokenizer(cfg.data.tokenizer, tokenizer)
    rows = PackedRows(corpus, cfg.data.seq_len, tokenizer.pad_id)
    n_held = min(cfg.eval_batches * cfg.batch_size, len(rows) // 10)
    if n_held == 0:  # too little data to hold some out: evaluate on training rows
        held = rows.rows(0, min(len(rows), max(cfg.eval_batches, 1) * cfg.batch_size))
        return StageData(tokenizer, rows, PackedData(**held), None)
    train = PackedRows(corpus, cfg.data.seq_len, tokenizer.pad_id, stop=len(rows) - n_held)
    held = rows.rows(len(rows) - n_held, len(rows))
    return StageData(tokenizer, train, PackedData(**held), None)


def batch_digest(batch: dict[str, np.ndarray], previous: str) -> str:
    """A running hash of the token batches a run has trained on (to check resumption)."""
    return hashlib.sha256(previous.encode() + np.ascontiguousarray(batch["tokens"]).tobytes()).hexdigest()
