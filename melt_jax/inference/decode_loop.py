"""The two compiled programs of `generate` (melt_jax/inference/generation.py): `start_generation`
prefills the padded prompts and draws the first new token, `decode_until` runs one-token decode steps
in a `lax.while_loop` until every row is done or a step limit is reached."""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from melt_jax.inference.sampling import draw_keys, next_tokens
from melt_jax.model.cache import KVCache
from melt_jax.model.chunking import scan_chunks
from melt_jax.model.exit import select_hidden

Array = jax.Array


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries.

    cache: the KV cache (end_index [B] = each row's next position); last: [B] the last new token;
    out: [B, N] new tokens (N >= every row's limit), valid up to num_new; num_new: [B] tokens recorded;
    limit: [B] most new tokens of each row (0: a padding row, done from the start); done: [B];
    hit_stop: [B] ended on a stop token; step: [] new tokens drawn so far (all rows); row_keys: [B]
    random keys, one per row from its own seed; stop_ids: [n] stop token ids, padded with -1;
    loops: [] loops computed by the decode steps so far (T per step, fewer under an exit policy
    that skips loops).
    """

    cache: KVCache
    last: Array
    out: Array
    num_new: Array
    limit: Array
    done: Array
    hit_stop: Array
    step: Array
    row_keys: Array
    stop_ids: Array
    loops: Array


def _prefill_last_hidden(model: nn.Module, params, tokens: Array, lengths: Array, cache: KVCache, chunk_size: int):
    """Runs tokens [B, P] into the cache chunk after chunk (chunks of `chunk_size` from position 0,
    the last one possibly shorter). Returns (hidden [T, B, H] and exit_pdf [B, T] at each row's
    position lengths - 1, cache)."""
    last = lengths - 1  # [B]

    def run_chunk(carry, chunk, start):  # chunk [B, C] at positions start..start+C-1
        cache, hidden, pdf = carry
        out = model.apply({"params": params}, chunk, cache=cache, exit_policy=None)
        offset = jnp.clip(last - start, 0, chunk.shape[1] - 1)  # [B]
        here = (last >= start) & (last < start + chunk.shape[1])  # [B]
        new_hidden = jnp.take_along_axis(out.loop_hidden, offset[None, :, None, None], axis=2)[:, :, 0]  # [T, B, H]
        new_pdf = jnp.take_along_axis(out.exit_pdf, offset[:, None, None], axis=1)[:, 0]  # [B, T]
        hidden = jnp.where(here[None, :, None], new_hidden, hidden)
        pdf = jnp.where(here[:, None], new_pdf, pdf)
        return (out.cache, hidden, pdf), None

    c = model.config
    hidden = jnp.zeros((c.num_loops, tokens.shape[0], c.hidden_size), c.jnp_dtype)
    pdf = jnp.zeros((tokens.shape[0], c.num_loops), c.jnp_dtype)
    (cache, hidden, pdf), _ = scan_chunks(run_chunk, (cache, hidden, pdf), tokens, chunk_size)
    return hidden, pdf, cache


def _record(state: DecodeState, token: Array) -> DecodeState:
    """Adds token [B] as new token number state.step of the rows that are not done."""
    active = ~state.done
    out = state.out.at[:, state.step].set(jnp.where(active, token, -1))
    is_stop = jnp.any(token[:, None] == state.stop_ids[None, :], axis=-1) & active
    num_new = state.num_new + active
    done = state.done | is_stop | (num_new >= state.limit)
    return state.replace(
        last=token, out=out, num_new=num_new, done=done, hit_stop=state.hit_stop | is_stop, step=state.step + 1
    )


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "rule", "chunk_size", "max_new", "extra_slots"))
def start_generation(
    model, params, tokens, lengths, limits, seeds, stop_ids, *, exit_policy, rule, chunk_size, max_new, extra_slots=0
) -> DecodeState:
    """Prefill of tokens [B, P] (true lengths [B]) and the first new token; see the module docstring.
    limits [B]: most new tokens per row (<= max_new, the size of the new-token buffer and of the
    cache beyond P); seeds [B]: each row's seed; extra_slots: cache slots beyond P + max_new (room for
    a decoder that writes rows past the last token it keeps, as speculative decoding does)."""
    batch, seq = tokens.shape
    cache = model.init_cache(batch, seq + max_new + extra_slots)
    hidden, pdf, cache = _prefill_last_hidden(model, params, tokens, lengths, cache, chunk_size)
    chosen, _ = select_hidden(hidden[:, :, None], pdf[:, None], exit_policy)  # [B, 1, H]
    logits = model.apply({"params": params}, chosen[:, 0], method="logits")  # [B, V]
    row_keys = jax.vmap(jax.random.key)(seeds)  # [B]: a row's draws depend on its seed alone
    state = DecodeState(
        cache=cache.replace(end_index=lengths),
        last=jnp.zeros((batch,), jnp.int32),
        out=jnp.full((batch, max_new), -1, jnp.int32),
        num_new=jnp.zeros((batch,), jnp.int32),
        limit=limits,
        done=limits < 1,
        hit_stop=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
        row_keys=row_keys,
        stop_ids=stop_ids,
        loops=jnp.zeros((), jnp.int32),
    )
    return _record(state, next_tokens(logits, draw_keys(row_keys, 0), rule))


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "rule"), donate_argnames=("state",))
def decode_until(model, params, state: DecodeState, until_step, *, exit_policy, rule) -> DecodeState:
    """Decode steps until state.step reaches until_step or every row is done."""

    def unfinished(state):
        return (state.step < until_step) & ~jnp.all(state.done)

    def step(state):
        out = model.apply({"params": params}, state.last[:, None], cache=state.cache, exit_policy=exit_policy)
        token = next_tokens(out.logits[:, 0], draw_keys(state.row_keys, state.step), rule)
        return _record(state.replace(cache=out.cache, loops=state.loops + out.loops_computed), token)

    return jax.lax.while_loop(unfinished, step, state)
