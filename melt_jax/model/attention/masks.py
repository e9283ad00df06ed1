"""Which keys each query sees, described per token, never as a [B, S, M] array (that array is itself
S x M).

- `CausalMask`: query positions [B, S], key positions [B, M] and optional segment ids of both; key j
  is visible to query i when its position is <= the query's and, with segment ids, both ids are equal
  (id 0 marks padding, which then sees only padding). A mask marked `in_order` is the tokens in
  flight attending to each other with positions that increase along every row (the model made them,
  `TokenContext.in_order`), so that its causal part is j <= i, known when tracing: the kernels take it.
- `EarlierAndOwnMask`: the two-pass pattern of MELT's training forward (docs/melt.md, 'Training
  forwards'): the earlier rows of chunks before the query's, the own rows of its chunk up to itself.

The builders at the end make the masks of the KV sources' paths: the tokens in flight alone
(`own_tokens_mask`), a cache slot array (`cache_mask`), a slot array followed by the rows in flight
(`history_and_own_mask`), from a `TokenContext` and the slots' segment ids.

Both mask classes answer `visible(query_side, key_side)` for any slices of their per-token arrays,
which is how the blockwise implementation and the cache readers cut a mask into blocks, and
`padded(S', M')` for the internal padding of whole blocks: no query sees a padded key, a padded
query sees no key.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from melt_jax.errors import ConfigError
from melt_jax.model.attention.context import TokenContext

Array = jax.Array

# A large negative logit for masked keys; finite so that a fully masked row gives a uniform softmax
# instead of NaN in the dense implementation.
MASKED_LOGIT = -1e30
# Positions of the internal padding: no query sees a padded key, a padded query sees no key.
NEVER_SEEN = jnp.iinfo(jnp.int32).max
SEES_NOTHING = -1


def pad_tokens(x: Array, length: int, value: int) -> Array:
    """x [B, L] right-padded with `value` to [B, length]."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)


def _same_segment(q_segments: Array, k_segments: Array) -> Array:
    """[B, S] and [B, M] -> bool [B, S, M]: the query's and the key's segment ids are equal."""
    return q_segments[:, :, None] == k_segments[:, None, :]


@flax.struct.dataclass
class CausalMask:
    """Key j is visible to query i when k_positions[b, j] <= q_positions[b, i] and, with segment ids,
    k_segments[b, j] == q_segments[b, i].

    q_positions [B, S] int, k_positions [B, M] int; q_segments [B, S] and k_segments [B, M] int, both
    or neither. `in_order` (static): the queries are the keys themselves (M = S, the same positions)
    and the positions increase along every row, so that key j is visible to query i exactly when
    j <= i (and the segments agree): a mask known when tracing, which the kernels need.
    """

    q_positions: Array
    k_positions: Array
    q_segments: Array | None = None
    k_segments: Array | None = None
    in_order: bool = flax.struct.field(pytree_node=False, default=False)

    def check(self) -> None:
        if (self.q_segments is None) != (self.k_segments is None):
            raise ConfigError("a CausalMask needs segment ids for both the queries and the keys, or for neither")

    def query_side(self) -> tuple[Array, ...]:
        """The per-query arrays `visible` reads, each [B, S]."""
        return (self.q_positions,) if self.q_segments is None else (self.q_positions, self.q_segments)

    def key_side(self) -> tuple[Array, ...]:
        """The per-key arrays `visible` reads, each [B, M]."""
        return (self.k_positions,) if self.k_segments is None else (self.k_positions, self.k_segments)

    def visible(self, query_side: tuple[Array, ...], key_side: tuple[Array, ...]) -> Array:
        """bool [B, S', M'] for any slices [B, S'] of query_side() and [B, M'] of key_side()."""
        causal = key_side[0][:, None, :] <= query_side[0][:, :, None]
        if len(query_side) == 1:
            return causal
        return causal & _same_segment(query_side[1], key_side[1])

    def dense(self) -> Array:
        """The whole mask, bool [B, S, M] (for the dense implementation)."""
        return self.visible(self.query_side(), self.key_side())

    def padded(self, num_queries: int, num_keys: int) -> CausalMask:
        """The mask of `num_queries` queries and `num_keys` keys whose first S and M are these; the
        padded keys are seen by no query, the padded queries see no key."""
        pad_segments = lambda x, n: None if x is None else pad_tokens(x, n, 0)  # noqa: E731
        return CausalMask(
            q_positions=pad_tokens(self.q_positions, num_queries, SEES_NOTHING),
            k_positions=pad_tokens(self.k_positions, num_keys, NEVER_SEEN),
            q_segments=pad_segments(self.q_segments, num_queries),
            k_segments=pad_segments(self.k_segments, num_keys),
        )


