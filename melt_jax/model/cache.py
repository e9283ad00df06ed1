"""Fixed-size key/value caches as immutable pytrees.

A cache slot holds one key row and one value row per token position: slot index == token position,
so a query at position p attends to the slots 0..p. `end_index[b]` is the number of positions of row
b written so far; the next token of row b goes to slot `end_index[b]`.

The config names the slot arrays (`cache_slots`): Ouro keeps one per (loop, layer), k and v
[T, L, B, K, S_max, D]; MELT one per layer shared by the loops, [L, B, K, S_max, D]. Slot arrays are
laid out heads first ([B, K, S_max, D]) so that attention reads each head's keys as one contiguous
[S_max, D] matrix, with no transpose before the attention dots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp

from melt_jax.errors import ConfigError

if TYPE_CHECKING:  # config.py imports the attention package, whose KV sources import this module
    from melt_jax.model.config import OuroConfig

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """k, v: [..., B, K, S_max, D] with leading slot axes ([T, L] for Ouro); end_index: int32 [B]."""

    k: Array
    v: Array
    end_index: Array

    @property
    def max_length(self) -> int:
        return self.k.shape[-2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[-4]

    @property
    def num_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.end_index.nbytes

    def advance(self, num_tokens: int | Array) -> KVCache:
        """The same cache with `num_tokens` more positions marked as written in every row."""
        return self.replace(end_index=self.end_index + num_tokens)


def init_cache(
    config: OuroConfig, batch_size: int, max_length: int, dtype=None, slots: tuple[int, ...] | None = None
) -> KVCache:
    """An empty cache: k, v zeros of [*slots, B, K, S_max, D] in `dtype` (default config.dtype), with
    the config's slot axes (`config.cache_slots`: [T, L] for Ouro, [L] for MELT) unless `slots` names
    others."""
    if max_length < 1:
        raise ConfigError(f"cache max_length must be >= 1, got {max_length}")
    dtype = dtype or config.jnp_dtype
    slots = config.cache_slots if slots is None else tuple(slots)
    shape = (*slots, batch_size, config.num_kv_heads, max_length, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        end_index=jnp.zeros((batch_size,), jnp.int32),
    )


def write_rows(slots: Array, slot_index: tuple, rows: Array, positions: Array) -> Array:
    """`slots` [*P, B, K, S_max, D] with rows [B, S, K, D] written into slot array `slot_index` (a
    tuple of len(P) indices) at token positions [B, S]; positions outside the cache are dropped."""
    batch_index = jnp.arange(rows.shape[0])[:, None]  # [B, 1]
    # Advanced indices split by the head slice: the indexed view is [B, S, K, D], the rows' shape.
    index = (*slot_index, batch_index, slice(None), positions)
    return slots.at[index].set(rows.astype(slots.dtype), mode="drop")


def write_all_rows(slots: Array, rows: Array, positions: Array, *, branch: bool = True) -> Array:
    """`slots` [*P, B, K, S_max, D] with rows [*P, B, K, S, D] (the cache's layout) written into every
    slot array at the consecutive token positions positions[b, 0] .. positions[b, 0] + S - 1 of each
    row b; a row whose positions run past the cache is left as it was.

    One dynamic-update-slice per batch row (in a loop), not a scatter: updated in place, where a
    scatter over all slot arrays at once can make XLA lay the whole cache out anew (a copy of it).
    `branch`: a row that does not fit is skipped by a conditional (the TPU and CPU keep the loop's
    buffer in place), else by a select that writes back what is there, the rows written one after the
    other without a loop (for GPU, where a conditional waits on the host and its branches would each
    need their own copy of the slot arrays)."""
    num_slot_axes = slots.ndim - 4
    batch, num_tokens = positions.shape
    rows = rows.astype(slots.dtype)
    max_length = slots.shape[-2]

    def write_row(b, slots):
        start = positions[b, 0].astype(jnp.int32)
        b = jnp.asarray(b, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        row = jax.lax.dynamic_slice_in_dim(rows, b, 1, axis=num_slot_axes)  # [*P, 1, K, S, D]
        at = (*([zero] * num_slot_axes), b, zero, start, zero)
        fits = (start >= 0) & (start + num_tokens <= max_length)
        if branch:
            return jax.lax.cond(fits, lambda s: jax.lax.dynamic_update_slice(s, row, at), lambda s: s, slots)
        # A row that does not fit writes back what is there (the slice start is clamped the same way
        # for the read and the write).
        kept = jax.lax.dynamic_slice(slots, at, row.shape)
        return jax.lax.dynamic_update_slice(slots, jnp.where(fits, row, kept), at)

    if branch:
        return jax.lax.fori_loop(0, batch, write_row, slots)
    for b in range(batch):  # written out: no loop between the kernels of a GPU's graph
        slots = write_row(b, slots)
    return slots
