"""jit-compiled prefill and one-token decode steps over a fixed-size KV cache.

`model` is a static argument (a linen module with a hashable config); `cache` is donated, so each
step updates its buffers in place and the caller must use the returned cache.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from melt_jax.model.cache import KVCache
from melt_jax.model.chunking import check_chunk_size, scan_chunks
from melt_jax.model.exit import ExitPolicy

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
    for Ouro, whose values do not depend on the chunking, the whole prompt at once. Returns (logits
    [B, S, V] chosen by `exit_policy`, updated cache)."""
    check_tokens_fit(tokens, cache)
    chunk_size = model.config.default_chunk_size if chunk_size is None else check_chunk_size(chunk_size)
    if chunk_size is None:
        return _prefill(model, params, tokens, cache, exit_policy)
    return _chunked_prefill(model, params, tokens, cache, chunk_size, exit_policy)


@functools.partial(jax.jit, static_argnames=("model", "exit_policy"), donate_argnames=("cache",))
def _prefill(model: nn.Module, params, tokens: Array, cache: KVCache, exit_policy: ExitPolicy):
    out = model.apply({"params": params}, tokens, cache=cache, exit_policy=exit_policy)
    return out.logits, out.cache


@functools.partial(jax.jit, static_argnames=("model", "chunk_size", "exit_policy"), donate_argnames=("cache",))
def _chunked_prefill(model, params, tokens, cache, chunk_size, exit_policy):
    def run_chunk(cache, chunk, start):  # chunk [B, C]
        out = model.apply({"params": params}, chunk, cache=cache, exit_policy=exit_policy)
        return out.cache, out.logits

    cache, logits = scan_chunks(run_chunk, cache, tokens, chunk_size)  # [B, S, V]
    return logits, cache


@functools.partial(jax.jit, static_argnames=("model", "exit_policy"), donate_argnames=("cache",))
def decode_step(model: nn.Module, params, token: Array, cache: KVCache, exit_policy: ExitPolicy = ExitPolicy()):
    """Feeds one token per row, token [B], at position cache.end_index. Returns (logits [B, V],
    updated cache)."""
    out = model.apply({"params": params}, token[:, None], cache=cache, exit_policy=exit_policy)
    return out.logits[:, 0], out.cache


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
