"""The Pallas GPU kernel's programs: what one program of the forward, the key-gradient and the
query-gradient kernel computes, and the mask they share (`KernelMask`). pallas_gpu.py launches them.

A program of the forward handles one query tile of one (batch row, query head): it keeps a running
maximum, sum and output accumulator in float32 over the key tiles its mask can see and writes the
output and each query's log-sum-exp. The gradient programs recompute the tile's probabilities from
that log-sum-exp: one per key tile (its dk, dv from the query tiles that see it), one per query tile
(its dq). Refs are the tiles and whole rows the launcher's BlockSpecs give: [tile, D] and [L, D] of
one head, [tile] and [L] per-token arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array

# A logit no key reaches: masked logits become this before the running maximum (finite, so that a
# block whose keys are all masked for a query leaves its sums unchanged instead of giving NaN).
NO_LOGIT = -1e30


@dataclasses.dataclass(frozen=True)
class KernelMask:
    """Which keys the kernel's S' queries see, a mask known when tracing up to one number per row.

    The keys are the rows of the tokens in flight ("own" rows, S' of them, token layout) and, with
    `earlier` set, a second set of rows ("earlier" rows, M_e of them: the pass-1 rows of the same
    tokens in the two-pass pattern, or a cache's slot array), read from their own arrays (no copy
    joining them). Query i sees:
      - own row j when j <= i and, with `chunk_size` C, j // C == i // C;
      - earlier row j when j < base + (i // C) * C (without C: j < base), where `base` is 0 (two-pass)
        or, with `dynamic_base`, a per-row number given when running (a cache's slots before the
        first position in flight);
    and, with segment ids, only rows of its segment. `earlier_heads_first`: the earlier rows are
    [B, K, M_e, D] (the cache layout), else [B, M_e, K, D]; `earlier_slot`: they are the slot array
    at these leading indices of a whole cache [*P, B, K, M_e, D], read where it lies. The block ranges
    below are the only blocks with a visible key; the mask is exact within them."""

    seq: int  # S'
    chunk_size: int | None = None
    earlier: bool = False
    dynamic_base: bool = False
    earlier_heads_first: bool = False
    earlier_slot: tuple[int, ...] = ()

    def own_seen(self, q_index: Array, k_index: Array) -> Array:
        """bool [bq, bk] for query indices [bq, 1] and own-row indices [1, bk]."""
        seen = k_index <= q_index
        if self.chunk_size is not None:
            seen &= k_index // self.chunk_size == q_index // self.chunk_size
        return seen

    def limit(self, q_index, base):
        """One past the last earlier row query q_index sees."""
        return base if self.chunk_size is None else base + (q_index // self.chunk_size) * self.chunk_size

    def own_blocks(self, q_start, block_q: int, block_k: int) -> tuple[Array, Array]:
        """[lo, hi) of the own-row key blocks the queries q_start .. q_start + block_q - 1 see (a
        query block lies in one chunk: C is a multiple of block_q)."""
        first = 0 if self.chunk_size is None else (q_start // self.chunk_size) * self.chunk_size
        return first // block_k, pl.cdiv(q_start + block_q, block_k)

    def earlier_blocks(self, q_start, block_k: int, base) -> tuple[Array, Array]:
        """[lo, hi) of the earlier-row key blocks the query block starting at q_start sees."""
        return 0, pl.cdiv(self.limit(q_start, base), block_k)

    def own_queries(self, k_start, block_k: int, block_q: int) -> tuple[Array, Array]:
        """[lo, hi) of the query blocks that see an own row of k_start .. k_start + block_k - 1."""
        num_query_blocks = self.seq // block_q
        if self.chunk_size is None:
            return k_start // block_q, num_query_blocks
        chunk_end = ((k_start + block_k - 1) // self.chunk_size + 1) * self.chunk_size
        return k_start // block_q, jnp.minimum(pl.cdiv(chunk_end, block_q), num_query_blocks)

    def earlier_queries(self, k_start, block_q: int, base) -> tuple[Array, Array]:
        """[lo, hi) of the query blocks that see an earlier row of the block starting at k_start."""
        num_query_blocks = self.seq // block_q
        if self.chunk_size is None:  # every query sees the rows before base, none the others
            return 0, jnp.where(k_start < base, num_query_blocks, 0)
        first_query = ((k_start - base) // self.chunk_size + 1) * self.chunk_size
        return jnp.minimum(jnp.maximum(first_query, 0) // block_q, num_query_blocks), num_query_blocks


def _block_indices(start, size: int, axis: int):
    shape = (size, 1) if axis == 0 else (1, size)
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _seen(mask: KernelMask, own: bool, q_start, k_start, block_q, block_k, base, q_segments, k_segments):
    """bool [bq, bk]: which keys of a key block (own rows or earlier rows) each query of the query
    block sees (and equal segment ids when given: [bq] and [bk])."""
    q_index, k_index = _block_indices(q_start, block_q, 0), _block_indices(k_start, block_k, 1)
    seen = mask.own_seen(q_index, k_index) if own else k_index < mask.limit(q_index, base)
    if q_segments is not None:
        seen &= q_segments[:, None] == k_segments[None, :]
    return seen


def _dot(a, b, *, trans_a=False, trans_b=False):
    """a @ b (or with a or b transposed) in float32, without TF32 for float32 operands."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _KeySet:
    """One set of keys inside a kernel: its refs (k, v [M, D], segment ids [M] or None), whether they
    are the own rows, and the key block range a query block sees (`blocks(q_start)`)."""

    k_ref: Any
    v_ref: Any
    segments_ref: Any
    own: bool


def _key_sets(mask, k_ref, v_ref, ks_ref, e_ref, ev_ref, es_ref) -> list[_KeySet]:
    own = _KeySet(k_ref, v_ref, ks_ref, own=True)
    return [own] if not mask.earlier else [_KeySet(e_ref, ev_ref, es_ref, own=False), own]


def _blocks_seen(mask, keys: _KeySet, q_start, block_q, block_k, base):
    if keys.own:
        return mask.own_blocks(q_start, block_q, block_k)
    return mask.earlier_blocks(q_start, block_k, base)


def _load_keys(keys: _KeySet, k_start, block_k):
    """The key block k_start .. k_start + block_k - 1: keys, values [bk, D], segment ids [bk] or None.
    Where the rows are not a whole number of blocks (a slot array read in place, not padded), the
    rows past the end read as zeros (never seen: the mask stops at base, within the slot array)."""
    from jax.experimental.pallas import triton as plgpu

    rows = pl.ds(k_start, block_k)
    length = keys.k_ref.shape[0]
    if length % block_k == 0:
        segments = None if keys.segments_ref is None else keys.segments_ref[rows]
        return keys.k_ref[rows, :], keys.v_ref[rows, :], segments
    inside = _block_indices(k_start, block_k, 0) < length  # [bk, 1]
    k = plgpu.load(keys.k_ref.at[rows, :], mask=inside, other=0)
    v = plgpu.load(keys.v_ref.at[rows, :], mask=inside, other=0)
    segments = None
    if keys.segments_ref is not None:
        segments = plgpu.load(keys.segments_ref.at[rows], mask=inside[:, 0], other=0)
    return k, v, segments


def forward_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, e_ref, ev_ref, es_ref, base_ref, o_ref, lse_ref, *, mask, block_q, block_k
):
    """One query block of one (batch, head): q_ref [bq, D]; own rows k_ref, v_ref [S', D] and earlier
    rows e_ref, ev_ref [M_e, D] (or None); segment ids qs_ref [bq], ks_ref [S'], es_ref [M_e] or None;
    base_ref [1] or None -> o_ref [bq, D], lse_ref [bq] (log-sum-exp of the query's visible logits)."""
    q_start = pl.program_id(0) * block_q
    q = q_ref[...]  # [bq, D]
    q_segments = None if qs_ref is None else qs_ref[...]
    base = 0 if base_ref is None else base_ref[0]
    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), NO_LOGIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    for keys in _key_sets(mask, k_ref, v_ref, ks_ref, e_ref, ev_ref, es_ref):

        def visit(block, carry, keys=keys):
            acc, running_max, running_sum = carry
            k_start = block * block_k
            k, v, k_segments = _load_keys(keys, k_start, block_k)
            logits = _dot(q, k, trans_b=True)  # [bq, bk]
            seen = _seen(mask, keys.own, q_start, k_start, block_q, block_k, base, q_segments, k_segments)
            logits = jnp.where(seen, logits, NO_LOGIT)
            new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))  # [bq]
            probs = jnp.where(seen, jnp.exp(logits - new_max[:, None]), 0.0)  # [bq, bk]
            rescale = jnp.exp(running_max - new_max)
            running_sum = running_sum * rescale + jnp.sum(probs, axis=1)
            acc = acc * rescale[:, None] + _dot(probs.astype(v.dtype), v)
            return acc, new_max, running_sum

        lo, hi = _blocks_seen(mask, keys, q_start, block_q, block_k, base)
        carry = jax.lax.fori_loop(lo, hi, visit, carry)
    acc, running_max, running_sum = carry
    running_sum = jnp.maximum(running_sum, jnp.finfo(jnp.float32).tiny)
    o_ref[...] = (acc / running_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = running_max + jnp.log(running_sum)


def _probs_and_logit_grads(q, k, v, do, lse, delta, seen):
    """The block's probabilities p = exp(q k^T - lse) [bq, bk] and the gradient of the loss with
    respect to its logits, p * (do v^T - delta)."""
    logits = _dot(q, k, trans_b=True)
    probs = jnp.where(seen, jnp.exp(logits - lse[:, None]), 0.0)
    return probs, probs * (_dot(do, v, trans_b=True) - delta[:, None])


def key_grads_kernel(
    q_ref,
    k_ref,
    v_ref,
    qs_ref,
    ks_ref,
    base_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    mask,
    own,
    block_q,
    block_k,
):
    """dk, dv of one key block (own rows, or earlier rows with own=False) of one (batch, query head):
    k_ref, v_ref [bk, D], ks_ref [bk]; q_ref, do_ref [S', D], qs_ref, lse_ref, delta_ref [S'] ->
    dk_ref, dv_ref [bk, D] (this query head's share)."""
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    k_segments = None if ks_ref is None else ks_ref[...]
    base = 0 if base_ref is None else base_ref[0]

    def visit(block, carry):
        dk, dv = carry
        q_start = block * block_q
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        q_segments = None if qs_ref is None else qs_ref[rows]
        seen = _seen(mask, own, q_start, k_start, block_q, block_k, base, q_segments, k_segments)
        probs, logit_grads = _probs_and_logit_grads(q, k, v, do, lse_ref[rows], delta_ref[rows], seen)
        dv = dv + _dot(probs.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(logit_grads.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo, hi = mask.own_queries(k_start, block_k, block_q) if own else mask.earlier_queries(k_start, block_q, base)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi, visit, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def query_grads_kernel(
    q_ref,
    k_ref,
    v_ref,
    qs_ref,
    ks_ref,
    e_ref,
    ev_ref,
    es_ref,
    base_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    mask,
    block_q,
    block_k,
):
    """dq of one query block of one (batch, head): the forward kernel's inputs, do_ref [bq, D],
    lse_ref, delta_ref [bq] -> dq_ref [bq, D]."""
    q_start = pl.program_id(0) * block_q
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_segments = None if qs_ref is None else qs_ref[...]
    base = 0 if base_ref is None else base_ref[0]
    dq = jnp.zeros(q.shape, jnp.float32)
    for keys in _key_sets(mask, k_ref, v_ref, ks_ref, e_ref, ev_ref, es_ref):

        def visit(block, dq, keys=keys):
            k_start = block * block_k
            k, v, k_segments = _load_keys(keys, k_start, block_k)
            seen = _seen(mask, keys.own, q_start, k_start, block_q, block_k, base, q_segments, k_segments)
            _, logit_grads = _probs_and_logit_grads(q, k, v, do, lse, delta, seen)
            return dq + _dot(logit_grads.astype(k.dtype), k)

        lo, hi = _blocks_seen(mask, keys, q_start, block_q, block_k, base)
        dq = jax.lax.fori_loop(lo, hi, visit, dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)
