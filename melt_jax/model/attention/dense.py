"""Dense attention ("xla"): logits [B, K, G, S, M] in float32 and one softmax, then the weighted sum.
Fastest for short sequences, but S * M logits per head are materialised and kept for the backward
pass. A query that sees no key at all gets the uniform average of all values.

Letters in shape comments and einsum strings: B batch, S query tokens, M key/value tokens, N query
heads, K key/value heads, G query heads per kv head (N = K * G; query head n reads kv head n // G),
D head dim; in the two-pass pattern n chunks of C query and E key tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from melt_jax.dtypes import at_least_float32
from melt_jax.model.attention.masks import MASKED_LOGIT, CausalMask

Array = jax.Array


def dense_attention(q: Array, k: Array, v: Array, mask: Array, *, kv_heads_first: bool = False) -> Array:
    """softmax(q k^T / sqrt(D)) v with grouped kv heads; logits and softmax in float32.

    q [B, S, N, D], k and v [B, M, K, D] (or [B, K, M, D] with kv_heads_first, the cache layout),
    mask bool [B, S, M] (True = attend). Returns [B, S, N, D] in q's dtype.
    """
    batch, seq, num_heads, head_dim = q.shape
    kv_spec = "BKMD" if kv_heads_first else "BMKD"
    num_kv_heads = k.shape[1] if kv_heads_first else k.shape[2]
    group = num_heads // num_kv_heads
    q = q.reshape(batch, seq, num_kv_heads, group, head_dim)  # [B, S, K, G, D]
    logits = jnp.einsum(f"BSKGD,{kv_spec}->BKGSM", q, k, preferred_element_type=at_least_float32(q.dtype))
    logits = logits * (head_dim**-0.5)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, S, M]
    out = jnp.einsum(f"BKGSM,{kv_spec}->BSKGD", probs, v)
    return out.reshape(batch, seq, num_heads, head_dim)


def dense_earlier_and_own(
    q: Array, earlier_k: Array, earlier_v: Array, k: Array, v: Array, chunk_size: int, segment_ids=None
) -> Array:
    """`attend_earlier_and_own` computed densely: the earlier rows' logits [S, S] and the own chunk's
    block by block ([S, C]), one softmax over both."""
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    num_chunks = seq // chunk_size
    compute = at_least_float32(q.dtype)
    q = q.reshape(batch, num_chunks, chunk_size, num_kv_heads, group, head_dim)  # [B, n, C, K, G, D]
    k_blocks = k.reshape(batch, num_chunks, chunk_size, num_kv_heads, head_dim)  # [B, n, E, K, D]
    v_blocks = v.reshape(batch, num_chunks, chunk_size, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    earlier_logits = jnp.einsum("BnCKGD,BKMD->BKGnCM", q, earlier_k, preferred_element_type=compute) * scale
    own_logits = jnp.einsum("BnCKGD,BnEKD->BKGnCE", q, k_blocks, preferred_element_type=compute) * scale
    key_chunk = jnp.arange(seq) // chunk_size  # [M]
    earlier_mask = key_chunk[None, :] < jnp.arange(num_chunks)[:, None]  # [n, M]
    own_mask = jnp.arange(chunk_size)[None, :] <= jnp.arange(chunk_size)[:, None]  # [C, E]
    earlier_mask = earlier_mask[:, None, :]  # [n, 1, M]
    if segment_ids is not None:
        q_segments = segment_ids.reshape(batch, num_chunks, chunk_size)  # [B, n, C]
        same = q_segments[..., :, None] == segment_ids[:, None, None, :]  # [B, n, C, M]
        own_same = q_segments[..., :, None] == q_segments[..., None, :]  # [B, n, C, E]
        earlier_mask = (earlier_mask & same)[:, None, None]  # [B, 1, 1, n, C, M]
        own_mask = (own_mask & own_same)[:, None, None]  # [B, 1, 1, n, C, E]
    earlier_logits = jnp.where(earlier_mask, earlier_logits, MASKED_LOGIT)
    own_logits = jnp.where(own_mask, own_logits, MASKED_LOGIT)
    probs = jax.nn.softmax(jnp.concatenate([earlier_logits, own_logits], axis=-1), axis=-1).astype(v.dtype)
    earlier_probs, own_probs = probs[..., :seq], probs[..., seq:]
    out = jnp.einsum("BKGnCM,BKMD->BnCKGD", earlier_probs, earlier_v) + jnp.einsum(
        "BKGnCE,BnEKD->BnCKGD", own_probs, v_blocks
    )
    return out.reshape(batch, seq, num_heads, head_dim)


def dense_history_and_own(q: Array, history_k: Array, history_v: Array, k: Array, v: Array, mask: CausalMask) -> Array:
    """Dense attention of q [B, S, N, D] over a cache slot array history_k, history_v [B, K, S_max, D]
    followed by the rows in flight k, v [B, S, K, D], in one softmax; `mask` describes the S_max + S
    keys in that order. Reads the slot array where it lies (no copy of it joined to the new rows).
    Returns [B, S, N, D] in q's dtype."""
    max_length = history_k.shape[2]
    own_k, own_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    compute = at_least_float32(q.dtype)
    q = q.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, S, K, G, D]
    scale = head_dim**-0.5
    history_logits = jnp.einsum("BSKGD,BKMD->BKGSM", q, history_k, preferred_element_type=compute) * scale
    own_logits = jnp.einsum("BSKGD,BKED->BKGSE", q, own_k, preferred_element_type=compute) * scale
    visible = mask.dense()[:, None, None]  # [B, 1, 1, S, S_max + S]
    logits = jnp.where(visible, jnp.concatenate([history_logits, own_logits], axis=-1), MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, K, G, S, S_max + S]
    history_probs, own_probs = probs[..., :max_length], probs[..., max_length:]
    out = jnp.einsum("BKGSM,BKMD->BSKGD", history_probs.astype(history_v.dtype), history_v)
    out = out + jnp.einsum("BKGSE,BKED->BSKGD", own_probs.astype(v.dtype), own_v)
    return out.reshape(batch, seq, num_heads, head_dim).astype(q.dtype)


