"""Attention: softmax(q k^T / sqrt(D)) v over the keys each query may see, in four implementations.

    attend(q, k, v, mask, implementation=..., kv_heads_first=...)           causal (+ segments)
    attend_earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, ...)  MELT's two-pass pattern

Which keys a query sees is described per token, never as a [B, S, M] array (that array is itself
S x M): a `CausalMask` holds query positions [B, S], key positions [B, M] and optional segment ids;
key j is visible to query i when its position is <= the query's and, with segment ids, both ids are
equal (id 0 marks padding, which then sees only padding). A mask marked `in_order` is the tokens in
flight attending to each other with positions that increase along every row (the model made them),
so that its causal part is j <= i, known when tracing. The two-pass pattern (docs/melt.md, 'Training
forwards') has its own description, `EarlierAndOwnMask`.

Implementations (`Implementation.name`, the model config's `attention` field):

- "xla": dense. Logits [B, K, G, S, M] in float32 and one softmax, then the weighted sum; fastest for
  short sequences, but S * M logits per head are materialised and kept for the backward pass.
- "blockwise": queries in blocks of `query_block`, keys in blocks of `key_block`, an online softmax
  (a running max and sum per query, float32 accumulators) over the key blocks; the gradient is a
  `jax.custom_vjp` that recomputes each block's probabilities from the saved per-query logsumexp,
  so neither direction keeps more than one [query_block, key_block] block of logits per head. Block
  pairs in which no query sees any key (above the causal diagonal, across segments) are skipped
  with `lax.cond`. Sequences that are not a multiple of a block are padded internally with keys no
  query sees and queries that see nothing.
- "auto": "xla" while the dense logits of one head, S * M, stay within AUTO_DENSE_MAX_LOGITS
  (131,072: 512 KiB of float32 per head), "blockwise" above. Measured on CPU (forward and gradient,
  4 query and 2 kv heads of 64): blockwise is as fast as dense up to 256 x 256, 1.6x faster at
  512 x 512, 2-3x at 1,024-2,048 tokens and ~4x at 8,192 (benchmarks/attention_speed.py), but 2-6x
  slower for a few queries over a long cache (decoding: 1 x 32,768 keys, 8 x 4,096), where dense
  logits are small anyway. Counting logits rather than keys keeps decoding dense.
- "splash": jax's TPU Pallas splash attention kernel (`splash_attention`), for the masks known when
  tracing: `attend` with an in-order mask (a training forward's tokens, a MELT chunk without cache)
  and the two-pass pattern, as one kernel call over the [S, 2S] keys [earlier rows, own rows] with a
  mask computed from indices in the kernel; segment ids go to the kernel's SegmentIds; grouped heads
  run natively (query head n reads kv head n // G). Blocks are `query_block` x `key_block`
  (multiples of 128, clipped to the sequence) and the sequence is padded to whole blocks; q is
  scaled by 1/sqrt(D) before the kernel. Under a mesh (`jax.set_mesh`) the kernel runs in a
  `shard_map` over the batch (and the heads over "tensor" when it divides both N and K). Where the
  program is for a TPU (`target_platform`: the mesh's devices, else the default backend) it is the
  compiled kernel; elsewhere its interpreter (same code, slow: for tests).
- "cudnn": cuDNN's flash attention through `jax.nn.dot_product_attention(implementation="cudnn",
  is_causal=True)` (`cudnn_attention`), for `attend` with an in-order mask without segment ids, q in
  bf16 or fp16 and a head dim <= 128 that is a multiple of 8 (`cudnn_takes`). The API's sequence
  lengths describe padding at the end of a row only, not packed documents, and cuDNN has no float32
  flash attention. Off a GPU it is a ConfigError at the first attention call.

Where a kernel does not take a call (the slot cache of decoding and prefill, whose positions in
flight are known only when running; positions the caller gave; for cudnn also segment ids, float32
and the two-pass pattern) it falls back to "auto"'s choice: dense for few logits (decoding stays
dense and fast), blockwise for many (long prefills keep linear memory). "auto" itself never picks a
kernel: the kernels are checked here against dense on the CPU (splash interpreted, the cuDNN wrapper
through the "xla" implementation of the same API) and compiled for TPU topologies, not yet timed
on the accelerators.

All give the same values to float32 rounding. A query that sees no key at all gets the uniform
average of all values from "xla" and zeros from "blockwise"; no attention path of the models has such
a query (every token sees itself), which the kernels rely on.

Letters in shape comments and einsum strings: B batch, S query tokens, M key/value tokens, N query
heads, K key/value heads, G query heads per kv head (N = K * G; query head n reads kv head n // G),
D head dim; in blocks q query and k key tokens; in the dense two-pass pattern n chunks of C query
and E key tokens; S' a length padded to whole kernel blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from melt_jax.dtypes import at_least_float32
from melt_jax.errors import ConfigError
from melt_jax.sharding import partition_spec

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
# Implementations that are accelerator kernels: they serve the masks they can express and fall back
# to the "auto" rule elsewhere (see the module docstring).
KERNELS = ("splash", "cudnn")
# "auto" stays dense up to this many logits per head (S * M); see the module docstring.
AUTO_DENSE_MAX_LOGITS = 128 * 1024
DEFAULT_BLOCK = 512
# The splash kernel's blocks are whole multiples of the TPU's 128 lanes.
SPLASH_LANES = 128
# cuDNN's flash attention takes these dtypes and head dims up to this size, multiples of 8.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128

# A large negative logit for masked keys; finite so that a fully masked row gives a uniform softmax
# instead of NaN in the dense implementation.
_MASKED_LOGIT = -1e30
# Positions of the internal padding: no query sees a padded key, a padded query sees no key.
_NEVER_SEEN = jnp.iinfo(jnp.int32).max
_SEES_NOTHING = -1


def check_implementation(name, query_block, key_block, what: str = "attention") -> None:
    """ConfigError naming `what` (e.g. "config field attention") unless `name` is one of
    IMPLEMENTATIONS and both block sizes are positive integers (multiples of 128 for "splash")."""
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"{what} must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    for suffix, value in (("query_block", query_block), ("key_block", key_block)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{what}_{suffix} must be a positive integer, got {value!r}")
        if name == "splash" and value % SPLASH_LANES:
            raise ConfigError(f"{what}_{suffix} must be a multiple of {SPLASH_LANES} for splash, got {value}")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How attention is computed: `name` one of IMPLEMENTATIONS, and the block sizes of "blockwise"
    and "splash" (clipped to the sequence)."""

    name: str = "xla"
    query_block: int = DEFAULT_BLOCK
    key_block: int = DEFAULT_BLOCK

    def __post_init__(self):
        check_implementation(self.name, self.query_block, self.key_block)

    def resolve(self, num_queries: int, num_keys: int, kernel_takes: bool = False) -> str:
        """The implementation of S = num_queries queries over M = num_keys keys: `name`, except that
        "auto", and a kernel (KERNELS) where `kernel_takes` is False (the call site's mask or shapes
        are not ones the kernel computes), give "xla" up to AUTO_DENSE_MAX_LOGITS logits per head and
        "blockwise" above."""
        if self.name in ("xla", "blockwise") or (self.name in KERNELS and kernel_takes):
            return self.name
        return "xla" if num_queries * num_keys <= AUTO_DENSE_MAX_LOGITS else "blockwise"

    def choose(self, num_queries: int, num_keys: int, kernel_takes: bool = False) -> str:
        """`resolve`, once the kernel is known to run where the program is being traced for: "cudnn"
        asked for a program that is not for a GPU is a ConfigError (whatever the path)."""
        if self.name == "cudnn" and target_platform() != "gpu":
            raise ConfigError(
                "config field attention is 'cudnn' (cuDNN flash attention, GPU only), but this program is "
                f"traced for backend {target_platform()!r}; use 'auto', 'xla', 'blockwise' or 'splash'"
            )
        return self.resolve(num_queries, num_keys, kernel_takes)


