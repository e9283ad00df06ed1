"""Key/value sources: where a layer's attention reads the keys and values of the tokens it attends to.

A layer computes, for the tokens in flight at one loop, queries q [B, S, N, D] and its own rows of
keys (after RoPE) and values [B, S, K, D]; a KV source combines those rows with whatever else the
tokens see, and says what the cache becomes:

    source.attend(q, rows, ouro_rows, cache, ctx, layer_index, loop_index, implementation)
        -> (attended, cache)

| source                 | cache carried        | the tokens in flight attend to                                  |
|------------------------|----------------------|-----------------------------------------------------------------|
| `OwnTokens`            | none                 | each other, causally (a full forward, or one chunk)             |
| `SlotCache`            | KVCache              | the cache's slot array of this (loop, layer) and their own rows |
| `InterpolatedTokens`   | none                 | each other, rows mixed alpha * MELT + (1 - alpha) * Ouro        |
| `InterpolatedSlotCache`| InterpolatedCache    | both caches' slot arrays, mixed the same way                    |
| `EarlierRows`          | none                 | pass-1 rows of earlier chunks and own-chunk rows (two-pass)     |

A source is a pytree passed to every layer of every loop as a broadcast argument: its arrays (the
interpolation weight, the pass-1 rows) are constants of the forward, never part of the scan carry;
only the cache is carried. `ouro_rows` are the keys and values Ouro would compute at this loop (from
the layer input instead of MELT's gated latent); the layer computes them only for a source with
`interpolates = True`. See docs/melt.md, 'Phase 1: interpolation' and 'Training forwards'.

`ctx` is the call's TokenContext: the sources read the tokens' positions [B, S], their segment ids
[B, S] (packed documents; None without) and `in_order` (the model made the positions: they increase
along every row). Sources whose keys are the tokens in flight, or their pass-1 rows (`EarlierRows`),
use the segment ids for the keys as well; the slot caches take their slots' ids [B, S_max] as a field
(`SlotCache(slot_segment_ids)`). The masks come from masks.py (`own_tokens_mask`, `cache_mask`,
`history_and_own_mask`); only the sources whose tokens in flight attend to each other (`OwnTokens`,
`InterpolatedTokens`) have an in-order mask, which the kernels take.

How attention is computed is not the source's business: the layer passes its config's choice
(`config.attention_implementation`) and the source hands it on to the entry points of dispatch.py,
so every path computes the way the config says (or, for a kernel, falls back where it cannot) and a
source built by a caller follows the model it is passed to.

A source has six methods, all but `attend` with defaults in `KVSource`: `check(cache)` (before the
loops), `begin(cache, rows_shape)` and `end(carried, positions)` (what the loops carry, and the cache
after them), `freeze(carried, exited)` and `fill_skipped(carried, loops_run)` (skipping loops; only
the slot caches can), and `attend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from melt_jax.errors import ConfigError
from melt_jax.model.attention.context import TokenContext
from melt_jax.model.attention.dense import few_queries_history_and_own
from melt_jax.model.attention.dispatch import attend, attend_earlier_and_own, attend_history_and_own
from melt_jax.model.attention.filled_history import attend_filled_history_and_own
from melt_jax.model.attention.implementation import DENSE, Implementation, control_flow_on_device
from melt_jax.model.attention.masks import cache_mask, history_and_own_mask, own_tokens_mask
from melt_jax.model.cache import KVCache, init_cache, write_all_rows, write_rows

if TYPE_CHECKING:  # config.py imports this package (implementation.py): a type only here
    from melt_jax.model.config import MeltConfig

Array = jax.Array

# Queries per kv head (S * G) up to which inference on GPU reads a slot array with products and sums
# (`few_queries_history_and_own`: decoding, speculative drafts) rather than with dots.
FEW_QUERIES = 8


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

    def begin(self, cache, rows_shape: tuple[int, ...]):
        """What the loops carry in place of `cache` (the same by default); rows_shape is [B, S, K, D],
        the shape of the rows of the tokens in flight."""
        return cache

    def end(self, carried, positions: Array):
        """The cache after the loops, from what they carried (`begin`'s result, updated by `attend`)."""
        return carried

    def freeze(self, carried, exited: Array):
        """What the loops carry, marked so that the next `attend` treats the tokens in flight with
        exited [B, S] as frozen at their exit loop: they are seen through the rows they wrote last,
        not through this loop's (melt_jax.model.ouro.OuroModel.run_loops_skipping). Sources that keep
        no rows of the tokens in flight cannot skip loops: ConfigError."""
        raise ConfigError(f"{type(self).__name__} cannot skip loops: skipping needs a KV cache (SlotCache)")

    def fill_skipped(self, carried, loops_run: Array):
        """What the loops carried once `loops_run` (traced) of the T loops have run, with the rows of
        the loops that did not run (per-loop slots only) copied from the last loop that did."""
        raise ConfigError(f"{type(self).__name__} cannot skip loops: skipping needs a KV cache (SlotCache)")

    def attend(
        self,
        q: Array,
        rows: Rows,
        ouro_rows: Rows | None,
        cache,
        ctx: TokenContext,
        layer_index,
        loop_index,
        implementation: Implementation = DENSE,
    ) -> tuple[Array, object]:
        """(attended [B, S, N, D] before the output projection, the updated cache) for queries q [B, S,
        N, D] (after RoPE) of the tokens of `ctx` (their positions; their segment ids if any: a token
        sees only tokens of its segment; `in_order`: the positions increase along every row, so the
        tokens in flight see each other in index order, a mask the kernels take), at (layer_index,
        loop_index), computed by `implementation` (the model passes its config's choice)."""
        raise NotImplementedError


class OwnTokens(KVSource):
    """No cache: the tokens in flight attend to each other causally (a full forward, or one chunk)."""

    def attend(self, q, rows, ouro_rows, cache, ctx, layer_index, loop_index, implementation=DENSE):
        return attend(q, rows.k, rows.v, own_tokens_mask(ctx), implementation=implementation), cache


@flax.struct.dataclass
class PendingRows:
    """What a slot cache's loops carry: the cache as it was before the call (`history`, only read) and
    the rows of the tokens in flight (`k`, `v` [*slots, B, K, S, D], laid out as the cache), which
    `SlotCache.end` writes into the history at their positions once the loops are done. `frozen`
    [B, S] (while skipping loops): the tokens that have exited, whose rows stay those of their exit
    loop."""

    history: KVCache
    k: Array
    v: Array
    frozen: Array | None = None


class SlotCache(KVSource):
    """A KVCache. The queries attend to their slot array's earlier tokens (the slots before the first
    position in flight) and to the rows of the tokens in flight, causally; those rows are written into
    the cache once, after the loops (`end`), so the loops only read the cache: it is updated in place
    in a donated buffer and no slot array is copied through the scans. The tokens in flight occupy
    consecutive positions, as in prefill and decoding. `slot_segment_ids` [B, S_max]: the segment id
    of every slot, for segment-masked attention over the cache (the chunked training forward knows
    them for the whole sequence in advance). `filled_only` (inference: the source of a model called
    with a cache and no `kv_source`): attention reads only the slots before the positions in flight,
    block by block (`attend_filled_history_and_own`, forward only), instead of the whole slot array."""

    slot_segment_ids: Array | None = None
    filled_only: bool = flax.struct.field(pytree_node=False, default=False)

    def check(self, cache) -> None:
        if not isinstance(cache, KVCache):
            raise ConfigError(f"SlotCache needs a KVCache, got {type(cache).__name__}")

    def begin(self, cache: KVCache, rows_shape) -> PendingRows:
        slots = cache.k.shape[: cache.k.ndim - 4]
        batch, seq, kv_heads, head_dim = rows_shape
        empty = jnp.zeros((*slots, batch, kv_heads, seq, head_dim), cache.k.dtype)  # [*slots, B, K, S, D]
        return PendingRows(history=cache, k=empty, v=empty)

    def end(self, carried: PendingRows, positions: Array) -> KVCache:
        history = carried.history
        branch = control_flow_on_device()
        return history.replace(
            k=write_all_rows(history.k, carried.k, positions, branch=branch),
            v=write_all_rows(history.v, carried.v, positions, branch=branch),
        )

    def freeze(self, carried: PendingRows, exited: Array) -> PendingRows:
        return carried.replace(frozen=exited)

    def fill_skipped(self, carried: PendingRows, loops_run: Array) -> PendingRows:
        if carried.k.ndim - 4 < 2:  # one slot array per layer (MELT): it holds the exit loop's row
            return carried
        skipped = (jnp.arange(carried.k.shape[0]) >= loops_run).reshape(-1, *[1] * (carried.k.ndim - 1))
        last = loops_run - 1
        return carried.replace(
            k=jnp.where(skipped, carried.k[last], carried.k), v=jnp.where(skipped, carried.v[last], carried.v)
        )

    def attend(self, q, rows, ouro_rows, cache, ctx, layer_index, loop_index, implementation=DENSE):
        history = cache.history
        slot = slot_index(history, layer_index, loop_index)
        if cache.frozen is not None:  # exited tokens keep the row they wrote last, at their exit loop
            last = slot_index(history, layer_index, jnp.maximum(loop_index - 1, 0))
            frozen = cache.frozen[:, :, None, None]  # [B, S, 1, 1]
            rows = Rows(
                k=jnp.where(frozen, cache.k[last].swapaxes(1, 2).astype(rows.k.dtype), rows.k),
                v=jnp.where(frozen, cache.v[last].swapaxes(1, 2).astype(rows.v.dtype), rows.v),
            )
        # [B, K, S, D]: the pending rows are laid out as the cache, so that `end` writes them as they are.
        new_k, new_v = with_layout_constraint(
            (rows.k.swapaxes(1, 2).astype(cache.k.dtype), rows.v.swapaxes(1, 2).astype(cache.v.dtype)),
            Layout(major_to_minor=(0, 1, 2, 3)),
        )
        pending = cache.replace(k=cache.k.at[slot].set(new_k), v=cache.v.at[slot].set(new_v))
        mask = history_and_own_mask(ctx, history.max_length, self.slot_segment_ids)
        if self.filled_only and control_flow_on_device():
            filled = jnp.max(jnp.min(ctx.positions, axis=1))  # slots any query may see: before its row's first
            attended = attend_filled_history_and_own(
                q, history.k, history.v, slot, rows.k, rows.v, mask, filled,
                history_block=implementation.key_block,
            )  # fmt: skip
            return attended, pending
        if self.filled_only and q.shape[1] * q.shape[2] <= FEW_QUERIES * history.k.shape[-3]:
            attended = few_queries_history_and_own(q, history.k[slot], history.v[slot], rows.k, rows.v, mask)
            return attended, pending
        base = ctx.positions[:, 0] if ctx.in_order else None  # in order: the slots before it, then the rows
        attended = attend_history_and_own(
            q, history.k, history.v, rows.k, rows.v, mask, slot=slot, implementation=implementation, base=base
        )
        return attended, pending


class InterpolatedTokens(KVSource):
    """No cache, phase-1 interpolation: the tokens in flight attend to each other causally through
    keys and values alpha * MELT row + (1 - alpha) * Ouro row."""

    alpha: Array
    interpolates: ClassVar[bool] = True

    def attend(self, q, rows, ouro_rows, cache, ctx, layer_index, loop_index, implementation=DENSE):
        mixed = _mixed(self.alpha, rows, ouro_rows)
        return attend(q, mixed.k, mixed.v, own_tokens_mask(ctx), implementation=implementation), cache


class InterpolatedSlotCache(KVSource):
    """An InterpolatedCache, phase-1 interpolation: MELT's rows go to the MELT cache's slot array of
    the layer, Ouro's to the Ouro cache's slot array of (loop, layer), and the queries attend to the
    two slot arrays mixed alpha * MELT + (1 - alpha) * Ouro. `slot_segment_ids` [B, S_max] as in
    SlotCache."""

    alpha: Array
    slot_segment_ids: Array | None = None
    interpolates: ClassVar[bool] = True

    def check(self, cache) -> None:
        if not isinstance(cache, InterpolatedCache):
            raise ConfigError(f"InterpolatedSlotCache needs an InterpolatedCache, got {type(cache).__name__}")

    def attend(self, q, rows, ouro_rows, cache, ctx, layer_index, loop_index, implementation=DENSE):
        melt, ouro, positions = cache.melt, cache.ouro, ctx.positions
        melt_slot, ouro_slot = slot_index(melt, layer_index, loop_index), slot_index(ouro, layer_index, loop_index)
        melt_k = write_rows(melt.k, melt_slot, rows.k, positions)
        melt_v = write_rows(melt.v, melt_slot, rows.v, positions)
        ouro_k = write_rows(ouro.k, ouro_slot, ouro_rows.k, positions)
        ouro_v = write_rows(ouro.v, ouro_slot, ouro_rows.v, positions)
        keys = interpolate(self.alpha, melt_k[melt_slot], ouro_k[ouro_slot])  # [B, K, S_max, D]
        values = interpolate(self.alpha, melt_v[melt_slot], ouro_v[ouro_slot])
        cache = InterpolatedCache(melt=melt.replace(k=melt_k, v=melt_v), ouro=ouro.replace(k=ouro_k, v=ouro_v))
        if not ctx.in_order:
            mask = cache_mask(ctx, melt.max_length, self.slot_segment_ids)
            return attend(q, keys, values, mask, implementation=implementation, kv_heads_first=True), cache
        # In order, the tokens in flight fill the slots from their row's first position on: the slots
        # before it and the mixed rows in flight (as stored) are the same keys, in the form the
        # kernels take (a slot array read up to a per-row base, then the rows in flight causally).
        stored = Rows(k=rows.k.astype(melt.k.dtype), v=rows.v.astype(melt.v.dtype))
        ouro_stored = Rows(k=ouro_rows.k.astype(ouro.k.dtype), v=ouro_rows.v.astype(ouro.v.dtype))
        own = _mixed(self.alpha, stored, ouro_stored)
        mask = history_and_own_mask(ctx, melt.max_length, self.slot_segment_ids)
        attended = attend_history_and_own(
            q, keys, values, own.k, own.v, mask, implementation=implementation, base=ctx.positions[:, 0]
        )
        return attended, cache


class EarlierRows(KVSource):
    """The two-pass training forward's pass 2: all chunks of a sequence at once, each token attending
    to the pass-1 rows (`rows`: every token's stored rows, positions 0..S-1) of the tokens of earlier
    chunks and to the current rows of its own chunk, in one softmax. With `alpha` (phase 1) both are
    mixed alpha * MELT + (1 - alpha) * Ouro, and `rows` is an InterpolatedCache. With segment ids,
    the stored rows are those of the same tokens, so they share the queries' segment ids."""

    rows: KVCache | InterpolatedCache
    chunk_size: int = flax.struct.field(pytree_node=False)
    alpha: Array | None = None

    @property
    def interpolates(self) -> bool:
        return self.alpha is not None

    def attend(self, q, rows, ouro_rows, cache, ctx, layer_index, loop_index, implementation=DENSE):
        if self.alpha is None:
            slot = slot_index(self.rows, layer_index, loop_index)
            earlier_k, earlier_v = self.rows.k[slot], self.rows.v[slot]
        else:
            melt, ouro = self.rows.melt, self.rows.ouro
            melt_slot, ouro_slot = slot_index(melt, layer_index, loop_index), slot_index(ouro, layer_index, loop_index)
            earlier_k = interpolate(self.alpha, melt.k[melt_slot], ouro.k[ouro_slot])
            earlier_v = interpolate(self.alpha, melt.v[melt_slot], ouro.v[ouro_slot])
            rows = _mixed(self.alpha, rows, ouro_rows)
        earlier_k, earlier_v = earlier_k.astype(rows.k.dtype), earlier_v.astype(rows.v.dtype)
        attended = attend_earlier_and_own(
            q,
            earlier_k,
            earlier_v,
            rows.k,
            rows.v,
            self.chunk_size,
            segment_ids=ctx.segment_ids,
            implementation=implementation,
        )
        return attended, cache


def default_source(cache) -> KVSource:
    """The source of an ordinary forward: the cache's slot arrays, read up to the positions in flight
    (inference: no gradient), when there is a cache, else the tokens in flight alone."""
    return OwnTokens() if cache is None else SlotCache(filled_only=True)
