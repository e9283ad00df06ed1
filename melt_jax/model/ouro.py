"""Ouro, the looped language model: L decoder layers applied T times with shared weights.

    h = embed(tokens)
    for t in 0..T-1:
        for each layer i: h = layer_i(h)        # KV cache slot (t, i)
        h = final_norm(h)                       # after every loop; feeds the next loop
        hidden[t] = h; gate_logit[t] = exit_gate(h)
    logits[t] = lm_head(hidden[t])

Loops are one `nn.scan` with the parameters broadcast, so the compiled program does not grow with T.
Layers are laid out as `config.scan_layers` says:

- True (training, checkpoints): one `nn.scan` over parameters stacked on a leading [L] axis; the
  program does not grow with L either. Each layer's weights are a dynamic slice of the stack, which
  XLA materialises before the matmuls that read them.
- False (decoding): L separate layers `layers_0` .. `layers_{L-1}` unrolled in the program; each
  matmul reads its weights in place. Decoding is bound by reading the weights, T times per token, so
  this is the layout of inference (`melt_jax.model.params.unstack_layers` converts the params).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from melt_jax.errors import ConfigError
from melt_jax.model.attention import KVSource, Rows, TokenContext, control_flow_on_device, default_source
from melt_jax.model.cache import KVCache, init_cache
from melt_jax.model.config import OuroConfig
from melt_jax.model.exit import ExitPolicy, exit_distribution, select_hidden
from melt_jax.model.layers import (
    HIDDEN_AXES,
    MLP,
    AttentionProjections,
    Einsum,
    Embedder,
    RMSNorm,
    apply_rope,
    rope_tables,
)
from melt_jax.model.remat import rematerialized
from melt_jax.sharding import constrain

Array = jax.Array

# Per-layer intermediates a caller may ask for, each stacked to [T, L, B, S, H].
INTERMEDIATES = ("layer_output", "attention_output")


@flax.struct.dataclass
class OuroOutput:
    """Outputs of one forward call.

    logits: [B, S, V] chosen by the exit policy (None when no policy was given).
    exit_loops: [B, S] int32 loop chosen per token under a threshold policy, else None.
    loop_logits: [T, B, S, V] every loop's logits, only when asked for.
    loop_hidden: [T, B, S, H] every loop's hidden state after the final norm.
    gate_logits: [T, B, S] exit gate logits; exit_pdf: [B, S, T] exit probabilities.
    intermediates: name -> [T, L, B, S, H], only the names asked for (see INTERMEDIATES).
    cache: the updated cache, or None when called without one.
    loops_computed: [] int32, the loops this call ran: T, or fewer under a policy that skips loops.
    """

    logits: Array | None
    exit_loops: Array | None
    loop_logits: Array | None
    loop_hidden: Array
    gate_logits: Array
    exit_pdf: Array
    intermediates: dict[str, Array]
    cache: KVCache | None
    loops_computed: Array


def stacked(trees: list) -> Any:
    """The pytrees `trees` (alike) stacked leaf by leaf along a new leading axis, as a scan stacks its
    outputs."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def straight_line_inference(config: OuroConfig) -> bool:
    """Whether the model is traced as straight code: the inference layout (layers unrolled) on GPU,
    where the loops are written out one after the other too (a cache carried through a loop is laid
    out anew for the attention inside it, a copy of the cache per call; straight code is launched as
    one graph of kernels) and the layers' weights are multiplied in the forms XLA's GPU compiler
    reads them once with (see `weight_einsum`)."""
    return not config.scan_layers and not control_flow_on_device()


def layer_kwargs(config: OuroConfig) -> dict[str, Any]:
    return dict(
        dtype=config.jnp_dtype,
        param_dtype=config.jnp_param_dtype,
        init_stddev=config.initializer_range,
    )