def target_platform() -> str:
    """The platform of the program being traced: that of the devices of the mesh set by `jax.set_mesh`
    (the training program and `melt-train compile` trace under one, a TPU topology's compile-only
    devices included), else the default backend's ("cpu", "gpu", "tpu")."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return jax.default_backend() if device is None else device.platform


DENSE = Implementation("xla")


# --------------------------------------------------------------------------------------------------
# Masks, described per token


def _pad_tokens(x: Array, length: int, value: int) -> Array:
    """x [B, L] right-padded with `value` to [B, length]."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)


def _same_segment(q_segments: Array, k_segments: Array) -> Array:
    """[B, S] and [B, M] -> bool [B, S, M]: the query's and the key's segment ids are equal."""
    return q_segments[:, :, None] == k_segments[:, None, :]


@flax.struct.dataclass
class CausalMask:
    """Key j is visible to query i when k_positions[b, j] <= q_positions[b, i] and, with segment ids,
    k_segments[b, j] == q_segments[b, i].

    q_positions [B, S] int, k_positions [B, M] int; q_segments [B, S] and k_segments [B, M] int, both
    or neither. `in_order` (static): the queries are the keys themselves (M = S, the same positions)
    and the positions increase along every row, so that key j is visible to query i exactly when
    j <= i (and the segments agree): a mask known when tracing, which the kernels need.
    """

    q_positions: Array
    k_positions: Array
    q_segments: Array | None = None
    k_segments: Array | None = None
    in_order: bool = flax.struct.field(pytree_node=False, default=False)

    def check(self) -> None:
        if (self.q_segments is None) != (self.k_segments is None):
            raise ConfigError("a CausalMask needs segment ids for both the queries and the keys, or for neither")

    def query_side(self) -> tuple[Array, ...]:
        """The per-query arrays `visible` reads, each [B, S]."""
        return (self.q_positions,) if self.q_segments is None else (self.q_positions, self.q_segments)

    def key_side(self) -> tuple[Array, ...]:
        """The per-key arrays `visible` reads, each [B, M]."""
        return (self.k_positions,) if self.k_segments is None else (self.k_positions, self.k_segments)

    def visible(self, query_side: tuple[Array, ...], key_side: tuple[Array, ...]) -> Array:
        """bool [B, S', M'] for any slices [B, S'] of query_side() and [B, M'] of key_side()."""
        causal = key_side[0][:, None, :] <= query_side[0][:, :, None]
        if len(query_side) == 1:
            return causal
        return causal & _same_segment(query_side[1], key_side[1])

    def dense(self) -> Array:
        """The whole mask, bool [B, S, M] (for the dense implementation)."""
        return self.visible(self.query_side(), self.key_side())

    def padded(self, num_queries: int, num_keys: int) -> CausalMask:
        """The mask of `num_queries` queries and `num_keys` keys whose first S and M are these; the
        padded keys are seen by no query, the padded queries see no key."""
        pad_segments = lambda x, n: None if x is None else _pad_tokens(x, n, 0)  # noqa: E731
        return CausalMask(
            q_positions=_pad_tokens(self.q_positions, num_queries, _SEES_NOTHING),
            k_positions=_pad_tokens(self.k_positions, num_keys, _NEVER_SEEN),
            q_segments=pad_segments(self.q_segments, num_queries),
            k_segments=pad_segments(self.k_segments, num_keys),
        )


def causal_mask(
    q_positions: Array, k_positions: Array, q_segments=None, k_segments=None, *, in_order: bool = False
) -> CausalMask:
    """The CausalMask of queries and keys at these positions [B, S], [B, M] (and segment ids);
    `in_order` as in CausalMask (the caller vouches for it)."""
    mask = CausalMask(q_positions, k_positions, q_segments, k_segments, in_order)
    mask.check()
    if in_order and q_positions.shape != k_positions.shape:
        raise ConfigError(
            f"an in-order CausalMask has the queries as its keys, got {q_positions.shape[1]} queries "
            f"and {k_positions.shape[1]} keys"
        )
    return mask


