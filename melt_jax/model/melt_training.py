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
that token at the current loop; alpha = 0 is Ouro, alpha = 1 is MELT. With `segment_ids` [B, S]
(packed documents) a token attends only to tokens of its own segment, in both forwards.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from melt_jax.model.attention import EarlierRows, InterpolatedSlotCache, SlotCache, init_training_cache
from melt_jax.model.chunking import num_chunks, scan_chunks
from melt_jax.model.exit import exit_distribution
from melt_jax.model.ouro import OuroOutput

Array = jax.Array


def sequential_forward(
    model: nn.Module,
    params,
    tokens: Array,
    chunk_size: int,
    alpha=None,
    segment_ids: Array | None = None,
    filled_only: bool = False,
) -> OuroOutput:
    """All loops of MELT on tokens [B, S], chunk after chunk with a cache; full gradient. The cache
    holds the whole sequence, so its slots' segment ids are `segment_ids` itself. `filled_only`
    (without alpha): each chunk reads only the cache before it, as inference does
    (`SlotCache.filled_only`): the values of a chunked prefill, but no gradient.

    Returns an OuroOutput with loop_hidden [T, B, S, H], gate_logits [T, B, S], exit_pdf, the
    intermediates the model collects ([T, L, B, S, H]) and the final cache; no logits (project
    loop_hidden with `model.logits` as needed).
    """
    batch, seq = tokens.shape
    num_chunks(seq, chunk_size)
    cache = init_training_cache(model.config, batch, seq, alpha is not None)
    if alpha is None:
        source = SlotCache(segment_ids, filled_only=filled_only)
    else:
        source = InterpolatedSlotCache(alpha, segment_ids)

    def one_chunk(cache, chunk, start):  # chunk [B, C]
        out = model.apply({"params": params}, chunk, cache=cache, kv_source=source, exit_policy=None)
        return out.cache, (out.loop_hidden, out.gate_logits, out.intermediates)

    # Token axes of the outputs: [T, B, C, H], [T, B, C], {name: [T, L, B, C, H]}.
    token_axes = (2, 2, {name: 3 for name in model.collect})
    cache, (loop_hidden, gate_logits, intermediates) = scan_chunks(one_chunk, cache, tokens, chunk_size, token_axes)
    return OuroOutput(
        logits=None,
        exit_loops=None,
        loop_logits=None,
        loop_hidden=loop_hidden,
        gate_logits=gate_logits,
        exit_pdf=exit_distribution(gate_logits),
        intermediates=intermediates,
        cache=cache,
        loops_computed=jnp.int32(model.config.num_loops),
    )


def two_pass_forward(
    model: nn.Module, params, tokens: Array, chunk_size: int, alpha=None, segment_ids: Array | None = None
) -> OuroOutput:
    """The same values as `sequential_forward`, computed as pass 1 (chunked prefill, no gradient) and
    pass 2 (all chunks in parallel over the pass-1 rows of earlier chunks). Returns the same fields;
    its cache is the pass-1 cache."""
    num_chunks(tokens.shape[1], chunk_size)
    rows_only = model.clone(collect=())
    rows = sequential_forward(rows_only, jax.lax.stop_gradient(params), tokens, chunk_size, alpha, segment_ids).cache
    rows = jax.lax.stop_gradient(rows)
    source = EarlierRows(rows=rows, chunk_size=chunk_size, alpha=alpha)
    out = model.apply({"params": params}, tokens, segment_ids=segment_ids, kv_source=source, exit_policy=None)
    return out.replace(cache=rows)
