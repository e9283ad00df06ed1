"""Cutting a token sequence into chunks: the one validation of a chunk size and the one chunk loop.

MELT's values depend on how a sequence is cut (docs/melt.md, "Chunks"): every chunking site (prefill,
the sampler, evaluation, the training forwards) cuts tokens [B, S] into chunks of C tokens from
position 0 with `scan_chunks`, and takes C from the model config (`default_chunk_size`) unless the
caller names another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from melt_jax.errors import ConfigError

Array = jax.Array


def check_chunk_size(chunk_size: Any, name: str = "chunk_size") -> int:
    """`chunk_size` itself; ConfigError naming `name` unless it is a positive integer."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"{name} must be a positive integer, got {chunk_size!r}")
    return chunk_size


def num_chunks(seq_len: int, chunk_size: int, seq_len_name: str | None = None) -> int:
    """The number of chunks of a sequence that `chunk_size` must divide (the training forwards);
    ConfigError otherwise. `seq_len_name` names the length in the message (e.g. a config field)."""
    check_chunk_size(chunk_size)
    if seq_len % chunk_size:
        length = seq_len if seq_len_name is None else f"{seq_len_name}={seq_len}"
        raise ConfigError(f"chunk_size {chunk_size} does not divide the sequence length {length}")
    return seq_len // chunk_size


def padded_chunking(seq_len: int, chunk_size: int) -> tuple[int, int]:
    """(chunk size, padded length) for a forward that needs whole chunks: one chunk of the whole
    sequence when it fits in one, else `chunk_size` and the next multiple of it. Right-padding a
    causal forward changes nothing at the real positions."""
    check_chunk_size(chunk_size)
    if seq_len <= chunk_size:
        return seq_len, seq_len
    return chunk_size, -(-seq_len // chunk_size) * chunk_size


def _join_full_chunks(ys: Array, token_axis: int) -> Array:
    """The outputs of the scan over full chunks, [n, ..., C, ...] with C at token_axis + 1, joined to
    [..., n * C, ...]."""
    x = jnp.moveaxis(ys, 0, token_axis)  # [..., n, C, ...]
    shape = x.shape
    return x.reshape(*shape[:token_axis], shape[token_axis] * shape[token_axis + 1], *shape[token_axis + 2 :])


def scan_chunks(run_chunk: Callable, carry, tokens: Array, chunk_size: int, token_axis: Any = 1):
    """Runs `run_chunk(carry, chunk [B, C], start) -> (carry, ys)` over tokens [B, S] cut into chunks of
    `chunk_size` from position 0 (`start` the chunk's first position): the full chunks in one
    lax.scan, then the shorter last chunk, if any.

    Returns (carry, ys) with every chunk's outputs joined along their token axis: `token_axis` is
    where the chunk's C tokens sit in each output leaf (one int for all leaves, default 1 for
    [B, C, ...], or a tree of ints matching ys). ys is None when run_chunk returns None.
    """
    batch, seq = tokens.shape
    num_full = seq // chunk_size
    if not num_full:  # one chunk, shorter than chunk_size
        return run_chunk(carry, tokens, 0)
    chunks = tokens[:, : num_full * chunk_size].reshape(batch, num_full, chunk_size).swapaxes(0, 1)  # [n, B, C]
    starts = jnp.arange(num_full, dtype=jnp.int32) * chunk_size
    carry, ys = jax.lax.scan(lambda carry, xs: run_chunk(carry, *xs), carry, (chunks, starts))
    if ys is None:
        if seq % chunk_size:
            carry, _ = run_chunk(carry, tokens[:, num_full * chunk_size :], num_full * chunk_size)
        return carry, None
    axes = jax.tree.map(lambda _: token_axis, ys) if isinstance(token_axis, int) else token_axis
    ys = jax.tree.map(_join_full_chunks, ys, axes)
    if seq % chunk_size:
        carry, last = run_chunk(carry, tokens[:, num_full * chunk_size :], num_full * chunk_size)
        ys = jax.tree.map(lambda y, l, a: jnp.concatenate([y, l], axis=a), ys, last, axes)
    return carry, ys
