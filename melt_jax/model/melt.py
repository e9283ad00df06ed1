"""MELT: Ouro with one KV cache per layer shared by all loops, updated by an element-wise gate.

The gate is `config.gate`: "elementwise" (MELT's, below) or one of the ablations of docs/melt.md,
'Gate variants' ("scalar", "mean", "ema", "last").

For layer l and a token in flight at loop t, with u_t = N1(h) the attention input:

    s_1 = u_1                                              (choice: the first loop writes the row as is)
    z_t = sigmoid(u_t W_z + s_{t-1} U_z + b_z),  s_t = z_t * s_{t-1} + (1 - z_t) * u_t    (t >= 2)
    k_t = RoPE(s_t W_K),  v_t = s_t W_V,  q_t = RoPE(u_t W_Q)

The recurrence runs over the loops of one token (docs/melt.md, 'Recurrence over loops'). The token's cache row
is rewritten at every loop, so after the last loop it holds the final row; tokens of the same chunk
see each other's loop-t rows, earlier chunks' final rows. Decoding is chunk size 1.
The latent s is carried through the loop scan for the tokens in flight only: [L, B, S, H].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from melt_jax.model.attention import KVSource, Rows, TokenContext, control_flow_on_device
from melt_jax.model.chunking import padded_chunking
from melt_jax.model.config import MeltConfig
from melt_jax.model.layers import HIDDEN_AXES, apply_rope, weight_einsum
from melt_jax.model.melt_training import sequential_forward
from melt_jax.model.ouro import OuroDecoderLayer, OuroModel, OuroOutput, straight_line_inference
from melt_jax.sharding import constrain

Array = jax.Array


class KVGate(nn.Module):
    """The element-wise gate (`gate="elementwise"`, MELT's): s = z * s_prev + (1 - z) * u with
    z = sigmoid(u W_z + s_prev U_z + b_z).

    w_z, u_z [H, H] act on row vectors ([in, out]); b_z [H]. Initialised to W_z = U_z = 0 and
    b_z = bias_init (choice: an untrained gate is close to "each loop overwrites the row").
    """

    hidden_size: int
    bias_init: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    gpu_matmuls: bool = False  # see melt_jax.model.layers.weight_einsum (GPU inference)

    @nn.compact
    def __call__(self, u: Array, s_prev: Array, loop_index: Array) -> Array:
        """The new latent s [B, S, H]; u itself at the first loop (s_1 = u_1), without computing the
        gate where the device branches (a lax.cond: the gate's matmuls run only at loops 2..T; on GPU,
        where a branch waits on the host, the gate is computed at every loop and not selected at the
        first)."""
        H = self.hidden_size
        w_z = self.param("w_z", nn.initializers.zeros, (H, H), self.param_dtype)
        u_z = self.param("u_z", nn.initializers.zeros, (H, H), self.param_dtype)
        b_z = self.param("b_z", nn.initializers.constant(self.bias_init), (H,), self.param_dtype)

        def gated():
            dtype, gpu = self.dtype, self.gpu_matmuls
            gate_logits = weight_einsum("BSH,HG->BSG", u, w_z, dtype, gpu) + weight_einsum(
                "BSH,HG->BSG", s_prev, u_z, dtype, gpu
            )
            z = jax.nn.sigmoid(gate_logits + b_z.astype(self.dtype))
            return z * s_prev + (1 - z) * u

        if control_flow_on_device():
            return jax.lax.cond(loop_index == 0, lambda: u, gated)
        return jnp.where(loop_index == 0, u, gated())


class ScalarGate(nn.Module):
    """A learned scalar gate per layer (`gate="scalar"`): s = z * s_prev + (1 - z) * u with
    z = sigmoid(z_logit), one z_logit [1] per layer, initialised to bias_init; s_1 = u_1."""

    bias_init: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, u: Array, s_prev: Array, loop_index: Array) -> Array:
        z_logit = self.param("z_logit", nn.initializers.constant(self.bias_init), (1,), self.param_dtype)
        z = jnp.where(loop_index == 0, 0.0, jax.nn.sigmoid(z_logit.astype(self.dtype)))  # [1]
        return z * s_prev + (1 - z) * u


class FixedGate(nn.Module):
    """A gate without parameters: s = z_t * s_prev + (1 - z_t) * u with z_t fixed per loop t (0-based).

    "mean": z_t = t / (t + 1), so s_t is the mean of u over the loops so far; "ema": z_t = `decay`
    (0 at the first loop), an exponential moving average; "last": z_t = 0, the row of the last loop.
    """

    kind: str
    decay: float = 0.5
    dtype: jnp.dtype = jnp.float32

    def __call__(self, u: Array, s_prev: Array, loop_index: Array) -> Array:
        t = jnp.asarray(loop_index, self.dtype)
        if self.kind == "mean":
            z = t / (t + 1)
        elif self.kind == "ema":
            z = jnp.where(loop_index == 0, 0.0, self.decay).astype(self.dtype)
        else:  # "last"
            return u
        return z * s_prev + (1 - z) * u


def make_gate(config: MeltConfig) -> nn.Module:
    """The KV gate module `config.gate` names (see MeltConfig.gate), named kv_gate in the layer."""
    dtypes = dict(dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype)
    if config.gate == "elementwise":
        two = straight_line_inference(config)
        return KVGate(config.hidden_size, config.gate_bias_init, **dtypes, gpu_matmuls=two, name="kv_gate")
    if config.gate == "scalar":
        return ScalarGate(config.gate_bias_init, **dtypes, name="kv_gate")
    return FixedGate(config.gate, config.gate_ema_decay, dtype=config.jnp_dtype, name="kv_gate")


class MeltDecoderLayer(OuroDecoderLayer):
    """Ouro's layer with keys and values computed from the gated latent s instead of u = N1(h); the
    layer's state across loops is s of the tokens in flight [B, S, H]."""

    def setup(self):
        super().setup()
        self.kv_gate = make_gate(self.config)

    def attention(self, u: Array, ctx: TokenContext, cache, s_prev: Array, source: KVSource, layer_index, loop_index):
        s = constrain(self.kv_gate(u, s_prev, loop_index), HIDDEN_AXES)  # [B, S, H]
        q = apply_rope(self.attn.queries(u), ctx.cos, ctx.sin)  # [B, S, N, D]
        k, v = self.attn.keys_values(s)  # [B, S, K, D], MELT's rows at this loop
        rows = Rows(k=apply_rope(k, ctx.cos, ctx.sin), v=v)
        ouro_rows = None
        if source.interpolates:  # Ouro's rows of these tokens at this loop
            k_ouro, v_ouro = self.attn.keys_values(u)
            ouro_rows = Rows(k=apply_rope(k_ouro, ctx.cos, ctx.sin), v=v_ouro)
        implementation = self.config.attention_implementation
        attended, cache = source.attend(q, rows, ouro_rows, cache, ctx, layer_index, loop_index, implementation)
        return self.attn.output(attended), cache, s


class MeltModel(OuroModel):
    """MELT causal LM: Ouro's parameters plus layers/kv_gate/{w_z, u_z, b_z} ([L, ...]).

    Called on one chunk of tokens. With a cache (k, v [L, B, K, S_max, D], see `init_cache`), the
    chunk attends to the final rows of the earlier tokens in the cache and to its own loop-t rows, and
    leaves its final rows in the cache. Without a cache, the tokens form one chunk. The training
    variants (phase-1 interpolation, the two-pass forward's pass 2) are KV sources passed as
    `kv_source=` (melt_jax.model.attention).
    """

    config: MeltConfig
    layer_class = MeltDecoderLayer

    def initial_layer_state(self, h: Array) -> Array:
        """The gate latent s of every layer before the first loop, zeros [L, B, S, H] (the first loop
        does not read it: s_1 = u_1)."""
        return jnp.zeros((self.config.num_layers, *h.shape), h.dtype)

    def scoring_forward(
        self, params, tokens: Array, chunk_size: int | None = None, segment_ids: Array | None = None
    ) -> OuroOutput:
        """The teacher-forced forward of evaluation on tokens [B, S] (with their segment ids [B, S] if
        given): the values inference computes, chunks of `chunk_size` (default config.chunk_size) from
        position 0, each attending to the final rows of the earlier chunks (the one-pass
        `sequential_forward`, reading the cache as inference does: no gradient is needed, so the
        two-pass form would compute the same values twice). A sequence that is not a whole number of
        chunks is right-padded with token 0 (segment 0), which changes nothing at the real positions
        of a causal forward. Returns loop_hidden [T, B, S, H] and exit_pdf [B, S, T] (no logits)."""
        seq = tokens.shape[1]
        chunk, padded = padded_chunking(seq, self.config.default_chunk_size if chunk_size is None else chunk_size)
        padding = ((0, 0), (0, padded - seq))
        tokens = jnp.pad(tokens, padding)  # [B, S'] right-padded with id 0
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, padding)
        out = sequential_forward(
            self.clone(collect=()), params, tokens, chunk, segment_ids=segment_ids, filled_only=True
        )
        return out.replace(
            loop_hidden=out.loop_hidden[:, :, :seq],
            gate_logits=out.gate_logits[:, :, :seq],
            exit_pdf=out.exit_pdf[:, :seq],
            intermediates={},
            cache=None,
        )