def slot_mask(q_positions: Array, max_length: int, q_segments=None, slot_segments=None) -> CausalMask:
    """The CausalMask of queries at positions [B, S] over a cache slot array of `max_length` slots
    (slot index = key position), with the slots' segment ids [B, S_max] if given."""
    batch = q_positions.shape[0]
    slots = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch, max_length))  # [B, S_max]
    return causal_mask(q_positions, slots, q_segments, slot_segments)


@flax.struct.dataclass
class EarlierAndOwnMask:
    """The two-pass pattern over the keys [earlier rows of tokens 0..S-1, own rows of tokens 0..S-1]
    (M = 2S): query i sees the earlier row of token j when chunk(j) < chunk(i), and the own row of
    token j when chunk(j) == chunk(i) and j <= i; with segment ids only rows of its segment.

    q_index [B, S] (i), k_index [B, M] (j), k_own [B, M] (1 for own rows); q_segments [B, S] and
    k_segments [B, M] or None; chunk(j) = j // chunk_size.
    """

    q_index: Array
    k_index: Array
    k_own: Array
    q_segments: Array | None = None
    k_segments: Array | None = None
    chunk_size: int = flax.struct.field(pytree_node=False, default=1)

    @classmethod
    def of(cls, batch: int, seq: int, chunk_size: int, segment_ids: Array | None = None) -> EarlierAndOwnMask:
        """The mask of `seq` tokens in chunks of `chunk_size`, with their segment ids [B, S] if given."""
        index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))  # [B, S]
        own = jnp.concatenate([jnp.zeros_like(index), jnp.ones_like(index)], axis=1)  # [B, 2S]
        k_segments = None if segment_ids is None else jnp.concatenate([segment_ids, segment_ids], axis=1)
        return cls(index, jnp.concatenate([index, index], axis=1), own, segment_ids, k_segments, chunk_size)

    def query_side(self) -> tuple[Array, ...]:
        return (self.q_index,) if self.q_segments is None else (self.q_index, self.q_segments)

    def key_side(self) -> tuple[Array, ...]:
        sides = (self.k_index, self.k_own)
        return sides if self.k_segments is None else (*sides, self.k_segments)

    def visible(self, query_side: tuple[Array, ...], key_side: tuple[Array, ...]) -> Array:
        """bool [B, S', M'] for any slices of query_side() and key_side()."""
        q_index, k_index, k_own = query_side[0][:, :, None], key_side[0][:, None, :], key_side[1][:, None, :]
        q_chunk, k_chunk = q_index // self.chunk_size, k_index // self.chunk_size
        own = (k_chunk == q_chunk) & (k_index <= q_index)
        seen = jnp.where(k_own == 1, own, k_chunk < q_chunk)
        if len(query_side) == 1:
            return seen
        return seen & _same_segment(query_side[1], key_side[2])

    def padded(self, num_queries: int, num_keys: int) -> EarlierAndOwnMask:
        """As CausalMask.padded: padded keys are own rows of a chunk no query is in."""
        pad_segments = lambda x, n: None if x is None else _pad_tokens(x, n, 0)  # noqa: E731
        return self.replace(
            q_index=_pad_tokens(self.q_index, num_queries, _SEES_NOTHING),
            k_index=_pad_tokens(self.k_index, num_keys, _NEVER_SEEN),
            k_own=_pad_tokens(self.k_own, num_keys, 1),
            q_segments=pad_segments(self.q_segments, num_queries),
            k_segments=pad_segments(self.k_segments, num_keys),
        )


# --------------------------------------------------------------------------------------------------
# Dense ("xla")


def dense_attention(q: Array, k: Array, v: Array, mask: Array, *, kv_heads_first: bool = False) -> Array:
    """softmax(q k^T / sqrt(D)) v with grouped kv heads; logits and softmax in float32.

    q [B, S, N, D], k and v [B, M, K, D] (or [B, K, M, D] with kv_heads_first, the cache layout),
    mask bool [B, S, M] (True = attend). Returns [B, S, N, D] in q's dtype.
    """
    batch, seq, num_heads, head_dim = q.shape
    kv_spec = "BKMD" if kv_heads_first else "BMKD"
    num_kv_heads = k.shape[1] if kv_heads_first else k.shape[2]
    group = num_heads // num_kv_heads
    q = q.reshape(batch, seq, num_kv_heads, group, head_dim)  # [B, S, K, G, D]
    logits = jnp.einsum(f"BSKGD,{kv_spec}->BKGSM", q, k, preferred_element_type=at_least_float32(q.dtype))
    logits = logits * (head_dim**-0.5)
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, S, M]
    out = jnp.einsum(f"BKGSM,{kv_spec}->BSKGD", probs, v)
    return out.reshape(batch, seq, num_heads, head_dim)