# Outputs of a sum over keys below which XLA's GPU compiler writes the products out before summing
# them (rather than summing them as they are computed): a decoding step at batch 1 or 2 writes two
# float32 copies of the slot array it reads. Such a sum is split into parts of the keys, each part's
# sum an output of its own, then the parts summed (see `sum_parts`).
SMALL_SUM_OUTPUTS = 16384


def sum_parts(num_keys: int, outputs: int) -> int:
    """Parts to split a sum over `num_keys` keys with `outputs` outputs into (a power of two dividing
    num_keys): the fewest that give outputs * parts >= SMALL_SUM_OUTPUTS, else the most there are."""
    parts = 1
    while outputs * parts < SMALL_SUM_OUTPUTS and num_keys % (2 * parts) == 0:
        parts *= 2
    return parts


def few_queries_history_and_own(
    q: Array, history_k: Array, history_v: Array, k: Array, v: Array, mask: CausalMask
) -> Array:
    """`dense_history_and_own` for a few queries (decoding), as products and sums over the slot array
    where it lies rather than as dots: a dot over a slot array sliced from the cache makes XLA's GPU
    compiler lay the whole cache out anew for its matrix kernels (a copy of the cache per step),
    where a sum reads it in place. The attention weights are materialised before they meet the values
    (an optimization barrier), so that each product is computed inside its sum and never stored; a
    sum with few outputs is split over parts of the keys (`sum_parts`). Returns [B, S, N, D] in q's
    dtype."""
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads, max_length = history_k.shape[1], history_k.shape[2]
    dtype, compute = q.dtype, at_least_float32(q.dtype)
    q = q.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.astype(compute) * head_dim**-0.5  # [B, K, G, S, D]
    own_k, own_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]

    def logits_over(keys):  # keys [B, K, M, D] -> [B, K, G, S, M]
        return jnp.sum(q[:, :, :, :, None, :] * keys[:, :, None, None].astype(compute), axis=-1)

    def weighted(probs, values):  # probs [B, K, G, S, M], values [B, K, M, D] -> [B, K, G, S, D]
        products = probs[..., None] * values[:, :, None, None].astype(compute)  # [B, K, G, S, M, D]
        num_keys = values.shape[2]
        parts = sum_parts(num_keys, math.prod(products.shape) // num_keys)  # outputs: B * K * G * S * D
        if parts == 1:
            return jnp.sum(products, axis=-2)
        split = products.reshape(*products.shape[:-2], parts, num_keys // parts, head_dim)  # [.., P, M / P, D]
        return jnp.sum(jax.lax.optimization_barrier(jnp.sum(split, axis=-2)), axis=-2)

    visible = mask.dense()[:, None, None]  # [B, 1, 1, S, S_max + S]
    logits = jnp.concatenate([logits_over(history_k), logits_over(own_k)], axis=-1)
    probs = jax.nn.softmax(jnp.where(visible, logits, MASKED_LOGIT), axis=-1)  # [B, K, G, S, S_max + S]
    probs = jax.lax.optimization_barrier(probs)
    out = weighted(probs[..., :max_length], history_v) + weighted(probs[..., max_length:], own_v)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim).astype(dtype)
