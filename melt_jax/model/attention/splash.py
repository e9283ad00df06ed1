"""The splash kernel ("splash"): jax's TPU Pallas splash attention, for the masks known when tracing.

It takes `attend` with an in-order mask (a training forward's tokens, a MELT chunk without cache) and
the two-pass pattern, as one kernel call over the [S, 2S] keys [earlier rows, own rows] with a mask
computed from indices in the kernel; segment ids go to the kernel's SegmentIds; grouped heads run
natively (query head n reads kv head n // G). Blocks are `query_block` x `key_block` (multiples of
128, clipped to the sequence) and the sequence is padded to whole blocks; q is scaled by 1/sqrt(D)
before the kernel. Under a mesh (`jax.set_mesh`) the kernel runs in a `shard_map` over the batch
(and the heads over "tensor" when it divides both N and K). Where the program is for a TPU
(`target_platform`) it is the compiled kernel; elsewhere its interpreter (same code, slow: for
tests). The kernel relies on every query seeing at least one key, which holds on every attention
path of the models (every token sees itself).

Letters as in dense.py; S' a length padded to whole kernel blocks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.errors import ConfigError
from melt_jax.model.attention.blockwise import pad_axis, round_up
from melt_jax.model.attention.implementation import DEFAULT_BLOCK, SPLASH_LANES, Implementation, target_platform
from melt_jax.model.attention.kernel_mesh import over_the_mesh
from melt_jax.model.attention.masks import CausalMask, pad_tokens

Array = jax.Array


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
    length = round_up(seq, SPLASH_LANES)
    query_block, key_block = min(query_block, length), min(key_block, length)
    return round_up(length, math.lcm(query_block, key_block)), query_block, key_block


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
    q = pad_axis(q, 2, length)  # [B, N, S', D]
    k, v = pad_axis(k, 2, length), pad_axis(v, 2, length)  # [B, K, S', D]
    if q_segments is not None:
        q_segments, k_segments = pad_tokens(q_segments, length, 0), pad_tokens(k_segments, length, 0)  # [B, S']
    if earlier is not None:
        earlier_k, earlier_v = (pad_axis(x, 2, length) for x in earlier)  # [B, K, S', D]
        k, v = jnp.concatenate([earlier_k, k], axis=2), jnp.concatenate([earlier_v, v], axis=2)  # [B, K, 2S', D]
        if k_segments is not None:
            k_segments = jnp.concatenate([k_segments, k_segments], axis=1)  # [B, 2S']
    mask = _splash_mask_type()(length, k.shape[2], chunk_size if earlier is not None else None)
    per_device = functools.partial(
        _splash_per_device, mask=mask, query_block=query_block, key_block=key_block, interpret=interpret
    )
    out = over_the_mesh(per_device, q, k, v, q_segments, k_segments, heads_axis=1)  # [B, N, S', D]
    return out[:, :, :seq].transpose(0, 2, 1, 3)


def splash_takes(q: Array, mask: CausalMask) -> bool:
    """Whether the splash kernel computes `attend` with this mask: an in-order mask, known when
    tracing (the slot cache's positions in flight, and positions the caller gave, are known only when
    running)."""
    return mask.in_order


def splash_attend(q: Array, k: Array, v: Array, mask: CausalMask, implementation: Implementation, kv_heads_first: bool):
    """`attend` through the kernel: q [B, S, N, D] over k, v [B, S, K, D] (or [B, K, S, D] with
    kv_heads_first), `mask` in order. Returns [B, S, N, D]."""
    if not kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    blocks = dict(query_block=implementation.query_block, key_block=implementation.key_block)
    return splash_attention(q, k, v, mask.q_segments, mask.k_segments, **blocks)


def splash_earlier_and_own(q, earlier_k, earlier_v, k, v, chunk_size, segment_ids, implementation: Implementation):
    """`attend_earlier_and_own` through the kernel (its arguments; see there). Returns [B, S, N, D]."""
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
