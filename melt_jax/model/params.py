"""Parameter creation and counting for melt_jax models, without running them where possible."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict


def _init_tokens() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def _init(model: nn.Module, rng: jax.Array) -> Params:
    return model.init(rng, _init_tokens())["params"]


def init_params(model: nn.Module, rng: jax.Array) -> Params:
    """Freshly initialised parameters of `model` (the content of its 'params' collection)."""
    return jax.jit(_init, static_argnums=0)(model, rng)


def abstract_params(model: nn.Module) -> Params:
    """Shapes and dtypes of `model`'s parameters (jax.ShapeDtypeStruct leaves); allocates nothing."""
    return jax.eval_shape(lambda rng: _init(model, rng), jax.random.key(0))


def count_params(params: Params) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
