"""MELT's chunk-wise training forwards (docs/melt.md, 'Training forwards'), with optional phase-1 interpolation.

A sequence [B, S] is cut into chunks of C tokens (C must divide S). Both forwards compute the same
values; they differ in gradients and memory:

- `sequential_forward`: a scan over chunks carrying the cache; gradients flow through the cache into
  earlier chunks, and memory grows with the number of chunks.
- `two_pass_forward` (choice, the default for training): pass 1 is the chunked prefill without
  gradients, giving every token's stored rows; pass 2 runs all chunks at once, each token attending to
  the pass-1 rows of earlier chunks (stop-gradient) and to the current-loop rows of its own chunk. The
  gradient is truncated at chunk boundaries; memory is that of ordinary training.

With `alpha` (phase 1), every key/value attended to is alpha * MELT row + (1 - alpha) * Ouro row of
that token at the current loop; alpha = 0 is Ouro, alpha = 1 is MELT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from melt_jax.cache import init_ouro_cache
from melt_jax.exit import exit_distribution
from melt_jax.melt import EarlierRows, InterpolatedCache, MeltModel, init_melt_cache
from melt_jax.ouro import OuroOutput

Array = jax.Array


def check_chunking(seq_len: int, chunk_size: int) -> int:
    """The number of chunks; ValueError unless chunk_size is a positive divisor of seq_len."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if seq_len % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {seq_len}")
    return seq_len // chunk_size


def init_training_cache(model: MeltModel, batch_size: int, length: int, interpolate: bool, dtype=None):
    """An empty cache for a chunked forward: MELT's rows, plus Ouro's per-loop rows when interpolating."""
    melt = init_melt_cache(model.config, batch_size, length, dtype)
    if not interpolate:
        return melt
    return InterpolatedCache(melt=melt, ouro=init_ouro_cache(model.config, batch_size, length, dtype))


def sequential_forward(model: MeltModel, params, tokens: Array, chunk_size: int, alpha=None) -> OuroOutput:
    """All loops of MELT on tokens [B, S], chunk after chunk with a cache; full gradient.

    Returns an OuroOutput with hidden_steps [T, B, S, H], gate_logits [T, B, S], exit_pdf, the
    intermediates the model collects ([T, L, B, S, H]) and the final cache; no logits (project
    hidden_steps with `model.logits` as needed).
    """
    batch, seq = tokens.shape
    num_chunks = check_chunking(seq, chunk_size)
    cache = init_training_cache(model, batch, seq, alpha is not None)

    def one_chunk(cache, chunk):  # chunk [B, C]
        out = model.apply({"params": params}, chunk, cache=cache, exit_policy=None, alpha=alpha)
        return out.cache, (out.hidden_steps, out.gate_logits, out.intermediates)

    chunks = tokens.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)  # [n, B, C]
    cache, (hidden, gates, intermediates) = jax.lax.scan(one_chunk, cache, chunks)

    def merge_chunks(x, chunk_axis_after):
        """[n, ..., B, C, ...] -> [..., B, n*C, ...] with B at position `chunk_axis_after` - 1."""
        x = jnp.moveaxis(x, 0, chunk_axis_after)  # [..., B, n, C, ...]
        shape = x.shape
        return x.reshape(*shape[:chunk_axis_after], seq, *shape[chunk_axis_after + 2 :])

    hidden_steps = merge_chunks(hidden, 2)  # [T, B, S, H]
    gate_logits = merge_chunks(gates, 2)  # [T, B, S]
    intermediates = {name: merge_chunks(x, 3) for name, x in intermediates.items()}  # [T, L, B, S, H]
    return OuroOutput(
        logits=None,
        exit_steps=None,
        step_logits=None,
        hidden_steps=hidden_steps,
        gate_logits=gate_logits,
        exit_pdf=exit_distribution(gate_logits),
        intermediates=intermediates,
        cache=cache,
    )


def two_pass_forward(model: MeltModel, params, tokens: Array, chunk_size: int, alpha=None) -> OuroOutput:
    """The same values as `sequential_forward`, computed as pass 1 (chunked prefill, no gradient) and
    pass 2 (all chunks in parallel over the pass-1 rows of earlier chunks). Returns the same fields;
    its cache is the pass-1 cache."""
    batch, seq = tokens.shape
    check_chunking(seq, chunk_size)
    rows_only = model.clone(collect=())
    rows = sequential_forward(rows_only, jax.lax.stop_gradient(params), tokens, chunk_size, alpha).cache
    rows = jax.lax.stop_gradient(rows)
    out = model.apply({"params": params}, tokens, exit_policy=None, alpha=alpha, earlier=EarlierRows(rows, chunk_size))
    return out.replace(cache=rows)