def causal_mask(
    q_positions: Array, k_positions: Array, q_segments=None, k_segments=None, *, in_order: bool = False
) -> CausalMask:
    """The CausalMask of queries and keys at these positions [B, S], [B, M] (and segment ids);
    `in_order` as in CausalMask (the caller vouches for it)."""
    mask = CausalMask(q_positions, k_positions, q_segments, k_segments, in_order)
    mask.check()
    if in_order and q_positions.shape != k_positions.shape:
        raise ConfigError(
            f"an in-order CausalMask has the queries as its keys, got {q_positions.shape[1]} queries "
            f"and {k_positions.shape[1]} keys"
        )
    return mask


def slot_mask(q_positions: Array, max_length: int, q_segments=None, slot_segments=None) -> CausalMask:
    """The CausalMask of queries at positions [B, S] over a cache slot array of `max_length` slots
    (slot index = key position), with the slots' segment ids [B, S_max] if given."""
    batch = q_positions.shape[0]
    slots = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch, max_length))  # [B, S_max]
    return causal_mask(q_positions, slots, q_segments, slot_segments)


@flax.struct.dataclass
class EarlierAndOwnMask:
    """The two-pass pattern over the keys [earlier rows of tokens 0..S-1, own rows of tokens 0..S-1]
    (M = 2S): query i sees the earlier row of token j when chunk(j) < chunk(i), and the own row of
    token j when chunk(j) == chunk(i) and j <= i; with segment ids only rows of its segment.

    q_index [B, S] (i), k_index [B, M] (j), k_own [B, M] (1 for own rows); q_segments [B, S] and
    k_segments [B, M] or None; chunk(j) = j // chunk_size.
    """

    q_index: Array
    k_index: Array
    k_own: Array
    q_segments: Array | None = None
    k_segments: Array | None = None
    chunk_size: int = flax.struct.field(pytree_node=False, default=1)

    @classmethod
    def of(cls, batch: int, seq: int, chunk_size: int, segment_ids: Array | None = None) -> EarlierAndOwnMask:
        """The mask of `seq` tokens in chunks of `chunk_size`, with their segment ids [B, S] if given."""
        index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))  # [B, S]
        own = jnp.concatenate([jnp.zeros_like(index), jnp.ones_like(index)], axis=1)  # [B, 2S]
        k_segments = None if segment_ids is None else jnp.concatenate([segment_ids, segment_ids], axis=1)
        return cls(index, jnp.concatenate([index, index], axis=1), own, segment_ids, k_segments, chunk_size)

    def query_side(self) -> tuple[Array, ...]:
        return (self.q_index,) if self.q_segments is None else (self.q_index, self.q_segments)

    def key_side(self) -> tuple[Array, ...]:
        sides = (self.k_index, self.k_own)
        return sides if self.k_segments is None else (*sides, self.k_segments)

    def visible(self, query_side: tuple[Array, ...], key_side: tuple[Array, ...]) -> Array:
        """bool [B, S', M'] for any slices of query_side() and key_side()."""
        q_index, k_index, k_own = query_side[0][:, :, None], key_side[0][:, None, :], key_side[1][:, None, :]
        q_chunk, k_chunk = q_index // self.chunk_size, k_index // self.chunk_size
        own = (k_chunk == q_chunk) & (k_index <= q_index)
        seen = jnp.where(k_own == 1, own, k_chunk < q_chunk)
        if len(query_side) == 1:
            return seen
        return seen & _same_segment(query_side[1], key_side[2])

    def padded(self, num_queries: int, num_keys: int) -> EarlierAndOwnMask:
        """As CausalMask.padded: padded keys are own rows of a chunk no query is in."""
        pad_segments = lambda x, n: None if x is None else pad_tokens(x, n, 0)  # noqa: E731
        return self.replace(
            q_index=pad_tokens(self.q_index, num_queries, SEES_NOTHING),
            k_index=pad_tokens(self.k_index, num_keys, NEVER_SEEN),
            k_own=pad_tokens(self.k_own, num_keys, 1),
            q_segments=pad_segments(self.q_segments, num_queries),
            k_segments=pad_segments(self.k_segments, num_keys),
        )


