"""Building blocks shared by Ouro and MELT: RMSNorm, rotary embeddings, the attention projections and
the SwiGLU MLP. Attention itself (softmax over the keys a query sees) is the package melt_jax/model/attention/.

Letters in shape comments and einsum strings: B batch, S tokens, H hidden, N query heads, K key/value
heads, D head dim, I MLP width, V vocabulary. T is kept for the loop count, as everywhere else in
melt_jax.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from melt_jax.dtypes import at_least_float32
from melt_jax.sharding import constrain

Array = jax.Array

# Logical axes of the activations (see melt_jax.sharding).
HIDDEN_AXES = ("batch", "length", "act_embed")  # [B, S, H]


def _normal_init(stddev: float):
    return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
    """y = scale * cast(x / sqrt(mean(x^2) + eps)): the normalisation is computed in float32 and cast
    back to the input dtype before the multiply by `scale`, as in the Hugging Face Ouro code."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)  # [H]
        x32 = x.astype(at_least_float32(x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        normed = normed.astype(x.dtype)
        return scale.astype(x.dtype) * normed


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings (Hugging Face "rotate half" form)


def rope_tables(positions: Array, head_dim: int, theta: float, dtype=jnp.float32) -> tuple[Array, Array]:
    """cos and sin of the rotary angles, [B, S, D] for integer positions [B, S], computed in `dtype`
    (float32, or float64 for a float64 model).

    inv_freq = 1 / theta^(arange(0, D, 2) / D); angles = position * inv_freq, duplicated to width D.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim  # [D/2]
    inv_freq = 1.0 / (theta**exponents)  # [D/2]
    angles = positions.astype(dtype)[..., None] * inv_freq  # [B, S, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, S, D]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1]; x [B, S, heads, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)  # [B, S, 1, D]
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Embedder(nn.Module):
    """Token embedding table `embedding` [V, H], used for the lookup and (tied weights) the LM head.

    The lookup reads a copy of the table gathered along its hidden axis (under a mesh: vocabulary rows
    stay split over "tensor"), so that the looked-up rows can take the batch sharding of activations.
    """

    vocab_size: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_stddev: float = 0.02

    def setup(self):
        self.embedding = self.param(
            "embedding", _normal_init(self.init_stddev), (self.vocab_size, self.hidden_size), self.param_dtype
        )

    def __call__(self, tokens: Array) -> Array:
        """[B, S] int -> [B, S, H]."""
        table = constrain(self.embedding.astype(self.dtype), ("vocab", None))  # [V, H]
        return constrain(jnp.take(table, tokens, axis=0), HIDDEN_AXES)

    def attend(self, hidden: Array) -> Array:
        """[..., H] -> [..., V]: hidden states against every embedding row."""
        return jnp.einsum("...H,VH->...V", hidden, self.embedding.astype(self.dtype))


def weight_einsum(equation: str, x: Array, weight, dtype, gpu_matmuls: bool = False) -> Array:
    """einsum(equation, x, weight) in `dtype`, for activations x [B, ..., in] whose leading axis B is
    also the output's and a weight whose kept axes end the output in their order. `weight`: a float
    array, or an int8 weight of melt_jax.inference.quantization (qwix's quantized array: int8 values
    q, float32 scales s per output channel), which qwix dequantizes before the product.

    `gpu_matmuls` (GPU inference) takes the forms in which XLA's GPU compiler reads a weight once:
    - one row of activations (x holding a single vector) is multiplied as two, a row of zeros added
      and dropped: the compiler rewrites a product of one row with a weight of under ~10M elements
      as elementwise products and a sum and writes the products out (three times the weight's bytes
      moved); two rows stay one matrix kernel;
    - an int8 weight is multiplied as (x q) s, its values converted inside the matrix kernel and the
      scales applied to the float32 product: dequantized first, the weight the loops share is
      written out once per step as a float copy that every loop reads."""
    one_row = gpu_matmuls and x.ndim >= 2 and x.size == x.shape[-1]
    rows = jnp.pad(x, ((0, 1),) + ((0, 0),) * (x.ndim - 1)) if one_row else x  # [2, ..., in] for one row
    int8 = _int8_values_and_scales(weight) if gpu_matmuls else None
    if int8 is not None:
        values, scales = int8
        # The barrier keeps this product apart from others of the same activations: merged into one
        # (XLA merges products that share an input), their int8 values are converted into a float
        # copy outside the matrix kernel.
        rows, values = jax.lax.optimization_barrier((rows, values))
        product = jnp.einsum(equation, rows, values.astype(dtype), preferred_element_type=jnp.float32)
        product = (product * _scales_of_output(equation, scales)).astype(dtype)
    else:
        # jnp.asarray rather than .astype: qwix casts int8 weights through its interception of
        # jnp.asarray, and their own .astype fails (qwix 0.1.8).
        product = jnp.einsum(equation, rows, jnp.asarray(weight, dtype))
    return product[:1] if one_row else product


def _int8_values_and_scales(weight) -> tuple[Array, Array] | None:
    """(int8 values, float32 scales) of an int8 weight (qwix's WithAux holding a QArray), else None."""
    quantized = getattr(weight, "array", None)
    if quantized is None or not hasattr(quantized, "qvalue"):
        return None
    return quantized.qvalue, quantized.scale


def _scales_of_output(equation: str, scales: Array) -> Array:
    """Per-channel scales [weight shape, 1 on the contracted axes] as the trailing axes of the
    einsum's output."""
    inputs, output = equation.split("->")
    weight_axes = inputs.split(",")[1]
    kept = [i for i, axis in enumerate(weight_axes) if axis in output]
    if not output.endswith("".join(weight_axes[i] for i in kept)):
        raise ValueError(f"int8 einsum {equation!r}: the weight's kept axes must end the output")
    return scales.reshape([scales.shape[i] for i in kept])


class Einsum(nn.Module):
    """A bias-free linear map given by an einsum equation; its weight is the parameter `kernel`.
    `gpu_matmuls`: see `weight_einsum` (GPU inference)."""

    shape: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_stddev: float = 0.02
    gpu_matmuls: bool = False

    @nn.compact
    def __call__(self, equation: str, x: Array, kernel_shape: tuple[int, ...] | None = None) -> Array:
        """einsum(equation, x, kernel), the kernel seen with `kernel_shape` if given (a row-major
        reshape of the stored `shape`)."""
        kernel = self.param("kernel", _normal_init(self.init_stddev), self.shape, self.param_dtype)
        if kernel_shape is not None:
            kernel = kernel.reshape(kernel_shape)
        return weight_einsum(equation, x, kernel, self.dtype, self.gpu_matmuls)


class AttentionProjections(nn.Module):
    """The four projections of an attention sublayer, without biases.

    q_proj [H, N, D], k_proj and v_proj [H, K, D], o_proj [N, D, H]. Queries, keys/values and the
    output projection are separate methods so that MELT can compute keys and values from its gated
    latent instead of the layer input. `gpu_matmuls`: see `weight_einsum` (GPU inference).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_stddev: float = 0.02
    gpu_matmuls: bool = False

    def setup(self):
        H, N, K, D = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_stddev=self.init_stddev,
            gpu_matmuls=self.gpu_matmuls,
        )
        self.q_proj = Einsum((H, N, D), **kw)
        self.k_proj = Einsum((H, K, D), **kw)
        self.v_proj = Einsum((H, K, D), **kw)
        self.o_proj = Einsum((N, D, H), **kw)

    def queries(self, x: Array) -> Array:
        """[B, S, H] -> [B, S, N, D] (before RoPE)."""
        return constrain(self.q_proj("BSH,HND->BSND", x), ("batch", "length", "heads", "head_dim"))

    def keys_values(self, x: Array) -> tuple[Array, Array]:
        """[B, S, H] -> keys (before RoPE) and values, each [B, S, K, D]."""
        axes = ("batch", "length", "kv_heads", "head_dim")
        return constrain(self.k_proj("BSH,HKD->BSKD", x), axes), constrain(self.v_proj("BSH,HKD->BSKD", x), axes)

    def output(self, attended: Array) -> Array:
        """[B, S, N, D] -> [B, S, H]."""
        # Heads and head dim contracted as one axis F = N * D: a dot with one contracting dimension
        # reads the [N, D, H] weights in place, where with two XLA's CPU backend transposes them
        # at every call.
        batch, seq, heads, head_dim = attended.shape
        flat = attended.reshape(batch, seq, heads * head_dim)  # [B, S, F]
        return self.o_proj("BSF,FH->BSH", flat, kernel_shape=(heads * head_dim, self.hidden_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate_proj and up_proj [H, I], down_proj [I, H].

    `gpu_matmuls`: see `weight_einsum` (GPU inference).
    """

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_stddev: float = 0.02
    gpu_matmuls: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        H, I = self.hidden_size, self.intermediate_size
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_stddev=self.init_stddev,
            gpu_matmuls=self.gpu_matmuls,
        )
        gate = Einsum((H, I), name="gate_proj", **kw)("BSH,HI->BSI", x)
        up = Einsum((H, I), name="up_proj", **kw)("BSH,HI->BSI", x)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))  # [B, S, I]
        return Einsum((I, H), name="down_proj", **kw)("BSI,IH->BSH", hidden)
