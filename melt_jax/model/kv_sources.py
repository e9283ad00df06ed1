"""Key/value sources: where a layer's attention reads the keys and values of the tokens it attends to.

A layer computes, for the tokens in flight at one loop, queries q [B, S, N, D] and its own rows of
keys (after RoPE) and values [B, S, K, D]; a KV source combines those rows with whatever else the
tokens see, and says what the cache becomes:

    source.attend(q, rows, ouro_rows, cache, positions, layer_index, loop_index) -> (attended, cache)

| source                 | cache carried        | the tokens in flight attend to                                  |
|------------------------|----------------------|-----------------------------------------------------------------|
| `OwnTokens`            | none                 | each other, causally (a full forward, or one chunk)             |
| `SlotCache`            | KVCache              | the cache's slot array of this (loop, layer) after writing rows |
| `InterpolatedTokens`   | none                 | each other, rows mixed alpha * MELT + (1 - alpha) * Ouro        |
| `InterpolatedSlotCache`| InterpolatedCache    | both caches' slot arrays, mixed the same way                    |
| `EarlierRows`          | none                 | pass-1 rows of earlier chunks and own-chunk rows (two-pass)     |

A source is a pytree passed to every layer of every loop as a broadcast argument: its arrays (the
interpolation weight, the pass-1 rows) are constants of the forward, never part of the scan carry;
only the cache is carried. `ouro_rows` are the keys and values Ouro would compute at this loop (from
the layer input instead of MELT's gated latent); the layer computes them only for a source with
`interpolates = True`. See docs/melt.md, 'Phase 1: interpolation' and 'Training forwards'.

Adding a source: a subclass of `KVSource` here with `check` and `attend`; a model uses it when a
caller passes it as `kv_source=` (see docs/melt.md, 'Adding a cache variant or attention path').
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from melt_jax.errors import ConfigError
from melt_jax.model.cache import KVCache, init_cache, write_rows
from melt_jax.model.config import MeltConfig
from melt_jax.model.layers import (
    attention_over_cache_slots,
    causal_mask,
    chunked_attention_over_earlier_rows,
    dot_product_attention,
)

Array = jax.Array


@flax.struct.dataclass
class Rows:
    """Keys (after RoPE) and values of the tokens in flight at one (loop, layer): k, v [B, S, K, D]."""

    k: Array
    v: Array


@flax.struct.dataclass
class InterpolatedCache:
    """The caches of the phase-1 interpolated student: MELT's rows (k, v [L, B, K, S_max, D]: final rows
    of earlier tokens) and Ouro's per-loop rows of the same tokens (k, v [T, L, B, K, S_max, D]),
    computed from the student's own hidden states."""

    melt: KVCache
    ouro: KVCache

    @property
    def end_index(self) -> Array:
        return self.melt.end_index

    @property
    def max_length(self) -> int:
        return self.melt.max_length

    @property
    def batch_size(self) -> int:
        return self.melt.batch_size

    def advance(self, num_tokens) -> InterpolatedCache:
        return InterpolatedCache(melt=self.melt.advance(num_tokens), ouro=self.ouro.advance(num_tokens))


def init_training_cache(config: MeltConfig, batch_size: int, length: int, interpolate: bool, dtype=None):
    """An empty cache for a chunked forward: MELT's rows, plus Ouro's per-loop rows when interpolating."""
    melt = init_cache(config, batch_size, length, dtype)
    if not interpolate:
        return melt
    ouro = init_cache(config, batch_size, length, dtype, slots=(config.num_loops, config.num_layers))
    return InterpolatedCache(melt=melt, ouro=ouro)


def slot_index(cache: KVCache, layer_index, loop_index) -> tuple:
    """The index of the (loop, layer) slot array in a cache with leading slot axes [T, L] (one slot
    array per loop and layer, Ouro) or [L] (one per layer, shared by the loops, MELT)."""
    num_slot_axes = cache.k.ndim - 4  # k is [*slots, B, K, S_max, D]
    return (loop_index, layer_index)[2 - num_slot_axes :]


def interpolate(alpha: Array, melt: Array, ouro: Array) -> Array:
    """alpha * melt + (1 - alpha) * ouro, alpha cast to the rows' dtype: 0 is Ouro, 1 is MELT."""
    alpha = jnp.asarray(alpha, melt.dtype)
    return alpha * melt + (1 - alpha) * ouro


def _mixed(alpha: Array, rows: Rows, ouro_rows: Rows) -> Rows:
    return Rows(k=interpolate(alpha, rows.k, ouro_rows.k), v=interpolate(alpha, rows.v, ouro_rows.v))


class KVSource(flax.struct.PyTreeNode):
    """Where attention reads keys and values from (see the module docstring)."""

    interpolates: ClassVar[bool] = False  # whether `attend` needs Ouro's rows of the tokens in flight

    def check(self, cache) -> None:
        """ConfigError unless this source can run with `cache` (checked once, before the loops)."""
        if cache is not None:
            raise ConfigError(f"{type(self).__name__} reads no cache, got a {type(cache).__name__}")

    def attend(
        self, q: Array, rows: Rows, ouro_rows: Rows | None, cache, positions: Array, layer_index, loop_index
    ) -> tuple[Array, object]:
        """(attended [B, S, N, D] before the output projection, the updated cache) for queries q [B, S,
        N, D] (after RoPE) of the tokens at positions [B, S]."""
        raise NotImplementedError