def dense_earlier_and_own(
    q: Array, earlier_k: Array, earlier_v: Array, k: Array, v: Array, chunk_size: int, segment_ids=None
) -> Array:
    """`attend_earlier_and_own` computed densely: the earlier rows' logits [S, S] and the own chunk's
    block by block ([S, C]), one softmax over both."""
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    num_chunks = seq // chunk_size
    compute = at_least_float32(q.dtype)
    q = q.reshape(batch, num_chunks, chunk_size, num_kv_heads, group, head_dim)  # [B, n, C, K, G, D]
    k_blocks = k.reshape(batch, num_chunks, chunk_size, num_kv_heads, head_dim)  # [B, n, E, K, D]
    v_blocks = v.reshape(batch, num_chunks, chunk_size, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    earlier_logits = jnp.einsum("BnCKGD,BKMD->BKGnCM", q, earlier_k, preferred_element_type=compute) * scale
    own_logits = jnp.einsum("BnCKGD,BnEKD->BKGnCE", q, k_blocks, preferred_element_type=compute) * scale
    key_chunk = jnp.arange(seq) // chunk_size  # [M]
    earlier_mask = key_chunk[None, :] < jnp.arange(num_chunks)[:, None]  # [n, M]
    own_mask = jnp.arange(chunk_size)[None, :] <= jnp.arange(chunk_size)[:, None]  # [C, E]
    earlier_mask = earlier_mask[:, None, :]  # [n, 1, M]
    if segment_ids is not None:
        q_segments = segment_ids.reshape(batch, num_chunks, chunk_size)  # [B, n, C]
        same = q_segments[..., :, None] == segment_ids[:, None, None, :]  # [B, n, C, M]
        own_same = q_segments[..., :, None] == q_segments[..., None, :]  # [B, n, C, E]
        earlier_mask = (earlier_mask & same)[:, None, None]  # [B, 1, 1, n, C, M]
        own_mask = (own_mask & own_same)[:, None, None]  # [B, 1, 1, n, C, E]
    earlier_logits = jnp.where(earlier_mask, earlier_logits, _MASKED_LOGIT)
    own_logits = jnp.where(own_mask, own_logits, _MASKED_LOGIT)
    probs = jax.nn.softmax(jnp.concatenate([earlier_logits, own_logits], axis=-1), axis=-1).astype(v.dtype)
    earlier_probs, own_probs = probs[..., :seq], probs[..., seq:]
    out = jnp.einsum("BKGnCM,BKMD->BnCKGD", earlier_probs, earlier_v) + jnp.einsum(
        "BKGnCE,BnEKD->BnCKGD", own_probs, v_blocks
    )
    return out.reshape(batch, seq, num_heads, head_dim)


# --------------------------------------------------------------------------------------------------
# Blockwise


def _to_blocks(x: Array, axis: int, block: int) -> Array:
    """[..., n * block, ...] -> [n, ..., block, ...]: `axis` cut into blocks, the block index first."""
    shape = x.shape
    x = x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _from_blocks(x: Array, axis: int) -> Array:
    """The inverse of _to_blocks: [n, ..., block, ...] -> [..., n * block, ...]."""
    x = jnp.moveaxis(x, 0, axis)
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :])


def _block_logits(q: Array, k: Array, visible: Array, compute) -> Array:
    """Scaled logits of one block pair, masked: q [B, K, G, q, D], k [B, K, k, D], visible
    [B, 1, 1, q, k] -> [B, K, G, q, k] in `compute`."""
    logits = jnp.einsum("BKGqD,BKkD->BKGqk", q, k, preferred_element_type=compute) * (q.shape[-1] ** -0.5)
    return jnp.where(visible, logits, _MASKED_LOGIT)


def _tied_to(anchor: Array, *trees):
    """`trees` unchanged, but computed together with `anchor` (an optimization barrier).

    Under a gradient, JAX splits a scanned computation into what depends on differentiated values and
    what does not, and keeps every output of the second part that the first reads, for every
    iteration. The block masks depend only on token positions: left alone, the masks of every block
    pair of every loop and layer would be kept, S x S in all. Tied to the queries, they are recomputed
    with them instead."""
    return jax.lax.optimization_barrier((anchor, trees))[1]