class OuroDecoderLayer(nn.Module):
    """One Ouro layer with four norms (N1..N4):

        a = Attention(N1(h));  h = h + N2(a)
        m = MLP(N3(h));        h = h + N4(m)

    Called inside the layer scan as (carry=(h, cache), xs=(layer_index, layer_state), ctx, loop_index,
    source) -> (carry, (layer_state, intermediates)).
    """

    config: OuroConfig
    collect: tuple[str, ...] = ()

    def setup(self):
        c = self.config
        kw = layer_kwargs(c)
        norm_kw = dict(eps=c.rms_norm_eps, param_dtype=c.jnp_param_dtype)
        straight = straight_line_inference(c)
        self.attn = AttentionProjections(
            c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, **kw, gpu_matmuls=straight
        )
        self.mlp = MLP(c.hidden_size, c.intermediate_size, **kw, gpu_matmuls=straight)
        self.attn_in_norm = RMSNorm(**norm_kw)
        self.attn_out_norm = RMSNorm(**norm_kw)
        self.mlp_in_norm = RMSNorm(**norm_kw)
        self.mlp_out_norm = RMSNorm(**norm_kw)

    def attention(self, u: Array, ctx: TokenContext, cache, layer_state, source: KVSource, layer_index, loop_index):
        """The attention sublayer on u = N1(h) [B, S, H]: queries, keys and values from u, attended
        through `source` (a KV source of melt_jax.model.attention), whose cache slot array of (loop,
        layer) holds this layer's rows at this loop, computed the way the config's `attention` says.
        Returns (output [B, S, H] after o_proj, cache, layer_state): Ouro keeps no per-layer state
        across loops."""
        q = apply_rope(self.attn.queries(u), ctx.cos, ctx.sin)  # [B, S, N, D]
        k, v = self.attn.keys_values(u)  # [B, S, K, D]
        rows = Rows(k=apply_rope(k, ctx.cos, ctx.sin), v=v)
        # Ouro's rows are the Ouro rows an interpolating source mixes with (alpha then changes nothing).
        implementation = self.config.attention_implementation
        attended, cache = source.attend(q, rows, rows, cache, ctx, layer_index, loop_index, implementation)
        return self.attn.output(attended), cache, layer_state

    def __call__(self, carry, xs, ctx: TokenContext, loop_index, source: KVSource):
        """One layer at one loop: carry (h [B, S, H], cache), xs (layer_index, this layer's state from
        the previous loop, see `OuroModel.initial_layer_state`). Returns ((h, cache), (layer state,
        collected intermediates))."""
        h, cache = carry
        layer_index, layer_state = xs
        h = constrain(h, HIDDEN_AXES)  # [B, S, H]
        a, cache, layer_state = self.attention(
            self.attn_in_norm(h), ctx, cache, layer_state, source, layer_index, loop_index
        )
        h = h + self.attn_out_norm(a)
        h = h + self.mlp_out_norm(self.mlp(self.mlp_in_norm(h)))
        found = {"layer_output": h, "attention_output": a}
        return (h, cache), (layer_state, {name: found[name] for name in self.collect})


def scan_layers(layer_cls, config: OuroConfig, **layer_attrs):
    """`layer_cls` repeated over config.num_layers with parameters stacked on a leading axis, its
    backward pass recomputing what config.remat says (melt_jax.model.remat)."""
    return nn.scan(
        rematerialized(layer_cls, config.remat),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=config.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, **layer_attrs, name="layers")


