"""The cuDNN kernel ("cudnn"): cuDNN's flash attention through
`jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`.

It takes `attend` with an in-order mask without segment ids, q in bf16 or fp16 and a head dim <= 128
that is a multiple of 8 (`cudnn_takes`): the API's sequence lengths describe padding at the end of a
row only, not packed documents, and cuDNN has no float32 flash attention. The two-pass pattern is not
taken. Asked for a program that is not for a GPU, it is a ConfigError at the first attention call
(`Implementation.choose`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from melt_jax.model.attention.implementation import Implementation
from melt_jax.model.attention.masks import CausalMask

Array = jax.Array

# cuDNN's flash attention takes these dtypes and head dims up to this size, multiples of 8.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


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


def cudnn_attend(q: Array, k: Array, v: Array, mask: CausalMask, implementation: Implementation, kv_heads_first: bool):
    """`attend` through the kernel, for a call `cudnn_takes`. Returns [B, S, N, D]."""
    return cudnn_attention(q, k, v, kv_heads_first=kv_heads_first)
