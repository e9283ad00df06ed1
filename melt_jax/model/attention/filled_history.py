"""Inference's read of a cache: attention over the filled part of a slot array and the rows in flight,
visiting the slot array block by block and stopping after the last slot any query may see, so that
the slots not yet written are never loaded (docs/melt.md, 'Inference reads only the filled part of
the cache'). Forward only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from melt_jax.dtypes import at_least_float32
from melt_jax.model.attention.implementation import DEFAULT_BLOCK
from melt_jax.model.attention.masks import MASKED_LOGIT, CausalMask

Array = jax.Array


def attend_filled_history_and_own(
    q: Array,
    cache_k: Array,
    cache_v: Array,
    slot: tuple,
    k: Array,
    v: Array,
    mask: CausalMask,
    filled: Array,
    *,
    history_block: int = DEFAULT_BLOCK,
) -> Array:
    """`attend_history_and_own` over the slot array cache_k[slot], cache_v[slot] ([B, K, S_max, D] of
    a cache [*slots, B, K, S_max, D], `slot` a tuple of indices, traced or not) that reads only its
    first `filled` (traced, []) slots: the keys no query sees beyond them (slots not yet written, or
    at and after the positions in flight) are never loaded. The history is visited in blocks of
    `history_block` slots by a `lax.while_loop` that stops after the block holding slot filled - 1,
    with an online softmax (a running max and sum per query, float32); the rows in flight join the
    softmax last. Forward only:
    a while loop with a data-dependent trip count has no reverse-mode derivative, so this serves
    inference (decode steps and prefill chunks over a cache), never training. Each block is sliced
    from the whole cache in one step, so no slot array is copied out first. Returns [B, S, N, D]."""
    mask.check()
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads, max_length = cache_k.shape[-3], cache_k.shape[-2]
    block = min(history_block, max_length)
    compute = at_least_float32(q.dtype)
    scale = head_dim**-0.5
    q = q.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, S, K, G, D]
    query_side, key_side = mask.query_side(), mask.key_side()  # [B, S] each; [B, S_max + S] each

    def add_keys(state, keys, values, visible):
        """Online softmax step over keys, values [B, K, M, D] with visible [B, S, M]."""
        running_max, total, acc = state  # [B, K, G, S], [B, K, G, S], [B, K, G, S, D]
        logits = jnp.einsum("BSKGD,BKMD->BKGSM", q, keys, preferred_element_type=compute) * scale
        logits = jnp.where(visible[:, None, None], logits, MASKED_LOGIT)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.where(visible[:, None, None], jnp.exp(logits - new_max[..., None]), 0.0)
        weighted = jnp.einsum("BKGSM,BKMD->BKGSD", probs.astype(values.dtype), values, preferred_element_type=compute)
        return new_max, total * correction + probs.sum(axis=-1), acc * correction[..., None] + weighted

    def history_block_step(carry):
        index, state = carry
        # The last block is moved back to fit the slot array; the slots it shares with the block
        # before were counted there.
        start = jnp.minimum(index * block, max_length - block)
        corner = tuple(jnp.asarray(i, jnp.int32) for i in (*slot, 0, 0, start, 0))
        sizes = (*[1] * len(slot), batch, num_kv_heads, block, head_dim)
        keys = jax.lax.dynamic_slice(cache_k, corner, sizes).reshape(sizes[len(slot) :])  # [B, K, block, D]
        values = jax.lax.dynamic_slice(cache_v, corner, sizes).reshape(sizes[len(slot) :])
        block_keys = tuple(jax.lax.dynamic_slice_in_dim(x, start, block, axis=1) for x in key_side)
        slots = start + jnp.arange(block)  # [block]
        visible = mask.visible(query_side, block_keys) & (slots >= index * block)[None, None, :]
        return index + 1, add_keys(state, keys, values, visible)

    num_blocks = (filled + block - 1) // block
    state = (
        jnp.full((batch, num_kv_heads, q.shape[3], seq), MASKED_LOGIT, compute),
        jnp.zeros((batch, num_kv_heads, q.shape[3], seq), compute),
        jnp.zeros((batch, num_kv_heads, q.shape[3], seq, head_dim), compute),
    )
    _, state = jax.lax.while_loop(lambda c: c[0] < num_blocks, history_block_step, (jnp.int32(0), state))
    own_keys = tuple(x[:, max_length:] for x in key_side)
    own_k, own_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    _, total, acc = add_keys(state, own_k, own_v, mask.visible(query_side, own_keys))
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [B, K, G, S, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim).astype(q.dtype)