class OuroModel(nn.Module):
    """Ouro causal LM. Parameters: embedder, layers (stacked), final_norm, exit_gate, lm_head."""

    config: OuroConfig
    collect: tuple[str, ...] = ()  # per-layer intermediates to return, from INTERMEDIATES
    layer_class = OuroDecoderLayer

    def setup(self):
        c = self.config
        self.embedder = Embedder(c.vocab_size, c.hidden_size, **layer_kwargs(c))
        if c.scan_layers:
            self.layers = scan_layers(self.layer_class, c, collect=self.collect)
        else:
            layer_cls = rematerialized(self.layer_class, c.remat)
            self.layers = [layer_cls(c, collect=self.collect) for _ in range(c.num_layers)]  # layers_0 ..
        self.final_norm = RMSNorm(eps=c.rms_norm_eps, param_dtype=c.jnp_param_dtype)
        self.exit_gate = nn.Dense(
            1,
            dtype=c.jnp_dtype,
            param_dtype=c.jnp_param_dtype,
            kernel_init=nn.initializers.normal(c.initializer_range),
        )
        if not c.tie_word_embeddings:
            self.lm_head = Einsum(
                (c.hidden_size, c.vocab_size), **layer_kwargs(c), gpu_matmuls=straight_line_inference(c)
            )

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_length` tokens, laid out as the
        config says (`config.cache_slots`), in `dtype` (default the activation dtype)."""
        return init_cache(self.config, batch_size, max_length, dtype)

    def scoring_forward(
        self, params, tokens: Array, chunk_size: int | None = None, segment_ids: Array | None = None
    ) -> OuroOutput:
        """The teacher-forced forward of evaluation on tokens [B, S] (with their segment ids [B, S] if
        given): every loop's hidden states and the exit distribution of the values inference computes
        (no logits: project loop_hidden with `logits`). Ouro runs the whole sequence at once: its
        values do not depend on `chunk_size`."""
        return self.apply({"params": params}, tokens, segment_ids=segment_ids, exit_policy=None)

    def logits(self, hidden: Array) -> Array:
        """LM head: [..., H] -> [..., V] in the activation dtype."""
        if self.config.tie_word_embeddings:
            logits = self.embedder.attend(hidden)
        else:
            logits = self.lm_head("...H,HV->...V", hidden)
        if logits.ndim >= 3:  # [..., B, S, V]
            logits = constrain(logits, (None,) * (logits.ndim - 3) + ("batch", "length", "vocab"))
        return logits

    def project_logits(self, params, hidden: Array) -> Array:
        """`logits` called from outside the model with its params: hidden [..., H] -> logits [..., V].
        The one projection that inference, evaluation and the training objectives use."""
        return self.apply({"params": params}, hidden, method="logits")

    def token_context(
        self, tokens: Array, positions: Array | None, cache: KVCache | None, segment_ids: Array | None = None
    ) -> TokenContext:
        batch, seq = tokens.shape
        in_order = positions is None
        if positions is None:
            start = cache.end_index[:, None] if cache is not None else jnp.zeros((batch, 1), jnp.int32)
            positions = start + jnp.arange(seq, dtype=jnp.int32)[None, :]
        positions = positions.astype(jnp.int32)
        table_dtype = jnp.promote_types(self.config.jnp_dtype, jnp.float32)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, table_dtype)
        if segment_ids is not None:
            segment_ids = segment_ids.astype(jnp.int32)
        return TokenContext(positions=positions, cos=cos, sin=sin, segment_ids=segment_ids, in_order=in_order)

    def initial_layer_state(self, h: Array):
        """What each layer keeps from one loop to the next for the tokens in flight, stacked on a
        leading [L] axis (None: nothing, as in Ouro). h [B, S, H] is the embedded input."""
        return None

    def apply_layers(self, carry, layer_states, ctx: TokenContext, loop_index, source: KVSource):
        """The layer stack once: carry (h [B, S, H], cache), layer_states stacked [L, ...] or None.
        Returns ((h, cache), (layer_states, intermediates {name: [L, B, S, H]})), the same for both
        layouts of `config.scan_layers`."""
        if self.config.scan_layers:
            return self.layers(carry, (jnp.arange(self.config.num_layers), layer_states), ctx, loop_index, source)
        new_states, found = [], []
        for i, layer in enumerate(self.layers):
            state = None if layer_states is None else layer_states[i]
            # The layer index is a Python int: the slot array it reads is known when tracing.
            carry, (state, intermediates) = layer(carry, (i, state), ctx, loop_index, source)
            new_states.append(state)
            found.append(intermediates)
        layer_states = None if layer_states is None else stacked(new_states)
        return carry, (layer_states, stacked(found))

    def run_loops(self, h: Array, ctx: TokenContext, cache, source: KVSource):
        """All T loops over the layer stack. Returns (loop_hidden [T, B, S, H], gate_logits
        [T, B, S], intermediates {name: [T, L, B, S, H]}, cache)."""
        c = self.config

        def one_loop(model, carry, loop_index, ctx, source):
            h, cache, layer_states = carry
            (h, cache), (layer_states, intermediates) = model.apply_layers(
                (h, cache), layer_states, ctx, loop_index, source
            )
            h = model.final_norm(h)
            gate_logit = model.exit_gate(h)[..., 0]  # [B, S]
            return (h, cache, layer_states), (h, gate_logit, intermediates)

        carry = (h, cache, self.initial_layer_state(h))
        if straight_line_inference(c):
            # Written out, the loop index a Python int (with the layer's, the slot array is known
            # when tracing: a kernel reads it in place).
            outputs = []
            for loop_index in range(c.num_loops):
                carry, out = one_loop(self, carry, loop_index, ctx, source)
                outputs.append(out)
            loop_hidden, gate_logits, intermediates = stacked(outputs)
            return loop_hidden, gate_logits, intermediates, carry[1]
        loops = nn.scan(
            one_loop,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=c.num_loops,
        )
        (_, cache, _), (loop_hidden, gate_logits, intermediates) = loops(
            self, carry, jnp.arange(c.num_loops), ctx, source
        )
        return loop_hidden, gate_logits, intermediates, cache

    def run_loops_skipping(self, h: Array, ctx: TokenContext, cache, source: KVSource, policy: ExitPolicy):
        """`run_loops` that stops computing a token's loops after its exit loop under `policy` (a
        'loop' or 'threshold' policy with skip_loops), and all loops once every token has exited: a
        `lax.while_loop` over loops, so a batch whose tokens all exit at loop e runs e + 1 loops.

        A token that has exited is frozen: its hidden state, layer states and gate logit keep their
        exit-loop values, and `source.freeze` makes attention read its exit loop's keys and values
        wherever it would read this loop's (see KVSource.freeze); the loops it skips still run for
        the other tokens, whose values are therefore exactly those of `run_loops` up to their own exit
        when every token exits at the same loop (decoding one token per row: rows never see each
        other). Outputs have every loop's slot: the loops a token did not compute hold copies of its
        exit loop's (hidden state, gate logit), so the policy selects the same loop from them. No
        intermediates are collected. Returns run_loops' four outputs and the number of loops run [].

        Where the loops are written out (`straight_line_inference`: GPU inference) all T loops run, the exited
        tokens frozen: the same values, T loops run, no time saved."""
        c = self.config
        num_loops = c.num_loops
        if self.collect:
            raise ConfigError("intermediates cannot be collected while skipping loops")
        nobody = jnp.zeros(h.shape[:2], bool)  # [B, S]
        state = dict(
            loop=jnp.int32(0),
            h=h,
            cache=source.freeze(cache, nobody),
            layer_states=self.initial_layer_state(h),
            loop_hidden=jnp.zeros((num_loops, *h.shape), h.dtype),  # [T, B, S, H]
            gate_logits=jnp.zeros((num_loops, *h.shape[:2]), c.jnp_dtype),  # [T, B, S]
            exited=nobody,
        )

        def unfinished(model, state):
            return (state["loop"] < num_loops) & ~jnp.all(state["exited"])

        def one_loop(model, state):
            loop, exited = state["loop"], state["exited"]
            cache = source.freeze(state["cache"], exited)
            (h, cache), (layer_states, _) = model.apply_layers(
                (state["h"], cache), state["layer_states"], ctx, loop, source
            )
            h = model.final_norm(h)
            gate_logit = model.exit_gate(h)[..., 0]  # [B, S]
            previous = jnp.maximum(loop - 1, 0)
            h = jnp.where(exited[:, :, None], state["h"], h)
            gate_logit = jnp.where(exited, state["gate_logits"][previous], gate_logit.astype(c.jnp_dtype))
            if layer_states is not None:
                layer_states = jnp.where(exited[None, :, :, None], state["layer_states"], layer_states)
            gate_logits = state["gate_logits"].at[loop].set(gate_logit)
            return dict(
                loop=loop + 1,
                h=h,
                cache=cache,
                layer_states=layer_states,
                loop_hidden=state["loop_hidden"].at[loop].set(h),
                gate_logits=gate_logits,
                exited=exited | policy.exited(gate_logits, loop),
            )

        if straight_line_inference(c):
            # Every loop runs, the exited tokens frozen: the same values, without the branch whose
            # operands (the cache among them) the GPU would copy, nor its wait on the host. The loop
            # index is a Python int, as in `run_loops`.
            for loop_index in range(num_loops):
                state = one_loop(self, {**state, "loop": loop_index})
            state["loop"] = jnp.int32(num_loops)
        else:
            state = nn.while_loop(unfinished, one_loop, self, state)
        loops_run = state["loop"]
        # The loops no token computed hold copies of the last one computed.
        not_run = (jnp.arange(num_loops) >= loops_run)[:, None, None]  # [T, 1, 1]
        loop_hidden = jnp.where(not_run[..., None], state["loop_hidden"][loops_run - 1], state["loop_hidden"])
        gate_logits = jnp.where(not_run, state["gate_logits"][loops_run - 1], state["gate_logits"])
        cache = source.fill_skipped(state["cache"], loops_run)
        return loop_hidden, gate_logits, {}, cache, loops_run

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        cache=None,
        *,
        segment_ids: Array | None = None,
        kv_source: KVSource | None = None,
        exit_policy: ExitPolicy | None = ExitPolicy(),
        return_loop_logits: bool = False,
    ) -> OuroOutput:
        """Runs all loops on tokens [B, S].

        positions [B, S] default to end_index + arange(S) with a cache, arange(S) without. With a
        cache, the tokens' keys/values are written at their positions in the cache's slot arrays and
        the returned cache has end_index advanced by S. `segment_ids` [B, S] (packed documents: the
        1-based document index within a row, 0 at padding): a token attends only to tokens of its own
        segment; the positions stay as given (RoPE does not restart per document). `kv_source` says
        where attention reads keys and values (melt_jax.model.attention; default: the cache's slot
        arrays, or the tokens alone). How attention is computed is `config.attention`.
        """
        source = default_source(cache) if kv_source is None else kv_source
        source.check(cache)
        h = self.embedder(tokens)  # [B, S, H]
        ctx = self.token_context(tokens, positions, cache, segment_ids)
        c = self.config
        carried = source.begin(cache, (*tokens.shape, c.num_kv_heads, c.head_dim))
        if exit_policy is not None and exit_policy.skip_loops:
            loop_hidden, gate_logits, intermediates, carried, loops_computed = self.run_loops_skipping(
                h, ctx, carried, source, exit_policy
            )
        else:
            loop_hidden, gate_logits, intermediates, carried = self.run_loops(h, ctx, carried, source)
            loops_computed = jnp.int32(c.num_loops)
        cache = source.end(carried, ctx.positions)
        if cache is not None:
            cache = cache.advance(tokens.shape[1])
        exit_pdf = exit_distribution(gate_logits)  # [B, S, T]
        logits = exit_loops = loop_logits = None
        if exit_policy is not None:
            chosen, exit_loops = select_hidden(loop_hidden, exit_pdf, exit_policy)
            logits = self.logits(chosen)
        if return_loop_logits:
            loop_logits = self.logits(loop_hidden)
        return OuroOutput(
            logits=logits,
            exit_loops=exit_loops,
            loop_logits=loop_logits,
            loop_hidden=loop_hidden,
            gate_logits=gate_logits,
            exit_pdf=exit_pdf,
            intermediates=intermediates,
            cache=cache,
            loops_computed=loops_computed,
        )
