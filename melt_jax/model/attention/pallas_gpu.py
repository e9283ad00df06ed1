"""The Pallas GPU kernel ("pallas_gpu"): flash attention written in Pallas and lowered through Triton,
for the masks known when tracing, with segment ids and grouped heads.

It takes what cuDNN does not: `attend` with an in-order mask with or without segment ids (packed
documents), and MELT's two-pass pattern (each chunk over the earlier chunks' stored rows and
causally over its own rows, phase 1's interpolated rows included: they are mixed before the call).
Forward and gradient are kernels: the forward keeps per query block a running maximum, a running sum
and an output accumulator in float32 and visits only the key blocks its mask can see (the blocks of
earlier rows before its chunk and of own rows up to itself in the two-pass pattern), and writes the
log-sum-exp of each query's logits; the gradient recomputes the probabilities from it, one kernel
over key blocks for dk and dv, one over query blocks for dq. Grouped heads read kv head n // G; the
key gradients of the G query heads of a kv head are summed after the kernel.

Where the program is for a GPU (`target_platform`) it is the compiled kernel; elsewhere Pallas's
interpreter runs the same kernel (slow: for tests). Under a mesh (`jax.set_mesh`) the kernel runs
on each device's share, as splash does (kernel_mesh.py). q is scaled by 1/sqrt(D) before the kernel, the
sequence is padded to whole blocks (as splash.py does: no real query sees a padded key), and every
query must see at least one key (every token sees itself on every path of the models).

Letters as in dense.py; S' a length padded to whole kernel blocks, M' = S' (causal) or 2 S'
(two-pass: [earlier rows, own rows]).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from melt_jax.errors import ConfigError
from melt_jax.model.attention.blockwise import pad_axis, round_up
from melt_jax.model.attention.implementation import Implementation, target_platform
from melt_jax.model.attention.kernel_mesh import over_the_mesh
from melt_jax.model.attention.masks import CausalMask, pad_tokens
from melt_jax.model.attention.pallas_gpu_kernels import KernelMask, forward_kernel, key_grads_kernel, query_grads_kernel

Array = jax.Array

# The kernel computes on tiles of this many queries and keys (Triton wants powers of two, >= 16).
PALLAS_GPU_BLOCK = 64
MIN_BLOCK = 16
PALLAS_GPU_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
PALLAS_GPU_MAX_HEAD_DIM = 256
# Triton's software pipelining depth of the key loop (untuned: no GPU has timed the kernel yet).
PALLAS_GPU_STAGES = 2


def _compiler_params(head_dim: int):
    """Triton's launch parameters: 4 warps per program for head dims up to 64, 8 above."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=PALLAS_GPU_STAGES)