def _blockwise_forward(query_block: int, key_block: int, q: Array, k: Array, v: Array, mask) -> tuple[Array, Array]:
    """(out [B, K, G, S, D] in q's dtype, logsumexp [B, K, G, S] in float32) of q [B, K, G, S, D] over
    k, v [B, K, M, D]; S and M multiples of the blocks, `mask` of that size."""
    compute = at_least_float32(q.dtype)
    q_blocks = _to_blocks(q, 3, query_block)  # [nq, B, K, G, q, D]
    k_blocks, v_blocks = _to_blocks(k, 2, key_block), _to_blocks(v, 2, key_block)  # [nk, B, K, k, D]
    q_sides = tuple(_to_blocks(x, 1, query_block) for x in mask.query_side())  # each [nq, B, q]
    k_sides = tuple(_to_blocks(x, 1, key_block) for x in mask.key_side())  # each [nk, B, k]

    def one_query_block(_, xs):
        q_i, q_side = xs
        stats = q_i.shape[:-1]  # [B, K, G, q]
        init = (jnp.full(stats, _MASKED_LOGIT, compute), jnp.zeros(stats, compute), jnp.zeros(q_i.shape, compute))

        def one_key_block(carry, ys):
            k_j, v_j, k_side = ys
            visible = mask.visible(*_tied_to(q_i, q_side, k_side))[:, None, None]  # [B, 1, 1, q, k]

            def update(carry):
                running_max, running_sum, acc = carry  # [B, K, G, q], [B, K, G, q], [B, K, G, q, D]
                logits = _block_logits(q_i, k_j, visible, compute)  # [B, K, G, q, k]
                new_max = jnp.maximum(running_max, logits.max(axis=-1))
                probs = jnp.where(visible, jnp.exp(logits - new_max[..., None]), 0.0)
                correction = jnp.exp(running_max - new_max)
                running_sum = running_sum * correction + probs.sum(axis=-1)
                weighted = jnp.einsum("BKGqk,BKkD->BKGqD", probs.astype(v_j.dtype), v_j, preferred_element_type=compute)
                return new_max, running_sum, acc * correction[..., None] + weighted

            return jax.lax.cond(jnp.any(visible), update, lambda carry: carry, carry), None

        (running_max, running_sum, acc), _ = jax.lax.scan(one_key_block, init, (k_blocks, v_blocks, k_sides))
        seen = running_sum > 0  # False only for a query that sees no key
        safe_sum = jnp.where(seen, running_sum, 1.0)
        out = (acc / safe_sum[..., None]).astype(q.dtype)
        return None, (out, jnp.where(seen, running_max + jnp.log(safe_sum), 0.0))

    _, (out, logsumexp) = jax.lax.scan(one_query_block, None, (q_blocks, q_sides))
    return _from_blocks(out, 3), _from_blocks(logsumexp, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise(query_block: int, key_block: int, q: Array, k: Array, v: Array, mask) -> Array:
    """Blockwise attention with the memory-efficient gradient (see `_blockwise_forward` for shapes)."""
    return _blockwise_forward(query_block, key_block, q, k, v, mask)[0]


def _blockwise_fwd(query_block, key_block, q, k, v, mask):
    out, logsumexp = _blockwise_forward(query_block, key_block, q, k, v, mask)
    return out, (q, k, v, mask, out, logsumexp)


def _blockwise_bwd(query_block, key_block, residuals, d_out):
    """Gradients w.r.t. q, k, v from the saved logsumexp, block pair by block pair: with P the
    probabilities recomputed as exp(logits - logsumexp), dV = P^T dO, dP = dO V^T,
    dlogits = P * (dP - rowsum(dO * O)), dQ = dlogits K / sqrt(D), dK = dlogits^T Q / sqrt(D).
    An outer scan over key blocks carries dQ; an inner scan over query blocks accumulates the key
    block's dK and dV."""
    q, k, v, mask, out, logsumexp = residuals
    compute = at_least_float32(q.dtype)
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(compute) * out.astype(compute), axis=-1)  # [B, K, G, S]
    q_blocks, do_blocks = _to_blocks(q, 3, query_block), _to_blocks(d_out, 3, query_block)  # [nq, B, K, G, q, D]
    lse_blocks, delta_blocks = _to_blocks(logsumexp, 3, query_block), _to_blocks(delta, 3, query_block)
    k_blocks, v_blocks = _to_blocks(k, 2, key_block), _to_blocks(v, 2, key_block)  # [nk, B, K, k, D]
    q_sides = tuple(_to_blocks(x, 1, query_block) for x in mask.query_side())
    k_sides = tuple(_to_blocks(x, 1, key_block) for x in mask.key_side())
    query_blocks = (jnp.arange(q_blocks.shape[0]), q_blocks, do_blocks, lse_blocks, delta_blocks, q_sides)

    def one_key_block(dq, ys):
        k_j, v_j, k_side = ys

        def one_query_block(carry, xs):
            i, q_i, do_i, lse_i, delta_i, q_side = xs
            visible = mask.visible(q_side, k_side)[:, None, None]  # [B, 1, 1, q, k]

            def update(dk_j, dv_j):
                logits = _block_logits(q_i, k_j, visible, compute)  # [B, K, G, q, k]
                probs = jnp.where(visible, jnp.exp(logits - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("BKGqk,BKGqD->BKkD", probs, do_i.astype(compute))
                dprobs = jnp.einsum("BKGqD,BKkD->BKGqk", do_i, v_j, preferred_element_type=compute)
                dlogits = probs * (dprobs - delta_i[..., None]) * scale
                dk_j = dk_j + jnp.einsum("BKGqk,BKGqD->BKkD", dlogits, q_i.astype(compute))
                return dk_j, dv_j, jnp.einsum("BKGqk,BKkD->BKGqD", dlogits, k_j.astype(compute))

            def skip(dk_j, dv_j):
                return dk_j, dv_j, jnp.zeros(q_i.shape, compute)

            dk_j, dv_j, dq = carry
            # dq stays outside the cond: a branch that passes the whole [S, D] array through may copy it.
            dk_j, dv_j, dq_i = jax.lax.cond(jnp.any(visible), update, skip, dk_j, dv_j)
            return (dk_j, dv_j, dq.at[i].add(dq_i)), None

        zeros = jnp.zeros(k_j.shape, compute)  # [B, K, k, D]
        (dk_j, dv_j, dq), _ = jax.lax.scan(one_query_block, (zeros, zeros, dq), query_blocks)
        return dq, (dk_j, dv_j)

    dq = jnp.zeros(q_blocks.shape, compute)  # [nq, B, K, G, q, D]
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq, (k_blocks, v_blocks, k_sides))
    grads = (_from_blocks(dq, 3), _from_blocks(dk, 2), _from_blocks(dv, 2))
    return (*(g.astype(x.dtype) for g, x in zip(grads, (q, k, v))), None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _pad_axis(x: Array, axis: int, length: int) -> Array:
    """x zero-padded at the end of `axis` to `length`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: CausalMask | EarlierAndOwnMask,
    *,
    query_block: int = DEFAULT_BLOCK,
    key_block: int = DEFAULT_BLOCK,
    kv_heads_first: bool = False,
) -> Array:
    """The values of `dense_attention(q, k, v, mask.dense())` computed block by block (see the module
    docstring): q [B, S, N, D], k and v [B, M, K, D] (or [B, K, M, D] with kv_heads_first), `mask` a
    per-token description of S queries and M keys. Returns [B, S, N, D] in q's dtype."""
    batch, seq, num_heads, head_dim = q.shape
    if not kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, M, D]
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    q = q.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    query_block, key_block = min(query_block, seq), min(key_block, num_keys)
    padded_seq, padded_keys = _round_up(seq, query_block), _round_up(num_keys, key_block)
    q = _pad_axis(q, 3, padded_seq)  # [B, K, G, S', D]
    k, v = _pad_axis(k, 2, padded_keys), _pad_axis(v, 2, padded_keys)  # [B, K, M', D]
    out = _blockwise(query_block, key_block, q, k, v, mask.padded(padded_seq, padded_keys))
    return out[:, :, :, :seq].transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim)


# --------------------------------------------------------------------------------------------------
# Splash (TPU Pallas kernel)


