"""Data for training and evaluation: text sources, tokenizers, packing into rows and the embedded
synthetic task.

Import from this package (`from melt_jax.data import load_tokenizer, pack_documents`); the modules
inside it import each other directly. The training batches of every source come from the grain loader
(`melt_jax.data.loader`); it, a corpus tokenized once into shards and its reader are imported from
their modules (`melt_jax.data.loader`, `melt_jax.data.tokenized`, `melt_jax.data.tokenized_corpus`),
which load grain.
"""

from melt_jax.data.packing import PackedData, pack_documents
from melt_jax.data.pipeline import (
    SYNTHETIC_SOURCE,
    build_train_data,
    check_text_field,
    load_text_dataset,
    tokenize_dataset,
)
from melt_jax.data.synthetic import (
    FORMS,
    OPERATIONS,
    SyntheticTaskConfig,
    answer_batch,
    exact_match_accuracy,
    generate_example,
    pack_answer_examples,
    synthetic_reasoning_dataset,
)
from melt_jax.data.tokenizer import EOS_TOKEN, PAD_TOKEN, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "EOS_TOKEN",
    "FORMS",
    "OPERATIONS",
    "PAD_TOKEN",
    "SYNTHETIC_SOURCE",
    "ByteTokenizer",
    "HFTokenizer",
    "PackedData",
    "SyntheticTaskConfig",
    "Tokenizer",
    "answer_batch",
    "build_train_data",
    "check_text_field",
    "exact_match_accuracy",
    "generate_example",
    "load_text_dataset",
    "load_tokenizer",
    "pack_answer_examples",
    "pack_documents",
    "synthetic_reasoning_dataset",
    "tokenize_dataset",
]
