"""Language-model losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IGNORE_INDEX = -100


def next_token_cross_entropy(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX) -> Array:
    """Per-token loss of predicting labels[:, s+1] from logits[:, s]: float32 [B, S-1], zero where
    the label is `ignore_index`. logits [B, S, V], labels [B, S]."""
    logits = logits[:, :-1].astype(jnp.float32)  # [B, S-1, V]
    targets = labels[:, 1:]  # [B, S-1]
    valid = targets != ignore_index
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0)


def mean_next_token_loss(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX) -> Array:
    """Mean next-token cross-entropy over the labels that are not `ignore_index` (the Hugging Face
    causal-LM loss)."""
    per_token = next_token_cross_entropy(logits, labels, ignore_index)
    count = jnp.sum(labels[:, 1:] != ignore_index)
    return per_token.sum() / jnp.maximum(count, 1)