# --------------------------------------------------------------------------------------------------
# The masks of the KV sources' paths


def own_tokens_mask(ctx: TokenContext) -> CausalMask:
    """The tokens in flight attending to each other: causal over their positions [B, S], within
    their segments when the context has segment ids; in order when the context says so."""
    return causal_mask(ctx.positions, ctx.positions, ctx.segment_ids, ctx.segment_ids, in_order=ctx.in_order)


def query_segments(ctx: TokenContext, slot_segments: Array | None) -> Array | None:
    """The segment ids [B, S] of the tokens in flight attending over a cache whose slots have the ids
    slot_segments [B, S_max]: their own ids when the context has them, else the slots' ids at their
    positions; None without slot ids (no segment masking over the cache; ConfigError if the tokens
    have ids)."""
    if slot_segments is None:
        if ctx.segment_ids is not None:
            raise ConfigError(
                "segment ids over a cache need the segment ids of its slots: pass them to the KV source "
                "(SlotCache(slot_segment_ids=...) or InterpolatedSlotCache(alpha, slot_segment_ids=...))"
            )
        return None
    if ctx.segment_ids is None:
        return jnp.take_along_axis(slot_segments, ctx.positions, axis=1, mode="clip")  # [B, S]
    return ctx.segment_ids


def cache_mask(ctx: TokenContext, max_length: int, slot_segments: Array | None) -> CausalMask:
    """The tokens in flight over a slot array of `max_length` slots: causal, and with the slots'
    segment ids [B, S_max] only the slots of the query's segment (`query_segments`)."""
    segments = query_segments(ctx, slot_segments)
    if segments is None:
        return slot_mask(ctx.positions, max_length)
    return slot_mask(ctx.positions, max_length, segments, slot_segments)


def history_and_own_mask(ctx: TokenContext, max_length: int, slot_segments: Array | None) -> CausalMask:
    """The tokens in flight over the keys [cache slots (S_max), tokens in flight (S)]: a slot is
    visible when it precedes the first position in flight of its row (later slots hold nothing yet,
    or what the tokens in flight replace), the tokens in flight causally; with segment ids only keys
    of the query's segment (`query_segments`)."""
    positions = ctx.positions  # [B, S]
    batch = positions.shape[0]
    slots = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch, max_length))  # [B, S_max]
    start = jnp.min(positions, axis=1, keepdims=True)  # [B, 1]
    # A slot at or after the first position in flight gets a position no query reaches.
    key_positions = jnp.concatenate([jnp.where(slots < start, slots, NEVER_SEEN), positions], axis=1)
    segments = query_segments(ctx, slot_segments)
    if segments is None:
        return causal_mask(positions, key_positions)
    key_segments = jnp.concatenate([slot_segments, segments], axis=1)
    return causal_mask(positions, key_positions, segments, key_segments)
