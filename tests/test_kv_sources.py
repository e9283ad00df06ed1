"""Each KV source alone (melt_jax/model/attention/kv_sources.py) against attention written out in numpy: which
keys a query sees, what is written where in the cache, and how interpolation mixes the two row sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melt_jax.errors import ConfigError
from melt_jax.model import KVCache
from melt_jax.model.attention import (
    EarlierRows,
    Implementation,
    InterpolatedCache,
    InterpolatedSlotCache,
    InterpolatedTokens,
    OwnTokens,
    Rows,
    SlotCache,
    TokenContext,
    default_source,
    slot_index,
)

B, S, N, K, D = 2, 6, 4, 2, 8
LOOPS, LAYERS, S_MAX = 3, 2, 10
TOL = 1e-5


def _random(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _rows(seed) -> Rows:
    return Rows(k=_random(seed, (B, S, K, D)), v=_random(seed + 1, (B, S, K, D)))


def _attention(q, keys, values, visible):
    """Reference attention: q [B, S, N, D]; keys, values [B, S, M, K, D] (the keys each query may
    see, per query); visible [B, S, M] bool. Query head n reads kv head n // (N / K)."""
    q, keys, values, visible = map(np.asarray, (q, keys, values, visible))
    group = N // K
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for s in range(S):
            for n in range(N):
                logits = keys[b, s, :, n // group] @ q[b, s, n] / np.sqrt(D)  # [M]
                logits = np.where(visible[b, s], logits, -np.inf)
                p = np.exp(logits - logits.max())
                out[b, s, n] = (p / p.sum()) @ values[b, s, :, n // group]
    return out


def _causal_over(rows_k, rows_v, positions, key_positions):
    """keys/values per query from rows [B, M, K, D] at key_positions [M], visible when <= position."""
    keys = np.broadcast_to(np.asarray(rows_k)[:, None], (B, S, *rows_k.shape[1:]))
    values = np.broadcast_to(np.asarray(rows_v)[:, None], (B, S, *rows_v.shape[1:]))
    visible = np.asarray(key_positions)[None, None, :] <= np.asarray(positions)[:, :, None]
    return keys, values, visible


def _empty_cache(slots) -> KVCache:
    shape = (*slots, B, K, S_MAX, D)
    earlier = _random(50, shape)  # rows of tokens before the chunk (and garbage past it)
    return KVCache(k=earlier, v=_random(51, shape), end_index=jnp.full((B,), 3, jnp.int32))


def _context(positions):
    """The TokenContext a KV source reads (positions); no rotary tables."""
    return TokenContext(positions=positions, cos=None, sin=None)


Q = _random(0, (B, S, N, D))
POSITIONS = jnp.broadcast_to(jnp.arange(3, 3 + S, dtype=jnp.int32), (B, S))  # after 3 cached tokens


def test_slot_index_follows_the_cache_layout():
    assert slot_index(_empty_cache((LOOPS, LAYERS)), 1, 2) == (2, 1)  # Ouro: (loop, layer)
    assert slot_index(_empty_cache((LAYERS,)), 1, 2) == (1,)  # MELT: the layer's array, every loop


def test_own_tokens_is_causal_attention_among_the_tokens_in_flight():
    rows = _rows(1)
    attended, cache = OwnTokens().attend(Q, rows, None, None, _context(POSITIONS), 0, 0)
    keys, values, visible = _causal_over(rows.k, rows.v, POSITIONS, np.arange(3, 3 + S))
    np.testing.assert_allclose(attended, _attention(Q, keys, values, visible), atol=TOL)
    assert cache is None


def _slot_cache_call(source, rows, cache, layer, loop):
    """One attend of a slot-cache source between its begin and end, as a model call runs it for one
    (loop, layer): (attended, the cache after the call)."""
    carried = source.begin(cache, rows.k.shape)
    attended, carried = source.attend(Q, rows, None, carried, _context(POSITIONS), layer, loop)
    return attended, source.end(carried, POSITIONS)


@pytest.mark.parametrize("slots", [(LOOPS, LAYERS), (LAYERS,)], ids=["ouro-layout", "melt-layout"])
def test_slot_cache_writes_the_rows_and_attends_to_the_slot_array(slots):
    rows, cache = _rows(2), _empty_cache(slots)
    layer, loop = 1, 2
    attended, new_cache = _slot_cache_call(SlotCache(), rows, cache, layer, loop)
    slot = slot_index(cache, layer, loop)
    # The slot array now holds the rows at their positions; every other position is unchanged (the
    # other slot arrays get their own rows of the call at these positions, none here: zeros).
    for got, before, new in ((new_cache.k, cache.k, rows.k), (new_cache.v, cache.v, rows.v)):
        expected = np.array(before)
        expected[..., 3 : 3 + S, :] = 0.0
        expected[slot][:, :, 3 : 3 + S] = np.asarray(new).transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(got, expected)
    # Each query sees the 3 cached rows and the chunk's rows up to itself; later slots are masked.
    all_k = np.asarray(new_cache.k[slot]).transpose(0, 2, 1, 3)  # [B, S_max, K, D]
    all_v = np.asarray(new_cache.v[slot]).transpose(0, 2, 1, 3)
    keys, values, visible = _causal_over(all_k, all_v, POSITIONS, np.arange(S_MAX))
    np.testing.assert_allclose(attended, _attention(Q, keys, values, visible), atol=TOL)


@pytest.mark.parametrize("block", [1, 3, 4, 16])
@pytest.mark.parametrize("segments", [False, True], ids=["", "segments"])
def test_reading_only_the_filled_slots_changes_nothing(block, segments):
    """SlotCache(filled_only=True) (inference) against the whole slot array: rows that start at
    different positions (3 and 1: the first row's history is longer), history blocks that do or do not
    divide the slot array or are larger than it."""
    rows, cache = _rows(3), _empty_cache((LOOPS, LAYERS))
    positions = jnp.stack([jnp.arange(3, 3 + S), jnp.arange(1, 1 + S)]).astype(jnp.int32)  # [B, S]
    slot_segments = None
    if segments:  # the first row holds two documents, the second one
        slot_segments = jnp.stack([jnp.where(jnp.arange(S_MAX) < 5, 1, 2), jnp.ones(S_MAX)]).astype(jnp.int32)
    implementation = Implementation("xla", key_block=block)
    results = []
    for filled_only in (False, True):
        source = SlotCache(slot_segments, filled_only=filled_only)
        carried = source.begin(cache, rows.k.shape)
        attended, carried = source.attend(
            Q, rows, None, carried, _context(positions), 1, 2, implementation=implementation
        )
        results.append((attended, source.end(carried, positions)))
    (want, want_cache), (got, got_cache) = results
    np.testing.assert_allclose(got, want, atol=TOL)
    np.testing.assert_array_equal(got_cache.k, want_cache.k)


def test_interpolated_tokens_mixes_the_rows():
    rows, ouro_rows = _rows(3), _rows(5)
    for alpha, expected_rows in ((1.0, rows), (0.0, ouro_rows)):
        got, _ = InterpolatedTokens(jnp.float32(alpha)).attend(Q, rows, ouro_rows, None, _context(POSITIONS), 0, 0)
        want, _ = OwnTokens().attend(Q, expected_rows, None, None, _context(POSITIONS), 0, 0)
        np.testing.assert_allclose(got, want, atol=TOL)
    mixed = Rows(k=0.3 * rows.k + 0.7 * ouro_rows.k, v=0.3 * rows.v + 0.7 * ouro_rows.v)
    got, _ = InterpolatedTokens(jnp.float32(0.3)).attend(Q, rows, ouro_rows, None, _context(POSITIONS), 0, 0)
    np.testing.assert_allclose(got, OwnTokens().attend(Q, mixed, None, None, _context(POSITIONS), 0, 0)[0], atol=TOL)


def test_interpolated_slot_cache_writes_both_caches_and_mixes_them():
    rows, ouro_rows = _rows(7), _rows(9)
    layer, loop = 1, 2
    cache = InterpolatedCache(melt=_empty_cache((LAYERS,)), ouro=_empty_cache((LOOPS, LAYERS)))
    for alpha, plain_cache, plain_rows in ((1.0, cache.melt, rows), (0.0, cache.ouro, ouro_rows)):
        source = InterpolatedSlotCache(jnp.float32(alpha))
        got, new_cache = source.attend(Q, rows, ouro_rows, cache, _context(POSITIONS), layer, loop)
        want, want_cache = _slot_cache_call(SlotCache(), plain_rows, plain_cache, layer, loop)
        np.testing.assert_allclose(got, want, atol=TOL)
        written = new_cache.melt if alpha == 1.0 else new_cache.ouro
        slot = slot_index(written, layer, loop)
        np.testing.assert_array_equal(written.k[slot], want_cache.k[slot])
    # Both caches are written whatever alpha is: MELT's rows to (layer), Ouro's to (loop, layer).
    np.testing.assert_array_equal(new_cache.melt.k[layer, :, :, 3 : 3 + S], rows.k.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(new_cache.ouro.k[loop, layer, :, :, 3 : 3 + S], ouro_rows.k.transpose(0, 2, 1, 3))


def _earlier_reference(q, earlier_k, earlier_v, rows, chunk):
    """Token i of chunk c sees the earlier rows of chunks < c and the own rows of its chunk up to i."""
    positions = np.arange(S)
    chunk_of = positions // chunk
    keys = np.zeros((B, S, 2 * S, K, D), np.float32)
    values = np.zeros_like(keys)
    visible = np.zeros((B, S, 2 * S), bool)
    for i in range(S):
        keys[:, i] = np.concatenate([earlier_k, rows.k], axis=1)
        values[:, i] = np.concatenate([earlier_v, rows.v], axis=1)
        visible[:, i, :S] = chunk_of < chunk_of[i]
        visible[:, i, S:] = (chunk_of == chunk_of[i]) & (positions <= i)
    return _attention(q, keys, values, visible)


@pytest.mark.parametrize("chunk", [1, 2, 3, S])
def test_earlier_rows_sees_earlier_chunks_rows_and_its_own_chunk(chunk):
    rows, layer, loop = _rows(11), 1, 2
    stored = KVCache(k=_random(13, (LAYERS, B, K, S, D)), v=_random(14, (LAYERS, B, K, S, D)), end_index=None)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    got, cache = EarlierRows(rows=stored, chunk_size=chunk).attend(
        Q, rows, None, None, _context(positions), layer, loop
    )
    earlier_k = np.asarray(stored.k[layer]).transpose(0, 2, 1, 3)  # [B, S, K, D]
    earlier_v = np.asarray(stored.v[layer]).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, _earlier_reference(Q, earlier_k, earlier_v, rows, chunk), atol=TOL)
    assert cache is None
    if chunk == S:  # one chunk: nothing earlier, the tokens alone
        np.testing.assert_allclose(got, OwnTokens().attend(Q, rows, None, None, _context(positions), 0, 0)[0], atol=TOL)


def test_earlier_rows_with_alpha_mixes_stored_and_own_rows():
    rows, ouro_rows, layer, loop, chunk, alpha = _rows(15), _rows(17), 1, 2, 2, 0.25
    melt = KVCache(k=_random(19, (LAYERS, B, K, S, D)), v=_random(20, (LAYERS, B, K, S, D)), end_index=None)
    ouro = KVCache(
        k=_random(21, (LOOPS, LAYERS, B, K, S, D)), v=_random(22, (LOOPS, LAYERS, B, K, S, D)), end_index=None
    )
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    source = EarlierRows(rows=InterpolatedCache(melt=melt, ouro=ouro), chunk_size=chunk, alpha=jnp.float32(alpha))
    assert source.interpolates and not EarlierRows(rows=melt, chunk_size=chunk).interpolates
    got, _ = source.attend(Q, rows, ouro_rows, None, _context(positions), layer, loop)
    mix = lambda a, b: alpha * np.asarray(a) + (1 - alpha) * np.asarray(b)  # noqa: E731
    earlier_k = mix(melt.k[layer], ouro.k[loop, layer]).transpose(0, 2, 1, 3)
    earlier_v = mix(melt.v[layer], ouro.v[loop, layer]).transpose(0, 2, 1, 3)
    mixed = Rows(k=mix(rows.k, ouro_rows.k), v=mix(rows.v, ouro_rows.v))
    np.testing.assert_allclose(got, _earlier_reference(Q, earlier_k, earlier_v, mixed, chunk), atol=TOL)


def test_sources_refuse_a_cache_they_cannot_use():
    melt_cache = _empty_cache((LAYERS,))
    interpolated = InterpolatedCache(melt=melt_cache, ouro=_empty_cache((LOOPS, LAYERS)))
    with pytest.raises(ConfigError, match="SlotCache needs a KVCache"):
        SlotCache().check(None)
    with pytest.raises(ConfigError, match="InterpolatedSlotCache needs an InterpolatedCache"):
        InterpolatedSlotCache(jnp.float32(0.5)).check(melt_cache)
    for source in (OwnTokens(), InterpolatedTokens(jnp.float32(0.5)), EarlierRows(rows=melt_cache, chunk_size=2)):
        with pytest.raises(ConfigError, match="reads no cache"):
            source.check(melt_cache)
    SlotCache().check(melt_cache)
    InterpolatedSlotCache(jnp.float32(0.5)).check(interpolated)
    assert isinstance(default_source(None), OwnTokens) and isinstance(default_source(melt_cache), SlotCache)
