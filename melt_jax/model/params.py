"""Parameter creation and counting for melt_jax models, without running them where possible."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from melt_jax.model.param_table import UNROLLED_LAYER, key_names, param_paths

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
    return jax.eval_shape(lambda: _init(model, jax.random.key(0)))  # the key traced too: nothing runs


def count_params(params: Params) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def param_bytes(params: Params) -> int:
    """Bytes of the arrays of a param tree, float or int8 (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(params))


def is_int8_params(params: Params) -> bool:
    """Whether a param tree (or one weight of it) holds int8 weights
    (melt_jax.inference.quantization.quantize_int8: qwix arrays with a `qvalue` field in place of
    float weights); works on arrays and ShapeDtypeStructs alike."""
    return any(names[-1:] == ("qvalue",) for names in param_paths(params, key=key_names))


def unstack_layers(params: Params) -> Params:
    """Params of the scanned layout ("layers": every leaf stacked on a leading [L] axis) in the
    unrolled one ("layers_0" .. "layers_{L-1}", each leaf without the L axis); other entries shared."""
    out = {key: value for key, value in params.items() if key != "layers"}
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def stack_layers(params: Params) -> Params:
    """The inverse of `unstack_layers`: "layers_0" .. "layers_{L-1}" stacked into "layers"."""
    if is_int8_params(params):
        raise ValueError(
            "int8 params exist only in the unrolled layout of decoding; training and checkpoints (the scanned "
            "layout) keep the float params: quantize at load instead (load_model(..., int8=True))"
        )
    indices = sorted(int(m.group(1)) for key in params if (m := UNROLLED_LAYER.fullmatch(key)))
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"params have no unrolled layers layers_0 .. layers_(L-1): {sorted(params)}")
    out = {key: value for key, value in params.items() if not UNROLLED_LAYER.fullmatch(key)}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"layers_{i}"] for i in indices))
    return out


def with_layer_layout(model: nn.Module, params: Params, scan_layers: bool) -> tuple[nn.Module, Params]:
    """(model, params) converted to the layer layout `scan_layers` (see melt_jax/model/ouro.py); a
    model already in that layout is returned as it is. Decoding reads each weight T times per token
    and is fastest unrolled (scan_layers=False); training and checkpoints use the scanned layout."""
    if model.config.scan_layers == scan_layers:
        return model, params
    config = dataclasses.replace(model.config, scan_layers=scan_layers)
    return model.clone(config=config), (stack_layers(params) if scan_layers else unstack_layers(params))
