"""MELT: Ouro with one KV cache per layer shared by all loops, updated by an element-wise gate.

For layer l and a token in flight at loop t, with u_t = N1(h) the attention input:

    s_1 = u_1                                              (choice: the first loop writes the row as is)
    z_t = sigmoid(u_t W_z + s_{t-1} U_z + b_z),  s_t = z_t * s_{t-1} + (1 - z_t) * u_t    (t >= 2)
    k_t = RoPE(s_t W_K),  v_t = s_t W_V,  q_t = RoPE(u_t W_Q)

The recurrence runs over the loops of one token (choice, spec melt.md section 1). The token's cache row
is rewritten at every loop, so after the last loop it holds the final row; tokens of the same chunk
see each other's loop-t rows, earlier chunks' final rows. Decoding is chunk size 1.
The latent s is carried through the loop scan for the tokens in flight only: [L, B, S, H].
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from melt_jax import param_table
from melt_jax.cache import KVCache, write_rows
from melt_jax.config import MeltConfig, OuroConfig
from melt_jax.decoding import check_tokens_fit, scan_chunks
from melt_jax.errors import ConfigError
from melt_jax.exit import ExitPolicy
from melt_jax.layers import (
    HIDDEN_AXES,
    apply_rope,
    attention_over_cache_slots,
    chunked_attention_over_earlier_rows,
)
from melt_jax.ouro import OuroDecoderLayer, OuroModel, TokenContext
from melt_jax.sharding import constrain

Array = jax.Array


class KVGate(nn.Module):
    """s = z * s_prev + (1 - z) * u with z = sigmoid(u W_z + s_prev U_z + b_z), element-wise.

    w_z, u_z [H, H] act on row vectors ([in, out]); b_z [H]. Initialised to W_z = U_z = 0 and
    b_z = bias_init (choice: an untrained gate is close to "each loop overwrites the row").
    """

    hidden_size: int
    bias_init: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, u: Array, s_prev: Array, first_loop: Array | bool = False) -> Array:
        """The new latent s [B, S, H]; u itself when `first_loop` (s_1 = u_1), without computing the
        gate (a lax.cond: the gate's matmuls run only at loops 2..T)."""
        H = self.hidden_size
        w_z = self.param("w_z", nn.initializers.zeros, (H, H), self.param_dtype).astype(self.dtype)
        u_z = self.param("u_z", nn.initializers.zeros, (H, H), self.param_dtype).astype(self.dtype)
        b_z = self.param("b_z", nn.initializers.constant(self.bias_init), (H,), self.param_dtype)

        def gated():
            gate_logits = jnp.einsum("BSH,HG->BSG", u, w_z) + jnp.einsum("BSH,HG->BSG", s_prev, u_z)
            z = jax.nn.sigmoid(gate_logits + b_z.astype(self.dtype))
            return z * s_prev + (1 - z) * u

        return jax.lax.cond(first_loop, lambda: u, gated)


@flax.struct.dataclass
class InterpolatedCache:
    """The caches of the phase-1 interpolated student (spec melt.md section 3): MELT's rows
    (k, v [L, B, K, S_max, D]: final rows of earlier tokens) and Ouro's per-loop rows of the same
    tokens (k, v [T, L, B, K, S_max, D]), computed from the student's own hidden states."""

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


@flax.struct.dataclass
class EarlierRows:
    """Pass-1 rows for the two-pass training forward: every token's stored rows (a KVCache, or an
    InterpolatedCache when interpolating, with positions 0..S-1) and the chunk size. A token sees these
    rows of the tokens of earlier chunks, and the current-loop rows of its own chunk."""

    cache: KVCache | InterpolatedCache
    chunk_size: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class MeltState:
    """What MELT's layers carry through the loops: the cache (or None), the gate latent s of the
    tokens in flight [L, B, S, H], the interpolation weight alpha (None: pure MELT) and, in the
    two-pass training forward, the pass-1 rows."""

    cache: KVCache | InterpolatedCache | None
    latent: Array
    alpha: Array | None = None
    earlier: EarlierRows | None = None


class MeltDecoderLayer(OuroDecoderLayer):
    """Ouro's layer with keys and values computed from the gated latent s instead of u = N1(h).

    With an interpolation weight alpha, every key/value attended to is alpha * (MELT row) +
    (1 - alpha) * (Ouro row of that token at this loop): alpha = 0 is Ouro, alpha = 1 is MELT.
    """

    def setup(self):
        super().setup()
        c = self.config
        self.kv_gate = KVGate(c.hidden_size, c.gate_bias_init, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)

    def attention(self, u: Array, ctx: TokenContext, state: MeltState, layer_index, loop_index):
        s_prev = state.latent[layer_index]  # [B, S, H]
        s = constrain(self.kv_gate(u, s_prev, first_loop=loop_index == 0), HIDDEN_AXES)
        state = state.replace(latent=state.latent.at[layer_index].set(s))
        q = apply_rope(self.attn.queries(u), ctx.cos, ctx.sin)  # [B, S, N, D]
        k, v = self.attn.keys_values(s)  # [B, S, K, D], MELT rows at this loop
        k = apply_rope(k, ctx.cos, ctx.sin)
        alpha = state.alpha
        if alpha is None:
            mix = lambda melt, ouro: melt  # noqa: E731
            k_ouro = v_ouro = None
        else:
            mix = lambda melt, ouro: alpha * melt + (1 - alpha) * ouro  # noqa: E731
            k_ouro, v_ouro = self.attn.keys_values(u)  # Ouro's rows of these tokens at this loop
            k_ouro = apply_rope(k_ouro, ctx.cos, ctx.sin)
        melt_slot, ouro_slot = (layer_index,), (loop_index, layer_index)

        if state.earlier is not None:  # two-pass, pass 2: all chunks at once
            earlier = state.earlier
            rows = earlier.cache
            if alpha is None:
                prev_k, prev_v = rows.k[melt_slot], rows.v[melt_slot]
            else:
                prev_k = mix(rows.melt.k[melt_slot], rows.ouro.k[ouro_slot])
                prev_v = mix(rows.melt.v[melt_slot], rows.ouro.v[ouro_slot])
            attended = chunked_attention_over_earlier_rows(
                q, prev_k.astype(k.dtype), prev_v.astype(v.dtype), mix(k, k_ouro), mix(v, v_ouro), earlier.chunk_size
            )
            return self.attn.output(attended), state

        if isinstance(state.cache, InterpolatedCache):
            melt_cache, ouro_cache = state.cache.melt, state.cache.ouro
            melt_k = write_rows(melt_cache.k, melt_slot, k, ctx.positions)
            melt_v = write_rows(melt_cache.v, melt_slot, v, ctx.positions)
            ouro_k = write_rows(ouro_cache.k, ouro_slot, k_ouro, ctx.positions)
            ouro_v = write_rows(ouro_cache.v, ouro_slot, v_ouro, ctx.positions)
            cache = InterpolatedCache(
                melt=melt_cache.replace(k=melt_k, v=melt_v), ouro=ouro_cache.replace(k=ouro_k, v=ouro_v)
            )
            keys = mix(melt_k[melt_slot], ouro_k[ouro_slot])  # [B, K, S_max, D]
            values = mix(melt_v[melt_slot], ouro_v[ouro_slot])
            out = self.attn.output(attention_over_cache_slots(q, keys, values, ctx.positions))
            return out, state.replace(cache=cache)

        if state.cache is None and alpha is not None:  # one chunk, interpolated
            out, _ = self.attend(q, mix(k, k_ouro), mix(v, v_ouro), ctx, None, melt_slot)
            return out, state
        out, cache = self.attend(q, k, v, ctx, state.cache, melt_slot)
        return out, state.replace(cache=cache)


class MeltModel(OuroModel):
    """MELT causal LM: Ouro's parameters plus layers/kv_gate/{w_z, u_z, b_z} ([L, ...]).

    Called on one chunk of tokens. With a cache (k, v [L, B, K, S_max, D], see `init_melt_cache`), the
    chunk attends to the final rows of the earlier tokens in the cache and to its own loop-t rows, and
    leaves its final rows in the cache. Without a cache, the tokens form one chunk. Keyword arguments
    `alpha` (phase-1 interpolation weight; pass an InterpolatedCache as the cache, if any) and
    `earlier` (EarlierRows, the two-pass training forward) select the training variants.
    """

    config: MeltConfig
    layer_class = MeltDecoderLayer

    def initial_state(self, h: Array, cache, alpha=None, earlier: EarlierRows | None = None) -> MeltState:
        if alpha is not None and cache is not None and not isinstance(cache, InterpolatedCache):
            raise ValueError("interpolation (alpha) with a cache needs an InterpolatedCache")
        latent = jnp.zeros((self.config.num_layers, *h.shape), h.dtype)  # [L, B, S, H]
        alpha = None if alpha is None else jnp.asarray(alpha, h.dtype)
        return MeltState(cache=cache, latent=latent, alpha=alpha, earlier=earlier)

    def final_cache(self, state: MeltState):
        return state.cache


def init_melt_cache(config: MeltConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty MELT cache: k, v zeros of [L, B, K, S_max, D] in `dtype` (default config.dtype)."""
    if max_length < 1:
        raise ValueError(f"cache max_length must be >= 1, got {max_length}")
    dtype = dtype or config.jnp_dtype
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), end_index=jnp.zeros((batch_size,), jnp.int32))


def melt_cache_bytes_per_token(config: MeltConfig, dtype=None) -> int:
    """Bytes of K and V one token occupies in a MELT cache: L * 2 * K * D * itemsize (no T)."""
    itemsize = jnp.dtype(dtype or config.jnp_dtype).itemsize
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize


def chunked_prefill(
    model: MeltModel,
    params,
    tokens: Array,
    cache: KVCache,
    chunk_size: int | None = None,
    exit_policy: ExitPolicy = ExitPolicy(),
):
    """Runs tokens [B, S] through MELT chunk after chunk (`chunk_size`, default config.chunk_size; the
    last chunk may be shorter), each chunk reading the final rows the earlier ones stored. Returns
    (logits [B, S, V] chosen by `exit_policy`, updated cache)."""
    chunk_size = model.config.chunk_size if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    check_tokens_fit(tokens, cache)
    return _chunked_prefill(model, params, tokens, cache, chunk_size, exit_policy)


@functools.partial(jax.jit, static_argnames=("model", "chunk_size", "exit_policy"), donate_argnames=("cache",))
def _chunked_prefill(model, params, tokens, cache, chunk_size, exit_policy):
    def run_chunk(cache, chunk, start):  # chunk [B, C]
        out = model.apply({"params": params}, chunk, cache=cache, exit_policy=exit_policy)
        return out.cache, out.logits

    cache, logits = scan_chunks(run_chunk, cache, tokens, chunk_size)  # [B, S, V]
    return logits, cache


def melt_from_ouro(ouro_config: OuroConfig, ouro_params: dict, **melt_fields) -> tuple[MeltConfig, dict]:
    """A MELT model initialised from an Ouro model: the same weights (not copied) plus the params only
    MELT has (the per-layer gates), each filled with the init of its row of the parameter table
    (W_z = U_z = 0, b_z = gate_bias_init), in the params' dtype. `melt_fields` set MeltConfig fields
    (gate_bias_init, chunk_size)."""
    if ouro_config.model_type != "ouro":
        raise ConfigError(f"expected an Ouro checkpoint (model_type 'ouro'), got model_type {ouro_config.model_type!r}")
    config = MeltConfig.from_ouro(ouro_config, **melt_fields)
    dtype = ouro_params["layers"]["attn_in_norm"]["scale"].dtype
    new = {
        spec.path: np.full(spec.param_shape(config), spec.initial_value(config), dtype)
        for spec in param_table.PARAMS
        if spec.when == param_table.MELT
    }
    return config, param_table.with_params(ouro_params, new)
