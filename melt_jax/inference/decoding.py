"""jit-compiled prefill and one-token decode steps over a fixed-size KV cache, and the two compiled
programs of `generate` (melt_jax/inference/generation.py) built from them.

`run_prompt` is the one prefill and `run_step` the one decode step: the public `prefill` and
`decode_step` compile them alone; `start_generation` prefills the padded prompts with `run_prompt` and
draws the first new token, and `decode_until` runs `run_step` in a `lax.while_loop` until every row is
done or a step limit is reached.

`model` is a static argument (a linen module with a hashable config); `cache` is donated, so each
step updates its buffers in place and the caller must use the returned cache.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from melt_jax.inference.sampling import draw_keys, next_tokens
from melt_jax.model.cache import KVCache
from melt_jax.model.chunking import check_chunk_size, scan_chunks
from melt_jax.model.exit import ExitPolicy, select_hidden

Array = jax.Array


def check_tokens_fit(tokens: Array, cache: KVCache) -> None:
    """Raises ValueError unless tokens [B, S] match the cache's batch and S fits in it (static
    shapes only; the running end_index is the caller's to keep below max_length)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache was made for {cache.batch_size}")
    if tokens.shape[1] > cache.max_length:
        raise ValueError(f"prompt of {tokens.shape[1]} tokens is longer than the cache ({cache.max_length} positions)")


def run_prompt(
    model: nn.Module,
    params,
    tokens: Array,
    cache: KVCache,
    exit_policy: ExitPolicy,
    chunk_size: int | None,
    last: Array | None = None,
):
    """The prefill (traceable): runs tokens [B, S] through the model, writing them into the cache
    after its current end, in chunks of `chunk_size` tokens from the first (the last chunk may be
    shorter; None: the whole prompt in one call), each chunk reading what the earlier ones stored.

    Returns (logits, updated cache): without `last`, logits [B, S, V] chosen by `exit_policy` at every
    position; with `last` [B] (an index into each row of tokens), logits [B, V] at that position only,
    the chunks keeping every loop's hidden state there and no [B, S, V] tensor being built."""
    if last is None:
        if chunk_size is None:
            out = model.apply({"params": params}, tokens, cache=cache, exit_policy=exit_policy)
            return out.logits, out.cache

        def run_chunk(cache, chunk, start):  # chunk [B, C]
            out = model.apply({"params": params}, chunk, cache=cache, exit_policy=exit_policy)
            return out.cache, out.logits

        cache, logits = scan_chunks(run_chunk, cache, tokens, chunk_size)  # [B, S, V]
        return logits, cache

    def keep_last(carry, chunk, start):  # chunk [B, C] at token indices start..start+C-1
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
    hidden = jnp.zeros((c.num_loops, tokens.shape[0], c.hidden_size), c.jnp_dtype)  # [T, B, H]
    pdf = jnp.zeros((tokens.shape[0], c.num_loops), c.jnp_dtype)  # [B, T]
    chunk_size = tokens.shape[1] if chunk_size is None else chunk_size
    (cache, hidden, pdf), _ = scan_chunks(keep_last, (cache, hidden, pdf), tokens, chunk_size)
    chosen, _ = select_hidden(hidden[:, :, None], pdf[:, None], exit_policy)  # [B, 1, H]
    return model.project_logits(params, chosen[:, 0]), cache  # [B, V]


def run_step(model: nn.Module, params, token: Array, cache: KVCache, exit_policy: ExitPolicy):
    """The decode step (traceable): one token per row, token [B], at position cache.end_index.
    Returns (logits [B, V], updated cache, loops computed [])."""
    out = model.apply({"params": params}, token[:, None], cache=cache, exit_policy=exit_policy)
    return out.logits[:, 0], out.cache, out.loops_computed


def prefill(
    model: nn.Module,
    params,
    tokens: Array,
    cache: KVCache,
    exit_policy: ExitPolicy = ExitPolicy(),
    chunk_size: int | None = None,
):
    """Runs the prompt tokens [B, S] through the model, writing them into the cache after its current
    end, in chunks of `chunk_size` tokens (the last chunk may be shorter), each chunk reading what the
    earlier ones stored. chunk_size defaults to the config's `default_chunk_size`: MELT's chunk_size;
    for Ouro, whose values do not depend on the chunking, 256 tokens (OURO_PREFILL_CHUNK). Returns (logits
    [B, S, V] chosen by `exit_policy`, updated cache)."""
    check_tokens_fit(tokens, cache)
    chunk_size = model.config.default_chunk_size if chunk_size is None else check_chunk_size(chunk_size)
    return _prefill(model, params, tokens, cache, exit_policy, chunk_size)


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "chunk_size"), donate_argnames=("cache",))
def _prefill(model: nn.Module, params, tokens: Array, cache: KVCache, exit_policy: ExitPolicy, chunk_size):
    return run_prompt(model, params, tokens, cache, exit_policy, chunk_size)


@functools.partial(jax.jit, static_argnames=("model", "exit_policy"), donate_argnames=("cache",))
def decode_step(model: nn.Module, params, token: Array, cache: KVCache, exit_policy: ExitPolicy = ExitPolicy()):
    """Feeds one token per row, token [B], at position cache.end_index. Returns (logits [B, V],
    updated cache)."""
    logits, cache, _ = run_step(model, params, token, cache, exit_policy)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "return_loop_logits"))
def forward(
    model: nn.Module,
    params,
    tokens: Array,
    exit_policy: ExitPolicy | None = ExitPolicy(),
    return_loop_logits: bool = False,
):
    """Full forward without a cache on tokens [B, S]; returns the model's output struct."""
    return model.apply({"params": params}, tokens, exit_policy=exit_policy, return_loop_logits=return_loop_logits)


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
    """Prefill of tokens [B, P] (true lengths [B]) into an empty cache and the first new token, drawn
    from the logits at each row's last real position. limits [B]: most new tokens per row (<= max_new,
    the size of the new-token buffer and of the cache beyond P); seeds [B]: each row's seed;
    extra_slots: cache slots beyond P + max_new (room for a decoder that writes rows past the last
    token it keeps, as speculative decoding does)."""
    batch, seq = tokens.shape
    cache = model.init_cache(batch, seq + max_new + extra_slots)
    logits, cache = run_prompt(model, params, tokens, cache, exit_policy, chunk_size, last=lengths - 1)  # [B, V]
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
        logits, cache, loops = run_step(model, params, state.last, state.cache, exit_policy)
        token = next_tokens(logits, draw_keys(state.row_keys, state.step), rule)
        return _record(state.replace(cache=cache, loops=state.loops + loops), token)

    return jax.lax.while_loop(unfinished, step, state)