class OwnTokens(KVSource):
    """No cache: the tokens in flight attend to each other causally (a full forward, or one chunk)."""

    def attend(self, q, rows, ouro_rows, cache, positions, layer_index, loop_index):
        return dot_product_attention(q, rows.k, rows.v, causal_mask(positions, positions)), cache


class SlotCache(KVSource):
    """A KVCache: the rows are written into the slot array of this (loop, layer) at their positions,
    and the queries attend to that whole slot array (slots past a query's position are masked)."""

    def check(self, cache) -> None:
        if not isinstance(cache, KVCache):
            raise ConfigError(f"SlotCache needs a KVCache, got {type(cache).__name__}")

    def attend(self, q, rows, ouro_rows, cache, positions, layer_index, loop_index):
        slot = slot_index(cache, layer_index, loop_index)
        k_all = write_rows(cache.k, slot, rows.k, positions)
        v_all = write_rows(cache.v, slot, rows.v, positions)
        attended = attention_over_cache_slots(q, k_all[slot], v_all[slot], positions)
        return attended, cache.replace(k=k_all, v=v_all)


class InterpolatedTokens(KVSource):
    """No cache, phase-1 interpolation: the tokens in flight attend to each other causally through
    keys and values alpha * MELT row + (1 - alpha) * Ouro row."""

    alpha: Array
    interpolates: ClassVar[bool] = True

    def attend(self, q, rows, ouro_rows, cache, positions, layer_index, loop_index):
        mixed = _mixed(self.alpha, rows, ouro_rows)
        return dot_product_attention(q, mixed.k, mixed.v, causal_mask(positions, positions)), cache


class InterpolatedSlotCache(KVSource):
    """An InterpolatedCache, phase-1 interpolation: MELT's rows go to the MELT cache's slot array of
    the layer, Ouro's to the Ouro cache's slot array of (loop, layer), and the queries attend to the
    two slot arrays mixed alpha * MELT + (1 - alpha) * Ouro."""

    alpha: Array
    interpolates: ClassVar[bool] = True

    def check(self, cache) -> None:
        if not isinstance(cache, InterpolatedCache):
            raise ConfigError(f"InterpolatedSlotCache needs an InterpolatedCache, got {type(cache).__name__}")

    def attend(self, q, rows, ouro_rows, cache, positions, layer_index, loop_index):
        melt, ouro = cache.melt, cache.ouro
        melt_slot, ouro_slot = slot_index(melt, layer_index, loop_index), slot_index(ouro, layer_index, loop_index)
        melt_k = write_rows(melt.k, melt_slot, rows.k, positions)
        melt_v = write_rows(melt.v, melt_slot, rows.v, positions)
        ouro_k = write_rows(ouro.k, ouro_slot, ouro_rows.k, positions)
        ouro_v = write_rows(ouro.v, ouro_slot, ouro_rows.v, positions)
        keys = interpolate(self.alpha, melt_k[melt_slot], ouro_k[ouro_slot])  # [B, K, S_max, D]
        values = interpolate(self.alpha, melt_v[melt_slot], ouro_v[ouro_slot])
        cache = InterpolatedCache(melt=melt.replace(k=melt_k, v=melt_v), ouro=ouro.replace(k=ouro_k, v=ouro_v))
        return attention_over_cache_slots(q, keys, values, positions), cache


class EarlierRows(KVSource):
    """The two-pass training forward's pass 2: all chunks of a sequence at once, each token attending
    to the pass-1 rows (`rows`: every token's stored rows, positions 0..S-1) of the tokens of earlier
    chunks and to the current rows of its own chunk, in one softmax. With `alpha` (phase 1) both are
    mixed alpha * MELT + (1 - alpha) * Ouro, and `rows` is an InterpolatedCache."""

    rows: KVCache | InterpolatedCache
    chunk_size: int = flax.struct.field(pytree_node=False)
    alpha: Array | None = None

    @property
    def interpolates(self) -> bool:
        return self.alpha is not None

    def attend(self, q, rows, ouro_rows, cache, positions, layer_index, loop_index):
        if self.alpha is None:
            slot = slot_index(self.rows, layer_index, loop_index)
            earlier_k, earlier_v = self.rows.k[slot], self.rows.v[slot]
        else:
            melt, ouro = self.rows.melt, self.rows.ouro
            melt_slot, ouro_slot = slot_index(melt, layer_index, loop_index), slot_index(ouro, layer_index, loop_index)
            earlier_k = interpolate(self.alpha, melt.k[melt_slot], ouro.k[ouro_slot])
            earlier_v = interpolate(self.alpha, melt.v[melt_slot], ouro.v[ouro_slot])
            rows = _mixed(self.alpha, rows, ouro_rows)
        attended = chunked_attention_over_earlier_rows(
            q, earlier_k.astype(rows.k.dtype), earlier_v.astype(rows.v.dtype), rows.k, rows.v, self.chunk_size
        )
        return attended, cache


def default_source(cache) -> KVSource:
    """The source of an ordinary forward: the cache's slot arrays when there is a cache, else the
    tokens in flight alone."""
    return OwnTokens() if cache is None else SlotCache()
