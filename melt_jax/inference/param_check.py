"""Checking that a params tree fits a model before running it: the tree, the shapes, the model kind
(Ouro or MELT) and whether both are int8, each mismatch named in a GenerationError."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from melt_jax.errors import GenerationError
from melt_jax.model import param_table
from melt_jax.model.params import abstract_params
from melt_jax.model.registry import MODEL_TYPES


@functools.lru_cache(maxsize=8)
def _expected_leaves(model: nn.Module) -> dict[str, tuple[int, ...]]:
    tree = jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in tree}


def check_params(model: nn.Module, params) -> None:
    """GenerationError unless params has exactly the tree and shapes `model` expects (a MELT checkpoint
    with an Ouro model or the reverse, or a config that does not match the weights)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in MODEL_TYPES:
        raise GenerationError(f"expected a melt_jax model (OuroModel, MeltModel), got {type(model).__name__}")
    kind = model.config.model_type
    expected = _expected_leaves(model)
    try:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}
    except Exception as e:  # not a pytree of arrays
        raise GenerationError(f"params are not a tree of arrays: {e}") from None
    int8_model, int8_params = (any(name.endswith(".qvalue") for name in tree) for tree in (expected, got))
    if int8_model != int8_params:
        which = (
            "the model is int8 but its params are float" if int8_model else "the params are int8 but the model is float"
        )
        raise GenerationError(f"{which}; use the (model, params) pair that quantize_int8 returns together")
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    # A MELT model with a fixed gate has exactly Ouro's params, so the kinds only differ when the trees do.
    params_kind = param_table.model_type_of_params(param_table.path_of(p) for p, _ in leaves)
    if (missing or extra) and params_kind != kind:
        melt = params_kind == "melt"
        found = "a MELT checkpoint (it has kv_gate weights)" if melt else "an Ouro checkpoint (no kv_gate weights)"
        raise GenerationError(f"the model is {kind!r} but the params are {found}; load it with the matching model")
    if missing or extra:
        raise GenerationError(f"params do not match the {kind} model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if got[name] != shape:
            raise GenerationError(f"params{name} has shape {got[name]}, the model's config expects {shape}")
