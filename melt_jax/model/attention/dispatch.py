"""Which implementation computes an attention call, and the call.

    attend(q, k, v, mask, implementation=..., kv_heads_first=...)           causal (+ segments)
    attend_earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, ...)  MELT's two-pass pattern
    attend_history_and_own(q, cache_k, cache_v, k, v, mask, slot=...)     a slot array + rows in flight

`Implementation.choose` gives the name: "xla" (dense.py), "blockwise" (blockwise.py), or a kernel of
KERNEL_CALLS where the kernel takes the call. Where a kernel does not take it (the slot cache of
decoding and prefill, whose positions in flight are known only when running; positions the caller
gave; for cudnn also segment ids, float32 and the two-pass pattern) it falls back to "auto"'s choice:
dense for few logits (decoding stays dense and fast), and for many the first kernel of the traced-for
platform that takes the call (`implementation.AUTO_KERNELS`: splash on TPU; cuDNN, then the Pallas
GPU kernel on GPU), else blockwise (linear memory on any backend, CPU included). The kernels are
checked against dense on the CPU (splash and the Pallas GPU kernel interpreted, the cuDNN wrapper
through the "xla" implementation of the same API) and compiled for TPU topologies and the H200. All
give the same values to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from melt_jax.model.attention.blockwise import blockwise_attention
from melt_jax.model.attention.cudnn import cudnn_attend, cudnn_takes
from melt_jax.model.attention.dense import dense_attention, dense_earlier_and_own, dense_history_and_own
from melt_jax.model.attention.implementation import DENSE, Implementation
from melt_jax.model.attention.masks import CausalMask, EarlierAndOwnMask
from melt_jax.model.attention.pallas_gpu import (
    pallas_gpu_attend,
    pallas_gpu_earlier_and_own,
    pallas_gpu_history_and_own,
    pallas_gpu_takes,
    pallas_gpu_takes_earlier_and_own,
)
from melt_jax.model.attention.splash import splash_attend, splash_earlier_and_own, splash_takes

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class KernelCalls:
    """How the entry points call a kernel module.

    takes(q, mask) -> bool: whether the kernel computes `attend` with this mask and these shapes.
    attend(q, k, v, mask, implementation, kv_heads_first) -> [B, S, N, D]: `attend` through the kernel.
    earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, segment_ids, implementation): the
    two-pass pattern through the kernel, or None where the kernel does not take it.
    takes_earlier_and_own(q, chunk_size) -> bool: whether it takes the two-pass pattern of these
    queries in chunks of chunk_size (when it has `earlier_and_own`).
    history_and_own(q, cache_k, cache_v, slot, k, v, base, q_segments, slot_segments, implementation):
    the slot array cache_k[slot], cache_v[slot] followed by the rows in flight, the tokens in flight
    in order from `base`, or None where the kernel does not take it.
    """

    takes: Callable[[Array, CausalMask], bool]
    attend: Callable[..., Array]
    earlier_and_own: Callable[..., Array] | None = None
    takes_earlier_and_own: Callable[[Array, int], bool] = lambda q, chunk_size: True
    history_and_own: Callable[..., Array] | None = None


# One line per kernel of implementation.KERNELS.
KERNEL_CALLS = {
    "splash": KernelCalls(takes=splash_takes, attend=splash_attend, earlier_and_own=splash_earlier_and_own),
    "cudnn": KernelCalls(takes=cudnn_takes, attend=cudnn_attend),
    "pallas_gpu": KernelCalls(
        takes=pallas_gpu_takes,
        attend=pallas_gpu_attend,
        earlier_and_own=pallas_gpu_earlier_and_own,
        takes_earlier_and_own=pallas_gpu_takes_earlier_and_own,
        history_and_own=pallas_gpu_history_and_own,
    ),
}


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: CausalMask,
    *,
    implementation: Implementation = DENSE,
    kv_heads_first: bool = False,
) -> Array:
    """Causal attention of q [B, S, N, D] over k, v [B, M, K, D] (or [B, K, M, D] with
    kv_heads_first, the cache layout) with the keys `mask` makes visible. Returns [B, S, N, D].
    A kernel computes the calls its `takes` accepts: in-order masks (`CausalMask.in_order`: the
    tokens in flight attending to each other); "cudnn" without segment ids and only in bf16/fp16
    (`cudnn_takes`)."""
    mask.check()
    num_keys = k.shape[2] if kv_heads_first else k.shape[1]
    chosen = implementation.choose(q.shape[1], num_keys, lambda name: KERNEL_CALLS[name].takes(q, mask))
    if chosen == "xla":
        return dense_attention(q, k, v, mask.dense(), kv_heads_first=kv_heads_first)
    if chosen == "blockwise":
        blocks = dict(query_block=implementation.query_block, key_block=implementation.key_block)
        return blockwise_attention(q, k, v, mask, kv_heads_first=kv_heads_first, **blocks)
    return KERNEL_CALLS[chosen].attend(q, k, v, mask, implementation, kv_heads_first)


def attend_earlier_and_own(
    q: Array,
    earlier_k: Array,
    earlier_v: Array,
    k: Array,
    v: Array,
    chunk_size: int,
    *,
    segment_ids: Array | None = None,
    implementation: Implementation = DENSE,
) -> Array:
    """MELT's two-pass attention over a sequence cut into chunks of `chunk_size`: token i sees the
    `earlier_*` rows of all tokens of earlier chunks and the current rows (k, v) of the tokens of its
    own chunk at positions <= i, in one softmax over both key sets; with segment ids [B, S] only the
    rows of tokens of its own segment.

    q [B, S, N, D]; earlier_k, earlier_v [B, K, S, D] (cache layout); k, v [B, S, K, D]; S a multiple
    of chunk_size. Returns [B, S, N, D]. A kernel with `earlier_and_own` computes it ("splash": its
    mask is known when tracing); "cudnn" does not ("auto"'s choice instead).
    """
    batch, seq = q.shape[:2]

    def takes(name: str) -> bool:
        kernel = KERNEL_CALLS[name]
        return kernel.earlier_and_own is not None and kernel.takes_earlier_and_own(q, chunk_size)

    chosen = implementation.choose(seq, seq, takes)
    if chosen == "xla":
        return dense_earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, segment_ids)
    if chosen == "blockwise":
        mask = EarlierAndOwnMask.of(batch, seq, chunk_size, segment_ids)
        return _blockwise_over_stored_and_own(q, earlier_k, earlier_v, k, v, mask, implementation)
    return KERNEL_CALLS[chosen].earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, segment_ids, implementation)


def _blockwise_over_stored_and_own(q, stored_k, stored_v, k, v, mask, implementation: Implementation) -> Array:
    """Blockwise attention of q [B, S, N, D] over stored rows [B, K, M, D] (cache layout) followed by the
    rows in flight [B, S, K, D], joined into one key set of M + S keys that `mask` describes."""
    keys = jnp.concatenate([stored_k, k.transpose(0, 2, 1, 3).astype(stored_k.dtype)], axis=2)  # [B, K, M + S, D]
    values = jnp.concatenate([stored_v, v.transpose(0, 2, 1, 3).astype(stored_v.dtype)], axis=2)
    blocks = dict(query_block=implementation.query_block, key_block=implementation.key_block)
    return blockwise_attention(q, keys, values, mask, kv_heads_first=True, **blocks)


def attend_history_and_own(
    q: Array,
    cache_k: Array,
    cache_v: Array,
    k: Array,
    v: Array,
    mask: CausalMask,
    *,
    slot: tuple = (),
    implementation: Implementation = DENSE,
    base: Array | None = None,
) -> Array:
    """Attention of q [B, S, N, D] over two key sets in one softmax: a cache slot array
    cache_k[slot], cache_v[slot] ([B, K, S_max, D]; cache_k, cache_v [*P, B, K, S_max, D] with
    len(slot) = len(P), or the slot array itself with slot ()) and the rows of the tokens in flight
    k, v [B, S, K, D]; `mask` describes the S_max + S keys in that order. Dense reads the slot array
    where it lies (no copy of it joined to the new rows); blockwise joins them; the Pallas GPU kernel
    reads it in place in the cache when `slot` holds Python ints. `base` [B]: the tokens in flight are at
    positions base .. base + S - 1 of their row (in order, the model made them), so that the mask is
    the slots before base and the rows in flight causally, known when tracing up to base: a kernel
    with `history_and_own` takes the call ("pallas_gpu"); without it "auto"'s choice. Returns
    [B, S, N, D]."""
    mask.check()
    max_length = cache_k.shape[-2]

    def takes(name: str) -> bool:
        # With a base the rows in flight attend to each other in order: asked as the in-order call
        # of the same queries (dtype, head dim), the kernel says whether it takes them.
        kernel = KERNEL_CALLS[name]
        in_order = mask.replace(in_order=True)
        return base is not None and kernel.history_and_own is not None and kernel.takes(q, in_order)

    chosen = implementation.choose(q.shape[1], max_length + k.shape[1], takes)
    if chosen == "xla":
        return dense_history_and_own(q, cache_k[slot], cache_v[slot], k, v, mask)
    if chosen == "blockwise":
        return _blockwise_over_stored_and_own(q, cache_k[slot], cache_v[slot], k, v, mask, implementation)
    slot_segments = None if mask.k_segments is None else mask.k_segments[:, :max_length]
    kernel = KERNEL_CALLS[chosen]
    return kernel.history_and_own(q, cache_k, cache_v, slot, k, v, base, mask.q_segments, slot_segments, implementation)
