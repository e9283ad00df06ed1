"""Language-model losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IGNORE_INDEX = -100


def target_log_probs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[target] in float32: logits [..., V], integer targets [...] -> [...]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def next_token_cross_entropy(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX) -> Array:
    """Per-token loss of predicting labels[:, s+1] from logits[:, s]: float32 [B, S-1], zero where
    the label is `ignore_index`. logits [B, S, V], labels [B, S]."""
    targets = labels[:, 1:]  # [B, S-1]
    valid = targets != ignore_index
    picked = target_log_probs(logits[:, :-1], jnp.where(valid, targets, 0))  # [B, S-1]
    return jnp.where(valid, -picked, 0.0)


def mean_next_token_loss(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX) -> Array:
    """Mean next-token cross-entropy over the labels that are not `ignore_index` (the Hugging Face
    causal-LM loss)."""
    per_token = next_token_cross_entropy(logits, labels, ignore_index)
    count = jnp.sum(labels[:, 1:] != ignore_index)
    return per_token.sum() / jnp.maximum(count, 1)