class _SplashMask:
    """The kernel's description of a static mask over `num_queries` x `num_keys` tokens, the padded
    sizes: `visible(q, k)` says whether key index k is visible to query index q, for numpy arrays
    (when the kernel's block map is built, while tracing) and jax arrays (inside the kernel, for the
    blocks the mask cuts). The splash kernel reads `shape`, slices, `q_sequence` and
    `mask_function`; equal masks hash equal, so that the kernel's block map is built once. Made
    through `_splash_mask_type`, a subclass of the kernel's own Mask."""

    def __init__(self, num_queries: int, num_keys: int, chunk_size: int | None):
        self._shape = (num_queries, num_keys)
        self.chunk_size = chunk_size
        self.q_sequence = np.arange(num_queries, dtype=np.int32)
        self.mask_function = self.visible

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def visible(self, q, k):
        if self.chunk_size is None:  # causal: key j <= query i
            return k <= q
        # Two-pass: keys [earlier rows of tokens 0..S'-1, own rows of the same tokens].
        seq, chunk = self.shape[0], self.chunk_size
        own = k - seq  # the token of an own row
        earlier_seen = (k < seq) & (k // chunk < q // chunk)
        own_seen = (k >= seq) & (own // chunk == q // chunk) & (own <= q)
        return earlier_seen | own_seen

    def __getitem__(self, index) -> np.ndarray:
        rows, cols = (np.arange(size)[part] for size, part in zip(self.shape, index))
        return self.visible(rows[:, None], cols[None, :])

    def _key(self):
        return (self.shape, self.chunk_size)

    def __eq__(self, other) -> bool:
        return isinstance(other, _SplashMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _splash_module():
    """jax's splash attention kernel module; ConfigError naming the field when this jax has none."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask
    except ImportError as e:
        raise ConfigError(
            f"config field attention is 'splash', but jax {jax.__version__} has no splash attention kernel ({e})"
        ) from None
    return splash_attention_kernel, splash_attention_mask


@functools.cache
def _splash_mask_type() -> type:
    """_SplashMask as a subclass of the kernel's Mask, whose module is imported only when used."""
    _, mask_lib = _splash_module()
    return type("SplashMask", (_SplashMask, mask_lib.Mask), {})


def _splash_sizes(seq: int, query_block: int, key_block: int) -> tuple[int, int, int]:
    """(S', query block, key block): the kernel's padded length of `seq` tokens and its blocks, the
    configured ones (multiples of 128) clipped to the sequence, S' a multiple of both."""
    length = _round_up(seq, SPLASH_LANES)
    query_block, key_block = min(query_block, length), min(key_block, length)
    return _round_up(length, math.lcm(query_block, key_block)), query_block, key_block


def _splash_per_device(q, k, v, q_segments, k_segments, *, mask: _SplashMask, query_block, key_block, interpret):
    """The kernel on one device's arrays: q [B, N, S', D] (scaled), k, v [B, K, M', D], segment ids
    [B, S'] and [B, M'] or None. Returns [B, N, S', D]."""
    kernel_lib, mask_lib = _splash_module()
    blocks = kernel_lib.BlockSizes(
        block_q=query_block,
        block_kv=key_block,
        block_kv_compute=key_block,
        block_q_dkv=query_block,
        block_kv_dkv=key_block,
        block_kv_dkv_compute=key_block,
        block_q_dq=query_block,
        block_kv_dq=key_block,
    )
    heads = mask_lib.MultiHeadMask([mask] * q.shape[1])
    kernel = kernel_lib.make_splash_mha(heads, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    if q_segments is None:
        return jax.vmap(kernel)(q, k, v)
    one_row = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=qs, kv=ks))  # noqa: E731
    return jax.vmap(one_row)(q, k, v, q_segments, k_segments)


def _over_the_mesh(per_device, q, k, v, q_segments, k_segments):
    """per_device(q, k, v, q_segments, k_segments) on every device's share of the mesh set by
    `jax.set_mesh` (a `shard_map`: XLA cannot split a kernel call itself), or directly without one.
    q [B, N, S, D], k, v [B, K, M, D]: the batch split as the activations are, the heads over
    "tensor" when it divides both N and K (each device then keeps whole groups of query heads)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_device(q, k, v, q_segments, k_segments)
    q_spec = partition_spec(q.shape, ("batch", "heads", None, None), mesh)
    k_spec = partition_spec(k.shape, ("batch", "kv_heads", None, None), mesh)
    batch, heads = q_spec[0], q_spec[1] if q_spec[1] == k_spec[1] else None
    q_spec, k_spec = PartitionSpec(batch, heads, None, None), PartitionSpec(batch, heads, None, None)
    segment_spec = None if q_segments is None else PartitionSpec(batch, None)
    specs = (q_spec, k_spec, k_spec, segment_spec, segment_spec)
    run = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)
    return run(q, k, v, q_segments, k_segments)


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    q_segments: Array | None = None,
    k_segments: Array | None = None,
    *,
    earlier: tuple[Array, Array] | None = None,
    chunk_size: int | None = None,
    query_block: int = DEFAULT_BLOCK,
    key_block: int = DEFAULT_BLOCK,
    interpret: bool | None = None,
) -> Array:
    """Attention through the splash kernel over a mask known when tracing, with optional segment ids.

    q [B, S, N, D] are the queries of the S tokens whose rows are k, v [B, K, S, D] (cache layout).
    Without `earlier`: causal in index order, key j visible to query i when j <= i. With earlier =
    (earlier_k, earlier_v) [B, K, S, D] and chunk_size: the two-pass pattern over the keys [earlier
    rows, own rows] (see EarlierAndOwnMask). Segment ids q_segments [B, S] and k_segments [B, S] (of
    the tokens; both or neither) further keep keys of other segments unseen.

    The sequence is padded to whole kernel blocks (`_splash_sizes`): a padded key comes after every
    real query (and in a chunk after theirs), so no real query sees it; a padded query's output is
    dropped. q is scaled by 1/sqrt(D) before the kernel, which does not scale. `interpret` None:
    the kernel where the program is for a TPU, its interpreter elsewhere (`target_platform`).
    Returns [B, S, N, D] in q's dtype.
    """
    batch, seq, num_heads, head_dim = q.shape
    length, query_block, key_block = _splash_sizes(seq, query_block, key_block)
    if interpret is None:
        interpret = target_platform() != "tpu"
    q = (q * jnp.asarray(head_dim**-0.5, q.dtype)).transpose(0, 2, 1, 3)  # [B, N, S, D]
    q = _pad_axis(q, 2, length)  # [B, N, S', D]
    k, v = _pad_axis(k, 2, length), _pad_axis(v, 2, length)  # [B, K, S', D]
    if q_segments is not None:
        q_segments, k_segments = _pad_tokens(q_segments, length, 0), _pad_tokens(k_segments, length, 0)  # [B, S']
    if earlier is not None:
        earlier_k, earlier_v = (_pad_axis(x, 2, length) for x in earlier)  # [B, K, S', D]
        k, v = jnp.concatenate([earlier_k, k], axis=2), jnp.concatenate([earlier_v, v], axis=2)  # [B, K, 2S', D]
        if k_segments is not None:
            k_segments = jnp.concatenate([k_segments, k_segments], axis=1)  # [B, 2S']
    mask = _splash_mask_type()(length, k.shape[2], chunk_size if earlier is not None else None)
    per_device = functools.partial(
        _splash_per_device, mask=mask, query_block=query_block, key_block=key_block, interpret=interpret
    )
    out = _over_the_mesh(per_device, q, k, v, q_segments, k_segments)  # [B, N, S', D]
    return out[:, :, :seq].transpose(0, 2, 1, 3)


# --------------------------------------------------------------------------------------------------
# cuDNN (GPU)


def cudnn_takes(q: Array, mask: CausalMask) -> bool:
    """Whether cuDNN's flash attention computes this call: causal in index order without segment ids
    (jax.nn.dot_product_attention has no segment ids; its sequence lengths describe only padding at
    the end of a row), q in bf16 or fp16, a head dim it takes."""
    head_dim = q.shape[-1]
    return (
        mask.in_order
        and mask.q_segments is None
        and q.dtype in CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= CUDNN_MAX_HEAD_DIM
    )


def cudnn_attention(q: Array, k: Array, v: Array, *, kv_heads_first: bool = False, backend: str = "cudnn") -> Array:
    """Causal attention in index order (key j visible to query i when j <= i) of q [B, S, N, D] over
    k, v [B, S, K, D] (or [B, K, S, D] with kv_heads_first) through jax.nn.dot_product_attention
    with `implementation=backend`: "cudnn" on a GPU; "xla" computes the same on any backend (the
    tests check this wrapper that way). Returns [B, S, N, D]."""
    if kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, D]
    scale = q.shape[-1] ** -0.5
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=backend)


# --------------------------------------------------------------------------------------------------
# The entry points


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
    The kernels take in-order masks (`CausalMask.in_order`: the tokens in flight attending to each
    other); "cudnn" without segment ids and only in bf16/fp16 (`cudnn_takes`)."""
    mask.check()
    num_keys = k.shape[2] if kv_heads_first else k.shape[1]
    kernel_takes = cudnn_takes(q, mask) if implementation.name == "cudnn" else mask.in_order
    chosen = implementation.choose(q.shape[1], num_keys, kernel_takes)
    if chosen == "xla":
        return dense_attention(q, k, v, mask.dense(), kv_heads_first=kv_heads_first)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, kv_heads_first=kv_heads_first)
    blocks = dict(query_block=implementation.query_block, key_block=implementation.key_block)
    if chosen == "splash":
        if not kv_heads_first:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
        return splash_attention(q, k, v, mask.q_segments, mask.k_segments, **blocks)
    return blockwise_attention(q, k, v, mask, kv_heads_first=kv_heads_first, **blocks)


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
    of chunk_size. Returns [B, S, N, D]. "splash" computes it (its mask is known when tracing);
    "cudnn" does not ("auto"'s choice instead).
    """
    batch, seq = q.shape[:2]
    chosen = implementation.choose(seq, seq, kernel_takes=implementation.name == "splash")
    if chosen == "xla":
        return dense_earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, segment_ids)
    if chosen == "splash":
        own_k, own_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
        return splash_attention(
            q,
            own_k.astype(earlier_k.dtype),
            own_v.astype(earlier_v.dtype),
            segment_ids,
            segment_ids,
            earlier=(earlier_k, earlier_v),
            chunk_size=chunk_size,
            query_block=implementation.query_block,
            key_block=implementation.key_block,
        )
    mask = EarlierAndOwnMask.of(batch, seq, chunk_size, segment_ids)
    return _blockwise_over_stored_and_own(q, earlier_k, earlier_v, k, v, mask, implementation)


def _blockwise_over_stored_and_own(q, stored_k, stored_v, k, v, mask, implementation: Implementation) -> Array:
    """Blockwise attention of q [B, S, N, D] over stored rows [B, K, M, D] (cache layout) followed by the
    rows in flight [B, S, K, D], joined into one key set of M + S keys that `mask` describes."""
    keys = jnp.concatenate([stored_k, k.transpose(0, 2, 1, 3).astype(stored_k.dtype)], axis=2)  # [B, K, M + S, D]
    values = jnp.concatenate([stored_v, v.transpose(0, 2, 1, 3).astype(stored_v.dtype)], axis=2)
    blocks = dict(query_block=implementation.query_block, key_block=implementation.key_block)
    return blockwise_attention(q, keys, values, mask, kv_heads_first=True, **blocks)


def attend_history_and_own(
    q: Array,
    history_k: Array,
    history_v: Array,
    k: Array,
    v: Array,
    mask: CausalMask,
    *,
    implementation: Implementation = DENSE,
) -> Array:
    """Attention of q [B, S, N, D] over two key sets in one softmax: a cache slot array history_k,
    history_v [B, K, S_max, D] and the rows of the tokens in flight k, v [B, S, K, D]; `mask`
    describes the S_max + S keys in that order. Dense reads the slot array where it lies (no copy of
    it joined to the new rows); blockwise joins them. The kernels do not take this mask (the
    positions in flight are known only when running): "auto"'s choice instead. Returns [B, S, N, D]."""
    mask.check()
    max_length = history_k.shape[2]
    own_k, own_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    if implementation.choose(q.shape[1], max_length + k.shape[1]) != "xla":
        return _blockwise_over_stored_and_own(q, history_k, history_v, k, v, mask, implementation)
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    compute = at_least_float32(q.dtype)
    q = q.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, S, K, G, D]
    scale = head_dim**-0.5
    history_logits = jnp.einsum("BSKGD,BKMD->BKGSM", q, history_k, preferred_element_type=compute) * scale
    own_logits = jnp.einsum("BSKGD,BKED->BKGSE", q, own_k, preferred_element_type=compute) * scale
    visible = mask.dense()[:, None, None]  # [B, 1, 1, S, S_max + S]
    logits = jnp.where(visible, jnp.concatenate([history_logits, own_logits], axis=-1), _MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, K, G, S, S_max + S]
    history_probs, own_probs = probs[..., :max_length], probs[..., max_length:]
    out = jnp.einsum("BKGSM,BKMD->BSKGD", history_probs.astype(history_v.dtype), history_v)
    out = out + jnp.einsum("BKGSE,BKED->BSKGD", own_probs.astype(v.dtype), own_v)
    return out.reshape(batch, seq, num_heads, head_dim).astype(q.dtype)


def attend_filled_history_and_own(
    q: Array,
    cache_k: Array,
    cache_v: Array,
    slot: tuple,
    k: Array,
    v: Array,
    mask: CausalMask,
    filled: Array,
    *,
    history_block: int = DEFAULT_BLOCK,
) -> Array:
    """`attend_history_and_own` over the slot array cache_k[slot], cache_v[slot] ([B, K, S_max, D] of
    a cache [*slots, B, K, S_max, D], `slot` a tuple of indices, traced or not) that reads only its
    first `filled` (traced, []) slots: the keys no query sees beyond them (slots not yet written, or
    at and after the positions in flight) are never loaded. The history is visited in blocks of
    `history_block` slots by a `lax.while_loop` that stops after the block holding slot filled - 1,
    with an online softmax (a running max and sum per query, float32); the rows in flight join the
    softmax last. Forward only:
    a while loop with a data-dependent trip count has no reverse-mode derivative, so this serves
    inference (decode steps and prefill chunks over a cache), never training. Each block is sliced
    from the whole cache in one step, so no slot array is copied out first. Returns [B, S, N, D]."""
    mask.check()
    batch, seq, num_heads, head_dim = q.shape
    num_kv_heads, max_length = cache_k.shape[-3], cache_k.shape[-2]
    block = min(history_block, max_length)
    compute = at_least_float32(q.dtype)
    scale = head_dim**-0.5
    q = q.reshape(batch, seq, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, S, K, G, D]
    query_side, key_side = mask.query_side(), mask.key_side()  # [B, S] each; [B, S_max + S] each

    def add_keys(state, keys, values, visible):
        """Online softmax step over keys, values [B, K, M, D] with visible [B, S, M]."""
        running_max, total, acc = state  # [B, K, G, S], [B, K, G, S], [B, K, G, S, D]
        logits = jnp.einsum("BSKGD,BKMD->BKGSM", q, keys, preferred_element_type=compute) * scale
        logits = jnp.where(visible[:, None, None], logits, _MASKED_LOGIT)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.where(visible[:, None, None], jnp.exp(logits - new_max[..., None]), 0.0)
        weighted = jnp.einsum("BKGSM,BKMD->BKGSD", probs.astype(values.dtype), values, preferred_element_type=compute)
        return new_max, total * correction + probs.sum(axis=-1), acc * correction[..., None] + weighted

    def history_block_step(carry):
        index, state = carry
        # The last block is moved back to fit the slot array; the slots it shares with the block
        # before were counted there.
        start = jnp.minimum(index * block, max_length - block)
        corner = tuple(jnp.asarray(i, jnp.int32) for i in (*slot, 0, 0, start, 0))
        sizes = (*[1] * len(slot), batch, num_kv_heads, block, head_dim)
        keys = jax.lax.dynamic_slice(cache_k, corner, sizes).reshape(sizes[len(slot) :])  # [B, K, block, D]
        values = jax.lax.dynamic_slice(cache_v, corner, sizes).reshape(sizes[len(slot) :])
        block_keys = tuple(jax.lax.dynamic_slice_in_dim(x, start, block, axis=1) for x in key_side)
        slots = start + jnp.arange(block)  # [block]
        visible = mask.visible(query_side, block_keys) & (slots >= index * block)[None, None, :]
        return index + 1, add_keys(state, keys, values, visible)

    num_blocks = (filled + block - 1) // block
    state = (
        jnp.full((batch, num_kv_heads, q.shape[3], seq), _MASKED_LOGIT, compute),
        jnp.zeros((batch, num_kv_heads, q.shape[3], seq), compute),
        jnp.zeros((batch, num_kv_heads, q.shape[3], seq, head_dim), compute),
    )
    _, state = jax.lax.while_loop(lambda c: c[0] < num_blocks, history_block_step, (jnp.int32(0), state))
    own_keys = tuple(x[:, max_length:] for x in key_side)
    own_k, own_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    _, total, acc = add_keys(state, own_k, own_v, mask.visible(query_side, own_keys))
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [B, K, G, S, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim).astype(q.dtype)
