"""Blockwise attention: the values of dense attention with linear memory in both directions.

Queries in blocks of `query_block`, keys in blocks of `key_block`, an online softmax (a running max and
sum per query, float32 accumulators) over the key blocks; the gradient is a `jax.custom_vjp` that
recomputes each block's probabilities from the saved per-query logsumexp, so neither direction keeps
more than one [query_block, key_block] block of logits per head. Block pairs in which no query sees
any key (above the causal diagonal, across segments) are skipped with `lax.cond`. Sequences that are
not a multiple of a block are padded internally with keys no query sees and queries that see nothing
(`CausalMask.padded`). A query that sees no key at all gets zeros (dense gives the uniform average;
no attention path of the models has such a query).

Letters as in dense.py; in blocks q query and k key tokens, nq and nk blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from melt_jax.dtypes import at_least_float32
from melt_jax.model.attention.implementation import DEFAULT_BLOCK
from melt_jax.model.attention.masks import MASKED_LOGIT, CausalMask, EarlierAndOwnMask

Array = jax.Array


def _to_blocks(x: Array, axis: int, block: int) -> Array:
    """[..., n * block, ...] -> [n, ..., block, ...]: `axis` cut into blocks, the block index first."""
    shape = x.shape
    x = x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _from_blocks(x: Array, axis: int) -> Array:
    """The inverse of _to_blocks: [n, ..., block, ...] -> [..., n * block, ...]."""
    x = jnp.moveaxis(x, 0, axis)
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :])


def _block_logits(q: Array, k: Array, visible: Array, compute) -> Array:
    """Scaled logits of one block pair, masked: q [B, K, G, q, D], k [B, K, k, D], visible
    [B, 1, 1, q, k] -> [B, K, G, q, k] in `compute`."""
    logits = jnp.einsum("BKGqD,BKkD->BKGqk", q, k, preferred_element_type=compute) * (q.shape[-1] ** -0.5)
    return jnp.where(visible, logits, MASKED_LOGIT)


def _tied_to(anchor: Array, *trees):
    """`trees` unchanged, but computed together with `anchor` (an optimization barrier).

    Under a gradient, JAX splits a scanned computation into what depends on differentiated values and
    what does not, and keeps every output of the second part that the first reads, for every
    iteration. The block masks depend only on token positions: left alone, the masks of every block
    pair of every loop and layer would be kept, S x S in all. Tied to the queries, they are recomputed
    with them instead."""
    return jax.lax.optimization_barrier((anchor, trees))[1]


def _blockwise_forward(query_block: int, key_block: int, q: Array, k: Array, v: Array, mask) -> tuple[Array, Array]:
    """(out [B, K, G, S, D] in q's dtype, logsumexp [B, K, G, S] in float32) of q [B, K, G, S, D] over
    k, v [B, K, M, D]; S and M multiples of the blocks, `mask` of that size."""
    compute = at_least_float32(q.dtype)
    q_blocks = _to_blocks(q, 3, query_block)  # [nq, B, K, G, q, D]
    k_blocks, v_blocks = _to_blocks(k, 2, key_block), _to_blocks(v, 2, key_block)  # [nk, B, K, k, D]
    q_sides = tuple(_to_blocks(x, 1, query_block) for x in mask.query_side())  # each [nq, B, q]
    k_sides = tuple(_to_blocks(x, 1, key_block) for x in mask.key_side())  # each [nk, B, k]

    def one_query_block(_, xs):
        q_i, q_side = xs
        stats = q_i.shape[:-1]  # [B, K, G, q]
        init = (jnp.full(stats, MASKED_LOGIT, compute), jnp.zeros(stats, compute), jnp.zeros(q_i.shape, compute))

        def one_key_block(carry, ys):
            k_j, v_j, k_side = ys
            visible = mask.visible(*_tied_to(q_i, q_side, k_side))[:, None, None]  # [B, 1, 1, q, k]

            def update(carry):
                running_max, running_sum, acc = carry  # [B, K, G, q], [B, K, G, q], [B, K, G, q, D]
                logits = _block_logits(q_i, k_j, visible, compute)  # [B, K, G, q, k]
                new_max = jnp.maximum(running_max, logits.max(axis=-1))
                probs = jnp.where(visible, jnp.exp(logits - new_max[..., None]), 0.0)
                correction = jnp.exp(running_max - new_max)
                running_sum = running_sum * correction + probs.sum(axis=-1)
                weighted = jnp.einsum("BKGqk,BKkD->BKGqD", probs.astype(v_j.dtype), v_j, preferred_element_type=compute)
                return new_max, running_sum, acc * correction[..., None] + weighted

            return jax.lax.cond(jnp.any(visible), update, lambda carry: carry, carry), None

        (running_max, running_sum, acc), _ = jax.lax.scan(one_key_block, init, (k_blocks, v_blocks, k_sides))
        seen = running_sum > 0  # False only for a query that sees no key
        safe_sum = jnp.where(seen, running_sum, 1.0)
        out = (acc / safe_sum[..., None]).astype(q.dtype)
        return None, (out, jnp.where(seen, running_max + jnp.log(safe_sum), 0.0))

    _, (out, logsumexp) = jax.lax.scan(one_query_block, None, (q_blocks, q_sides))
    return _from_blocks(out, 3), _from_blocks(logsumexp, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise(query_block: int, key_block: int, q: Array, k: Array, v: Array, mask) -> Array:
    """Blockwise attention with the memory-efficient gradient (see `_blockwise_forward` for shapes)."""
    return _blockwise_forward(query_block, key_block, q, k, v, mask)[0]


def _blockwise_fwd(query_block, key_block, q, k, v, mask):
    out, logsumexp = _blockwise_forward(query_block, key_block, q, k, v, mask)
    return out, (q, k, v, mask, out, logsumexp)


def _blockwise_bwd(query_block, key_block, residuals, d_out):
    """Gradients w.r.t. q, k, v from the saved logsumexp, block pair by block pair: with P the
    probabilities recomputed as exp(logits - logsumexp), dV = P^T dO, dP = dO V^T,
    dlogits = P * (dP - rowsum(dO * O)), dQ = dlogits K / sqrt(D), dK = dlogits^T Q / sqrt(D).
    An outer scan over key blocks carries dQ; an inner scan over query blocks accumulates the key
    block's dK and dV."""
    q, k, v, mask, out, logsumexp = residuals
    compute = at_least_float32(q.dtype)
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(compute) * out.astype(compute), axis=-1)  # [B, K, G, S]
    q_blocks, do_blocks = _to_blocks(q, 3, query_block), _to_blocks(d_out, 3, query_block)  # [nq, B, K, G, q, D]
    lse_blocks, delta_blocks = _to_blocks(logsumexp, 3, query_block), _to_blocks(delta, 3, query_block)
    k_blocks, v_blocks = _to_blocks(k, 2, key_block), _to_blocks(v, 2, key_block)  # [nk, B, K, k, D]
    q_sides = tuple(_to_blocks(x, 1, query_block) for x in mask.query_side())
    k_sides = tuple(_to_blocks(x, 1, key_block) for x in mask.key_side())
    query_blocks = (jnp.arange(q_blocks.shape[0]), q_blocks, do_blocks, lse_blocks, delta_blocks, q_sides)

    def one_key_block(dq, ys):
        k_j, v_j, k_side = ys

        def one_query_block(carry, xs):
            i, q_i, do_i, lse_i, delta_i, q_side = xs
            visible = mask.visible(q_side, k_side)[:, None, None]  # [B, 1, 1, q, k]

            def update(dk_j, dv_j):
                logits = _block_logits(q_i, k_j, visible, compute)  # [B, K, G, q, k]
                probs = jnp.where(visible, jnp.exp(logits - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("BKGqk,BKGqD->BKkD", probs, do_i.astype(compute))
                dprobs = jnp.einsum("BKGqD,BKkD->BKGqk", do_i, v_j, preferred_element_type=compute)
                dlogits = probs * (dprobs - delta_i[..., None]) * scale
                dk_j = dk_j + jnp.einsum("BKGqk,BKGqD->BKkD", dlogits, q_i.astype(compute))
                return dk_j, dv_j, jnp.einsum("BKGqk,BKkD->BKGqD", dlogits, k_j.astype(compute))

            def skip(dk_j, dv_j):
                return dk_j, dv_j, jnp.zeros(q_i.shape, compute)

            dk_j, dv_j, dq = carry
            # dq stays outside the cond: a branch that passes the whole [S, D] array through may copy it.
            dk_j, dv_j, dq_i = jax.lax.cond(jnp.any(visible), update, skip, dk_j, dv_j)
            return (dk_j, dv_j, dq.at[i].add(dq_i)), None

        zeros = jnp.zeros(k_j.shape, compute)  # [B, K, k, D]
        (dk_j, dv_j, dq), _ = jax.lax.scan(one_query_block, (zeros, zeros, dq), query_blocks)
        return dq, (dk_j, dv_j)

    dq = jnp.zeros(q_blocks.shape, compute)  # [nq, B, K, G, q, D]
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq, (k_blocks, v_blocks, k_sides))
    grads = (_from_blocks(dq, 3), _from_blocks(dk, 2), _from_blocks(dv, 2))
    return (*(g.astype(x.dtype) for g, x in zip(grads, (q, k, v))), None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def pad_axis(x: Array, axis: int, length: int) -> Array:
    """x zero-padded at the end of `axis` to `length`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: CausalMask | EarlierAndOwnMask,
    *,
    query_block: int = DEFAULT_BLOCK,
    key_block: int = DEFAULT_BLOCK,
    kv_heads_first: bool = False,
) -> Array:
    """The values of `dense_attention(q, k, v, mask.dense())` computed block by block (see the module
    docstring): q [B, S, N, D], k and v [B, M, K, D] (or [B, K, M, D] with kv_heads_first), `mask` a
    per-token description of S queries and M keys. Returns [B, S, N, D] in q's dtype."""
    batch, seq, num_heads, head_dim = q.shape
    if not kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, M, D]
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    q = q.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    query_block, key_block = min(query_block, seq), min(key_block, num_keys)
    padded_seq, padded_keys = round_up(seq, query_block), round_up(num_keys, key_block)
    q = pad_axis(q, 3, padded_seq)  # [B, K, G, S', D]
    k, v = pad_axis(k, 2, padded_keys), pad_axis(v, 2, padded_keys)  # [B, K, M', D]
    out = _blockwise(query_block, key_block, q, k, v, mask.padded(padded_seq, padded_keys))
    return out[:, :, :, :seq].transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim)
