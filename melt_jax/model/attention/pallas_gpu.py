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

from melt_jax.model.attention.blockwise import pad_axis, round_up
from melt_jax.model.attention.implementation import Implementation, target_platform
from melt_jax.model.attention.kernel_mesh import over_the_mesh
from melt_jax.model.attention.masks import CausalMask, pad_tokens

Array = jax.Array

# The kernel computes on tiles of this many queries and keys (Triton wants powers of two, >= 16).
PALLAS_GPU_BLOCK = 64
MIN_BLOCK = 16
PALLAS_GPU_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
PALLAS_GPU_MAX_HEAD_DIM = 256
# Triton's launch parameters: 4 warps per program for head dims up to 64, 8 above.
PALLAS_GPU_STAGES = 2
# A logit no key reaches: masked logits become this before the running maximum (finite, so that a
# block whose keys are all masked for a query leaves its sums unchanged instead of giving NaN).
NO_LOGIT = -1e30


@dataclasses.dataclass(frozen=True)
class KernelMask:
    """The static mask of the kernel over S' queries and M' keys: causal (key j seen by query i when
    j <= i) or, with `chunk_size` C, the two-pass pattern over the keys [earlier rows of tokens
    0..S'-1, own rows of the same tokens]: query i sees the earlier row of token j when j // C <
    i // C, and the own row of token j when j // C == i // C and j <= i. The block ranges below are
    the only blocks with a visible key; `visible` is exact within them."""

    seq: int  # S'
    chunk_size: int | None = None

    @property
    def num_keys(self) -> int:
        return self.seq if self.chunk_size is None else 2 * self.seq

    def visible(self, q_index: Array, k_index: Array) -> Array:
        """bool [bq, bk] for query indices [bq, 1] and key indices [1, bk]."""
        if self.chunk_size is None:
            return k_index <= q_index
        chunk, own = self.chunk_size, k_index - self.seq
        earlier_seen = (k_index < self.seq) & (k_index // chunk < q_index // chunk)
        own_seen = (k_index >= self.seq) & (own // chunk == q_index // chunk) & (own <= q_index)
        return earlier_seen | own_seen

    def key_block_ranges(self, q_start, block_q: int, block_k: int) -> list[tuple[Array, Array]]:
        """[lo, hi) ranges of key block indices seen by the queries q_start .. q_start + block_q - 1:
        one range (causal) or two (earlier rows of the chunks before, own rows up to the last query),
        which never share a block (the own rows start at S', a whole number of key blocks)."""
        last = q_start + block_q  # one past the last query
        if self.chunk_size is None:
            return [(0, pl.cdiv(last, block_k))]
        chunk_start = (q_start // self.chunk_size) * self.chunk_size
        earlier = (0, pl.cdiv(chunk_start, block_k))
        own = ((self.seq + chunk_start) // block_k, pl.cdiv(self.seq + last, block_k))
        return [earlier, own]

    def query_block_range(self, k_start, block_k: int, block_q: int) -> tuple[Array, Array]:
        """[lo, hi) of the query block indices that see a key of k_start .. k_start + block_k - 1."""
        num_query_blocks = self.seq // block_q
        if self.chunk_size is None:
            return k_start // block_q, num_query_blocks
        chunk = self.chunk_size
        # Earlier rows: seen from the chunk after the first key's on.
        earlier_lo = jnp.minimum(((k_start // chunk + 1) * chunk) // block_q, num_query_blocks)
        # Own rows of tokens j0..j1: seen by their own chunk's queries from j0 to the chunk's end.
        own_first = k_start - self.seq
        own_last = own_first + block_k - 1
        own_hi = jnp.minimum(pl.cdiv((own_last // chunk + 1) * chunk, block_q), num_query_blocks)
        is_earlier = k_start < self.seq
        lo = jnp.where(is_earlier, earlier_lo, own_first // block_q)
        hi = jnp.where(is_earlier, num_query_blocks, own_hi)
        return lo, hi


def _seen(mask: KernelMask, q_start, k_start, block_q, block_k, q_segments, k_segments):
    """bool [bq, bk]: which keys of the key block each query of the query block sees (the mask, and
    equal segment ids when given: [bq] and [bk])."""
    q_index = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    k_index = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    seen = mask.visible(q_index, k_index)
    if q_segments is not None:
        seen &= q_segments[:, None] == k_segments[None, :]
    return seen


def _dot(a, b, *, trans_a=False, trans_b=False):
    """a @ b (or with a or b transposed) in float32, without TF32 for float32 operands."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False).astype(jnp.float32)


def _forward_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, mask, block_q, block_k):
    """One query block of one (batch, head): q_ref [bq, D], k_ref, v_ref [M', D], segment refs [bq]
    and [M'] or None -> o_ref [bq, D], lse_ref [bq] (log-sum-exp of the query's visible logits)."""
    q_start = pl.program_id(0) * block_q
    q = q_ref[...]  # [bq, D]
    q_segments = None if qs_ref is None else qs_ref[...]

    def visit(block, carry):
        acc, running_max, running_sum = carry
        k_start = block * block_k
        k = k_ref[pl.ds(k_start, block_k), :]  # [bk, D]
        v = v_ref[pl.ds(k_start, block_k), :]
        k_segments = None if ks_ref is None else ks_ref[pl.ds(k_start, block_k)]
        logits = _dot(q, k, trans_b=True)  # [bq, bk]
        seen = _seen(mask, q_start, k_start, block_q, block_k, q_segments, k_segments)
        logits = jnp.where(seen, logits, NO_LOGIT)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))  # [bq]
        probs = jnp.where(seen, jnp.exp(logits - new_max[:, None]), 0.0)  # [bq, bk]
        rescale = jnp.exp(running_max - new_max)
        running_sum = running_sum * rescale + jnp.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _dot(probs.astype(v.dtype), v)
        return acc, new_max, running_sum

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), NO_LOGIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    for lo, hi in mask.key_block_ranges(q_start, block_q, block_k):
        carry = jax.lax.fori_loop(lo, hi, visit, carry)
    acc, running_max, running_sum = carry
    running_sum = jnp.maximum(running_sum, jnp.finfo(jnp.float32).tiny)
    o_ref[...] = (acc / running_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = running_max + jnp.log(running_sum)


def _probs_and_logit_grads(q, k, v, do, lse, delta, seen):
    """The block's probabilities p = exp(q k^T - lse) [bq, bk] and the gradient of the loss with
    respect to its logits, p * (do v^T - delta)."""
    logits = _dot(q, k, trans_b=True)
    probs = jnp.where(seen, jnp.exp(logits - lse[:, None]), 0.0)
    return probs, probs * (_dot(do, v, trans_b=True) - delta[:, None])


def _key_grads_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, mask, block_q, block_k
):
    """dk, dv of one key block of one (batch, query head): k_ref, v_ref [bk, D]; q_ref, do_ref [S', D],
    lse_ref, delta_ref [S'] -> dk_ref, dv_ref [bk, D] (this query head's share)."""
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    k_segments = None if ks_ref is None else ks_ref[...]

    def visit(block, carry):
        dk, dv = carry
        q_start = block * block_q
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        q_segments = None if qs_ref is None else qs_ref[rows]
        seen = _seen(mask, q_start, k_start, block_q, block_k, q_segments, k_segments)
        probs, logit_grads = _probs_and_logit_grads(q, k, v, do, lse_ref[rows], delta_ref[rows], seen)
        dv = dv + _dot(probs.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(logit_grads.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo, hi = mask.query_block_range(k_start, block_k, block_q)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi, visit, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_grads_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, *, mask, block_q, block_k
):
    """dq of one query block of one (batch, head): q_ref, do_ref [bq, D], lse_ref, delta_ref [bq];
    k_ref, v_ref [M', D] -> dq_ref [bq, D]."""
    q_start = pl.program_id(0) * block_q
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_segments = None if qs_ref is None else qs_ref[...]

    def visit(block, dq):
        k_start = block * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        k_segments = None if ks_ref is None else ks_ref[pl.ds(k_start, block_k)]
        seen = _seen(mask, q_start, k_start, block_q, block_k, q_segments, k_segments)
        _, logit_grads = _probs_and_logit_grads(q, k, v, do, lse, delta, seen)
        return dq + _dot(logit_grads.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    for lo, hi in mask.key_block_ranges(q_start, block_q, block_k):
        dq = jax.lax.fori_loop(lo, hi, visit, dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _compiler_params(head_dim: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=PALLAS_GPU_STAGES)


def _specs(block_q: int, block_k: int, num_queries: int, num_keys: int, head_dim: int, groups: int):
    """BlockSpecs of the grid (query or key block, batch b, query head n) over [B, L, heads, D] arrays
    and [B, L] segment ids: a block of queries / keys, or the whole length, of head n (queries) or
    kv head n // G (keys)."""
    return dict(
        q_block=pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        q_all=pl.BlockSpec((None, num_queries, None, head_dim), lambda i, b, n: (b, 0, n, 0)),
        k_block=pl.BlockSpec((None, block_k, None, head_dim), lambda i, b, n: (b, i, n // groups, 0)),
        k_all=pl.BlockSpec((None, num_keys, None, head_dim), lambda i, b, n: (b, 0, n // groups, 0)),
        dk_block=pl.BlockSpec((None, block_k, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        row_block=pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i)),
        row_all=pl.BlockSpec((None, None, num_queries), lambda i, b, n: (b, n, 0)),
        qs_block=pl.BlockSpec((None, block_q), lambda i, b, n: (b, i)),
        qs_all=pl.BlockSpec((None, num_queries), lambda i, b, n: (b, 0)),
        ks_block=pl.BlockSpec((None, block_k), lambda i, b, n: (b, i)),
        ks_all=pl.BlockSpec((None, num_keys), lambda i, b, n: (b, 0)),
    )


def _forward(q, k, v, q_segments, k_segments, mask, block_q, block_k, interpret):
    """(out [B, S', N, D], lse [B, N, S'] float32) of q [B, S', N, D] over k, v [B, M', K, D]."""
    batch, num_queries, num_heads, head_dim = q.shape
    specs = _specs(block_q, block_k, num_queries, k.shape[1], head_dim, num_heads // k.shape[2])
    segments = q_segments is not None
    kernel = functools.partial(_forward_kernel, mask=mask, block_q=block_q, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(num_queries // block_q, batch, num_heads),
        in_specs=[
            specs["q_block"],
            specs["k_all"],
            specs["k_all"],
            specs["qs_block"] if segments else None,
            specs["ks_all"] if segments else None,
        ],
        out_specs=[specs["q_block"], specs["row_block"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, num_queries), jnp.float32),
        ],
        compiler_params=_compiler_params(head_dim),
        interpret=interpret,
        name="melt_flash_forward",
    )(q, k, v, q_segments, k_segments)


def _backward(q, k, v, q_segments, k_segments, out, lse, d_out, mask, block_q, block_k, interpret):
    """(dq, dk, dv) of the forward's inputs, from the output cotangent d_out [B, S', N, D]."""
    batch, num_queries, num_heads, head_dim = q.shape
    num_keys, kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // kv_heads
    specs = _specs(block_q, block_k, num_queries, num_keys, head_dim, groups)
    segments = q_segments is not None
    # delta_i = sum_d dO_id O_id = sum_j p_ij dP_ij: the softmax gradient's per-query term.
    delta = jnp.einsum("bsnd,bsnd->bns", d_out.astype(jnp.float32), out.astype(jnp.float32))  # [B, N, S']
    common = dict(compiler_params=_compiler_params(head_dim), interpret=interpret)
    key_kernel = functools.partial(_key_grads_kernel, mask=mask, block_q=block_q, block_k=block_k)
    # Each query head's share of its kv head's gradient; float32 when G > 1 shares are summed.
    share_dtype = k.dtype if groups == 1 else jnp.float32
    per_head_shape = jax.ShapeDtypeStruct((batch, num_keys, num_heads, head_dim), share_dtype)
    dk, dv = pl.pallas_call(
        key_kernel,
        grid=(num_keys // block_k, batch, num_heads),
        in_specs=[
            specs["q_all"],
            specs["k_block"],
            specs["k_block"],
            specs["qs_all"] if segments else None,
            specs["ks_block"] if segments else None,
            specs["q_all"],
            specs["row_all"],
            specs["row_all"],
        ],
        out_specs=[specs["dk_block"], specs["dk_block"]],
        out_shape=[per_head_shape, per_head_shape],
        name="melt_flash_key_grads",
        **common,
    )(q, k, v, q_segments, k_segments, d_out, lse, delta)
    # The G query heads of a kv head each gave their share: [B, M', K, G, D] summed over G.
    dk = dk.reshape(batch, num_keys, kv_heads, groups, head_dim).sum(axis=3).astype(k.dtype)
    dv = dv.reshape(batch, num_keys, kv_heads, groups, head_dim).sum(axis=3).astype(v.dtype)
    query_kernel = functools.partial(_query_grads_kernel, mask=mask, block_q=block_q, block_k=block_k)
    dq = pl.pallas_call(
        query_kernel,
        grid=(num_queries // block_q, batch, num_heads),
        in_specs=[
            specs["q_block"],
            specs["k_all"],
            specs["k_all"],
            specs["qs_block"] if segments else None,
            specs["ks_all"] if segments else None,
            specs["q_block"],
            specs["row_block"],
            specs["row_block"],
        ],
        out_specs=specs["q_block"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="melt_flash_query_grads",
        **common,
    )(q, k, v, q_segments, k_segments, d_out, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_segments, k_segments, mask, block_q, block_k, interpret):
    return _forward(q, k, v, q_segments, k_segments, mask, block_q, block_k, interpret)[0]


def _flash_forward(q, k, v, q_segments, k_segments, mask, block_q, block_k, interpret):
    out, lse = _forward(q, k, v, q_segments, k_segments, mask, block_q, block_k, interpret)
    return out, (q, k, v, q_segments, k_segments, out, lse)


def _flash_backward(mask, block_q, block_k, interpret, residuals, d_out):
    q, k, v, q_segments, k_segments, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_segments, k_segments, out, lse, d_out, mask, block_q, block_k, interpret)
    return dq, dk, dv, None, None


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
    q_segments: Array | None = None,
    k_segments: Array | None = None,
    *,
    earlier: tuple[Array, Array] | None = None,
    chunk_size: int | None = None,
    block: int = PALLAS_GPU_BLOCK,
    interpret: bool | None = None,
) -> Array:
    """Flash attention through the Pallas GPU kernel over a mask known when tracing.

    q [B, S, N, D] are the queries of the S tokens whose rows are k, v [B, S, K, D]. Without
    `earlier`: causal in index order (key j visible to query i when j <= i). With earlier =
    (earlier_k, earlier_v) [B, S, K, D] and chunk_size: the two-pass pattern over the keys [earlier
    rows, own rows] (see EarlierAndOwnMask). Segment ids q_segments and k_segments [B, S] (of the
    tokens; both or neither) further keep keys of other segments unseen. `interpret` None: the
    compiled kernel where the program is for a GPU, Pallas's interpreter elsewhere. Returns
    [B, S, N, D] in q's dtype.
    """
    batch, seq, num_heads, head_dim = q.shape
    chunk = chunk_size if earlier is not None else None
    length, block = _blocks(seq, block, chunk)
    if interpret is None:
        interpret = target_platform() != "gpu"
    q = pad_axis(q * jnp.asarray(head_dim**-0.5, q.dtype), 1, length)  # [B, S', N, D]
    k, v = pad_axis(k.astype(q.dtype), 1, length), pad_axis(v.astype(q.dtype), 1, length)  # [B, S', K, D]
    if q_segments is not None:
        q_segments, k_segments = pad_tokens(q_segments, length, 0), pad_tokens(k_segments, length, 0)  # [B, S']
    if earlier is not None:
        earlier_k, earlier_v = (pad_axis(x.astype(q.dtype), 1, length) for x in earlier)  # [B, S', K, D]
        k, v = jnp.concatenate([earlier_k, k], axis=1), jnp.concatenate([earlier_v, v], axis=1)  # [B, 2S', K, D]
        if k_segments is not None:
            k_segments = jnp.concatenate([k_segments, k_segments], axis=1)  # [B, 2S']
    mask = KernelMask(length, chunk)
    per_device = lambda *arrays: _flash(*arrays, mask, block, block, interpret)  # noqa: E731
    out = over_the_mesh(per_device, q, k, v, q_segments, k_segments, heads_axis=2)  # [B, S', N, D]
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
    return pallas_gpu_attention(q, k, v, mask.q_segments, mask.k_segments)


def pallas_gpu_earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, segment_ids, implementation: Implementation):
    """`attend_earlier_and_own` through the kernel (its arguments; see there). Returns [B, S, N, D]."""
    earlier = (earlier_k.transpose(0, 2, 1, 3), earlier_v.transpose(0, 2, 1, 3))  # [B, S, K, D]
    return pallas_gpu_attention(q, k, v, segment_ids, segment_ids, earlier=earlier, chunk_size=chunk_size)