class _Specs:
    """BlockSpecs of a grid (block i of queries or keys, batch b, query head n) over the kernel's
    arrays: q-like [B, S', N, D], own rows [B, S', K, D], earlier rows [B, M_e, K, D] or [B, K, M_e,
    D], per-query rows [B, N, S'], segment ids [B, L], base [B, 1]. `..._block`: block i of it;
    `..._all`: the whole length; keys of kv head n // G."""

    def __init__(self, mask: KernelMask, block_q: int, block_k: int, head_dim: int, groups: int, earlier_length: int):
        self.mask, self.block_q, self.block_k, self.head_dim, self.groups = mask, block_q, block_k, head_dim, groups
        self.earlier_length = earlier_length

    def tokens(self, length: int, heads: str, whole: bool = False):
        """[B, L, heads, D] in blocks of `length` along L: the i-th, or the one block of a whole length."""
        groups = self.groups if heads == "kv" else 1
        tile = (lambda i: 0) if whole else (lambda i: i)
        return pl.BlockSpec((None, length, None, self.head_dim), lambda i, b, n: (b, tile(i), n // groups, 0))

    def q_block(self):
        return self.tokens(self.block_q, "q")

    def q_all(self):
        return self.tokens(self.mask.seq, "q", whole=True)

    def own_all(self):
        return self.tokens(self.mask.seq, "kv", whole=True)

    def earlier(self, length: int | None):
        """The earlier rows: block i of `length` rows, or all of them (length None); in a whole cache,
        those of the slot array at `earlier_slot`."""
        size = self.earlier_length if length is None else length
        index = (lambda i, b, n: 0) if length is None else (lambda i, b, n: i)
        groups, d, slot = self.groups, self.head_dim, self.mask.earlier_slot
        if self.mask.earlier_heads_first:
            return pl.BlockSpec(
                (*[None] * len(slot), None, None, size, d), lambda i, b, n: (*slot, b, n // groups, index(i, b, n), 0)
            )
        return pl.BlockSpec((None, size, None, d), lambda i, b, n: (b, index(i, b, n), n // groups, 0))

    def rows(self, length: int | None):
        size = self.mask.seq if length is None else length
        index = (lambda i: 0) if length is None else (lambda i: i)
        return pl.BlockSpec((None, None, size), lambda i, b, n: (b, n, index(i)))

    def segments(self, length: int | None, total: int):
        size = total if length is None else length
        index = (lambda i: 0) if length is None else (lambda i: i)
        return pl.BlockSpec((None, size), lambda i, b, n: (b, index(i)))

    def base(self):
        return pl.BlockSpec((None, 1), lambda i, b, n: (b, 0))


def _specs_of(q, k, earlier, mask: KernelMask, block_q: int, block_k: int) -> _Specs:
    """The BlockSpecs of a launch over q [B, S', N, D], the own rows k [B, S', K, D] and `earlier`."""
    earlier_length = 0 if earlier is None else earlier[0].shape[-2 if mask.earlier_heads_first else 1]
    return _Specs(mask, block_q, block_k, q.shape[-1], q.shape[2] // k.shape[2], earlier_length)


def _query_tile_inputs(specs: _Specs, q, k, v, q_segments, earlier, base) -> tuple[list, tuple]:
    """The inputs the forward and the dq kernel share, programs over query tiles (a tile of q, every
    key of both sets, the segment ids of both, the base), with their BlockSpecs (None where absent)."""
    earlier_k, earlier_v, earlier_segments = earlier if earlier is not None else (None, None, None)
    has_segments, has_earlier = q_segments is not None, earlier is not None
    num_queries = q.shape[1]
    in_specs = [
        specs.q_block(),
        specs.own_all(),
        specs.own_all(),
        specs.segments(specs.block_q, num_queries) if has_segments else None,
        specs.segments(None, num_queries) if has_segments else None,
        specs.earlier(None) if has_earlier else None,
        specs.earlier(None) if has_earlier else None,
        specs.segments(None, specs.earlier_length) if has_earlier and has_segments else None,
        specs.base() if base is not None else None,
    ]
    return in_specs, (q, k, v, q_segments, q_segments, earlier_k, earlier_v, earlier_segments, base)


def _forward(q, k, v, q_segments, earlier, base, mask, block_q, block_k, interpret):
    """(out [B, S', N, D], lse [B, N, S'] float32) of q over the own rows k, v [B, S', K, D] and
    `earlier` = (k, v, segment ids or None) or None; base [B, 1] or None."""
    batch, num_queries, num_heads, head_dim = q.shape
    specs = _specs_of(q, k, earlier, mask, block_q, block_k)
    in_specs, inputs = _query_tile_inputs(specs, q, k, v, q_segments, earlier, base)
    kernel = functools.partial(forward_kernel, mask=mask, block_q=block_q, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(num_queries // block_q, batch, num_heads),
        in_specs=in_specs,
        out_specs=[specs.q_block(), specs.rows(block_q)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, num_queries), jnp.float32),
        ],
        compiler_params=_compiler_params(head_dim),
        interpret=interpret,
        name="melt_flash_forward",
    )(*inputs)


def _key_grads(q, keys, q_segments, base, d_out, lse, delta, mask, own, block_q, block_k, interpret):
    """(dk, dv) of one key set keys = (k, v, segment ids or None): own rows [B, S', K, D], or the
    earlier rows in their layout."""
    k, v, k_segments = keys
    batch, num_queries, num_heads, head_dim = q.shape
    heads_first = not own and mask.earlier_heads_first
    num_keys, kv_heads = (k.shape[2], k.shape[1]) if heads_first else (k.shape[1], k.shape[2])
    groups = num_heads // kv_heads
    specs = _Specs(mask, block_q, block_k, head_dim, groups, num_keys)
    key_block = specs.tokens(block_k, "kv") if not heads_first else specs.earlier(block_k)
    # Each query head's share of its kv head's gradient, in the keys' layout with N heads; float32
    # when G > 1 shares are summed.
    share_shape = (batch, num_heads, num_keys, head_dim) if heads_first else (batch, num_keys, num_heads, head_dim)
    share_dtype = k.dtype if groups == 1 else jnp.float32
    if heads_first:
        share_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda i, b, n: (b, n, i, 0))
    else:
        share_spec = pl.BlockSpec((None, block_k, None, head_dim), lambda i, b, n: (b, i, n, 0))
    has_segments = q_segments is not None
    kernel = functools.partial(key_grads_kernel, mask=mask, own=own, block_q=block_q, block_k=block_k)
    dk, dv = pl.pallas_call(
        kernel,
        grid=(num_keys // block_k, batch, num_heads),
        in_specs=[
            specs.q_all(),
            key_block,
            key_block,
            specs.segments(None, num_queries) if has_segments else None,
            specs.segments(block_k, num_keys) if has_segments else None,
            specs.base() if base is not None else None,
            specs.q_all(),
            specs.rows(None),
            specs.rows(None),
        ],
        out_specs=[share_spec, share_spec],
        out_shape=[jax.ShapeDtypeStruct(share_shape, share_dtype)] * 2,
        compiler_params=_compiler_params(head_dim),
        interpret=interpret,
        name="melt_flash_key_grads",
    )(q, k, v, q_segments, k_segments, base, d_out, lse, delta)
    # The G query heads of a kv head each gave their share: summed over G.
    head_axis = 1 if heads_first else 2
    grouped = (*share_shape[:head_axis], kv_heads, groups, *share_shape[head_axis + 1 :])
    return (x.reshape(grouped).sum(axis=head_axis + 1).astype(k.dtype) for x in (dk, dv))


def _slot_array_alone(earlier, mask: KernelMask, block: int):
    """A slot array read in place (`mask.earlier_slot`) as the gradient kernels take earlier rows: an
    array of its own [B, K, M_e', D] padded to whole blocks (segment ids too), the mask without the
    slot, and the map of its gradients back onto the whole cache's shape."""
    whole_k, whole_v, segments = earlier
    slot, length = mask.earlier_slot, whole_k.shape[-2]
    padded = round_up(length, block)
    alone = [pad_axis(x[slot], 2, padded) for x in (whole_k, whole_v)]
    segments = None if segments is None else pad_tokens(segments, padded, 0)

    def onto_cache(d_slot, whole):  # [B, K, M_e', D] -> [*P, B, K, M_e, D]
        return jnp.zeros_like(whole).at[slot].set(d_slot[:, :, :length].astype(whole.dtype))

    def gradients(d_k, d_v):
        return onto_cache(d_k, whole_k), onto_cache(d_v, whole_v), None

    return (*alone, segments), dataclasses.replace(mask, earlier_slot=()), gradients


def _backward(q, k, v, q_segments, earlier, base, out, lse, d_out, mask, block_q, block_k, interpret):
    """(dq, dk, dv, d_earlier) of the forward's inputs, from the output cotangent d_out [B, S', N, D]."""
    earlier_gradients = lambda d_k, d_v: (d_k, d_v, None)  # noqa: E731
    if mask.earlier_slot:
        earlier, mask, earlier_gradients = _slot_array_alone(earlier, mask, block_k)
    batch, num_queries, num_heads, head_dim = q.shape
    # delta_i = sum_d dO_id O_id = sum_j p_ij dP_ij: the softmax gradient's per-query term.
    delta = jnp.einsum("bsnd,bsnd->bns", d_out.astype(jnp.float32), out.astype(jnp.float32))  # [B, N, S']
    grads = functools.partial(
        _key_grads, q, q_segments=q_segments, base=base, d_out=d_out, lse=lse, delta=delta, mask=mask,
        block_q=block_q, block_k=block_k, interpret=interpret,
    )  # fmt: skip
    dk, dv = grads((k, v, q_segments), own=True)
    d_earlier = None
    if earlier is not None:
        d_earlier = earlier_gradients(*grads(earlier, own=False))
    specs = _specs_of(q, k, earlier, mask, block_q, block_k)
    in_specs, inputs = _query_tile_inputs(specs, q, k, v, q_segments, earlier, base)
    query_kernel = functools.partial(query_grads_kernel, mask=mask, block_q=block_q, block_k=block_k)
    dq = pl.pallas_call(
        query_kernel,
        grid=(num_queries // block_q, batch, num_heads),
        in_specs=[*in_specs, specs.q_block(), specs.rows(block_q), specs.rows(block_q)],
        out_specs=specs.q_block(),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(head_dim),
        interpret=interpret,
        name="melt_flash_query_grads",
    )(*inputs, d_out, lse, delta)
    return dq, dk, dv, d_earlier


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_segments, earlier, base, mask, block_q, block_k, interpret):
    return _forward(q, k, v, q_segments, earlier, base, mask, block_q, block_k, interpret)[0]


def _flash_forward(q, k, v, q_segments, earlier, base, mask, block_q, block_k, interpret):
    out, lse = _forward(q, k, v, q_segments, earlier, base, mask, block_q, block_k, interpret)
    return out, (q, k, v, q_segments, earlier, base, out, lse)


def _flash_backward(mask, block_q, block_k, interpret, residuals, d_out):
    q, k, v, q_segments, earlier, base, out, lse = residuals
    dq, dk, dv, d_earlier = _backward(
        q, k, v, q_segments, earlier, base, out, lse, d_out, mask, block_q, block_k, interpret
    )
    return dq, dk, dv, None, d_earlier, None


_flash.defvjp(_flash_forward, _flash_backward)


def _blocks(seq: int, block: int, chunk_size: int | None) -> tuple[int, int]:
    """(S', block): the padded length of `seq` tokens and the block, clipped to the padded
    sequence and, in the two-pass pattern, to a divisor of the chunk (a query block in one chunk;
    below 16 tokens only the interpreter runs it, `pallas_gpu_takes_earlier_and_own`)."""
    block = min(block, max(MIN_BLOCK, 1 << (seq - 1).bit_length()))
    if chunk_size is not None:
        block = math.gcd(block, chunk_size) if chunk_size % block else block
    return round_up(seq, block), block


def pallas_gpu_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    *,
    earlier: tuple[Array, Array] | None = None,
    earlier_segment_ids: Array | None = None,
    chunk_size: int | None = None,
    base: Array | None = None,
    earlier_heads_first: bool = False,
    earlier_slot: tuple[int, ...] = (),
    block: int = PALLAS_GPU_BLOCK,
    interpret: bool | None = None,
) -> Array:
    """Flash attention through the Pallas GPU kernel over a mask known when tracing (up to `base`).

    q [B, S, N, D] are the queries of the S tokens in flight, whose rows are k, v [B, S, K, D]; they
    see each other causally in index order (within their segment when segment_ids [B, S] is given).
    With earlier = (earlier_k, earlier_v) ([B, M_e, K, D], or [B, K, M_e, D] with
    earlier_heads_first) the queries also see those rows, in one softmax (KernelMask):
      - with chunk_size C (the two-pass pattern, M_e = S): query i sees the earlier rows of tokens of
        earlier chunks, and the own rows of its chunk only;
      - with base [B] (a cache's slot array, M_e = S_max): query i sees the earlier rows before its
        row's base, and all own rows up to itself. With `earlier_slot` the earlier arrays are a
        whole cache [*P, B, K, S_max, D] (heads first) and the slot array at those indices is read
        where it lies, neither sliced out nor padded (a copy of it per call otherwise).
    earlier_segment_ids [B, M_e]: the segment ids of the earlier rows (default: segment_ids, the
    two-pass pattern's rows being those of the same tokens). `interpret` None: the compiled kernel
    where the program is for a GPU, Pallas's interpreter elsewhere. Returns [B, S, N, D] in q's dtype.
    """
    batch, seq, num_heads, head_dim = q.shape
    length, block = _blocks(seq, block, chunk_size)
    if interpret is None:
        interpret = target_platform() != "gpu"
    q = pad_axis(q * jnp.asarray(head_dim**-0.5, q.dtype), 1, length)  # [B, S', N, D]
    k, v = pad_axis(k.astype(q.dtype), 1, length), pad_axis(v.astype(q.dtype), 1, length)  # [B, S', K, D]
    if segment_ids is not None:
        segment_ids = pad_tokens(segment_ids, length, 0)  # [B, S']
    earlier_set = None
    if earlier is not None:
        axis = earlier[0].ndim - 2 if earlier_heads_first else 1
        earlier_k, earlier_v = (x.astype(q.dtype) for x in earlier)
        earlier_length = earlier_k.shape[axis]
        if not earlier_slot:  # an array of its own: padded to whole blocks
            earlier_length = round_up(earlier_length, block)
            earlier_k, earlier_v = (pad_axis(x, axis, earlier_length) for x in (earlier_k, earlier_v))
        if segment_ids is not None and earlier_segment_ids is not None:
            earlier_segment_ids = pad_tokens(earlier_segment_ids, earlier_length, 0)
        elif segment_ids is not None:
            if earlier_length != length:
                raise ConfigError("segment ids over a slot array need the segment ids of its slots")
            earlier_segment_ids = segment_ids
        earlier_set = (earlier_k, earlier_v, earlier_segment_ids)
    if base is not None:
        base = base.astype(jnp.int32).reshape(batch, 1)
    mask = KernelMask(length, chunk_size, earlier is not None, base is not None, earlier_heads_first, earlier_slot)

    def per_device(q, k, v, segment_ids, earlier_k, earlier_v, earlier_segment_ids, base):
        earlier = None if earlier_k is None else (earlier_k, earlier_v, earlier_segment_ids)
        return _flash(q, k, v, segment_ids, earlier, base, mask, block, block, interpret)

    earlier_k, earlier_v, earlier_segment_ids = earlier_set or (None, None, None)
    slot_axes = len(earlier_slot)  # the earlier arrays' batch axis: after the slot axes of a whole cache
    earlier_axis = (slot_axes, slot_axes + 1) if earlier_heads_first else 2
    out = over_the_mesh(
        per_device, q, k, v, segment_ids, earlier_k, earlier_v, earlier_segment_ids, base,
        heads_axis=2, layouts=[2, None, earlier_axis, earlier_axis, None, None],
    )  # [B, S', N, D]  # fmt: skip
    return out[:, :seq]


def pallas_gpu_takes(q: Array, mask: CausalMask) -> bool:
    """Whether the kernel computes `attend` with this mask: an in-order mask (segment ids or not), q
    in a dtype and head dim it takes."""
    return mask.in_order and q.dtype in PALLAS_GPU_DTYPES and q.shape[-1] <= PALLAS_GPU_MAX_HEAD_DIM


def pallas_gpu_takes_earlier_and_own(q: Array, chunk_size: int) -> bool:
    """Whether the kernel computes the two-pass pattern of these queries in chunks of `chunk_size`:
    a dtype and head dim it takes and, compiled for a GPU, chunks of whole Triton tiles (multiples of
    16 tokens: a query block lies in one chunk; the interpreter takes any)."""
    whole_tiles = chunk_size % MIN_BLOCK == 0 or target_platform() != "gpu"
    return q.dtype in PALLAS_GPU_DTYPES and q.shape[-1] <= PALLAS_GPU_MAX_HEAD_DIM and whole_tiles


def pallas_gpu_attend(q, k, v, mask: CausalMask, implementation: Implementation, kv_heads_first: bool) -> Array:
    """`attend` through the kernel: q [B, S, N, D] over k, v [B, S, K, D] (or [B, K, S, D] with
    kv_heads_first), `mask` in order. Returns [B, S, N, D]."""
    if kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, D]
    return pallas_gpu_attention(q, k, v, mask.q_segments)


def pallas_gpu_earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, segment_ids, implementation: Implementation):
    """`attend_earlier_and_own` through the kernel (its arguments; see there). Returns [B, S, N, D]."""
    return pallas_gpu_attention(
        q, k, v, segment_ids, earlier=(earlier_k, earlier_v), chunk_size=chunk_size, earlier_heads_first=True
    )


def pallas_gpu_history_and_own(
    q, history_k, history_v, slot, k, v, base, q_segments, slot_segments, implementation: Implementation
) -> Array:
    """`attend_history_and_own` through the kernel: q [B, S, N, D] at positions base [B] + 0..S-1
    over the slots before base of the slot array history_k[slot], history_v[slot] ([B, K, S_max, D]
    of a cache [*P, B, K, S_max, D]) and causally over the rows in flight k, v [B, S, K, D]; segment
    ids [B, S] and [B, S_max] or None. The slot array is read where it lies in the cache when its
    indices are known when tracing (the layers and loops written out) and the cache is in q's dtype;
    otherwise it is sliced out first. Returns [B, S, N, D]."""
    if not (all(isinstance(i, int) for i in slot) and history_k.dtype == q.dtype):
        history_k, history_v, slot = history_k[slot], history_v[slot], ()
    return pallas_gpu_attention(
        q, k, v, q_segments, earlier=(history_k, history_v), earlier_segment_ids=slot_segments, base=base,
        earlier_heads_first=True, earlier_slot=slot,
    )  # fmt: skip
