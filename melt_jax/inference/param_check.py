"""Checking that a params tree fits a model before running it: the tree, the shapes, the model kind
(Ouro or MELT) and whether both are int8, each mismatch named in a GenerationError. `param_mismatches`
is the comparison itself, shared with the converter's and the trainer's checks."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from melt_jax.errors import GenerationError
from melt_jax.model import param_table
from melt_jax.model.param_table import param_paths
from melt_jax.model.params import abstract_params, is_int8_params
from melt_jax.model.registry import MODEL_TYPES


class ParamMismatches(NamedTuple):
    """How a flat params dict differs from the one expected (paths as the dicts key them)."""

    missing: list  # expected but absent, in the expected order
    unexpected: list  # present but not expected, in the params' order
    misshapen: list  # present with another shape than expected, in the expected order


def param_mismatches(
    expected: Mapping[Hashable, tuple[int, ...]], got: Mapping[Hashable, tuple[int, ...]]
) -> ParamMismatches:
    """The paths where the shapes `got` (path -> shape of each param) differ from `expected`."""
    return ParamMismatches(
        missing=[path for path in expected if path not in got],
        unexpected=[path for path in got if path not in expected],
        misshapen=[path for path, shape in expected.items() if path in got and tuple(got[path]) != tuple(shape)],
    )


@functools.lru_cache(maxsize=8)
def _expected(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], bool]:
    """The shape of each param `model` expects (keyed as jax.tree_util.keystr writes paths) and
    whether they are int8."""
    abstract = abstract_params(model)
    shapes = {name: tuple(leaf.shape) for name, leaf in param_paths(abstract, key=jax.tree_util.keystr).items()}
    return shapes, is_int8_params(abstract)


def check_params(model: nn.Module, params) -> None:
    """GenerationError unless params has exactly the tree and shapes `model` expects (a MELT checkpoint
    with an Ouro model or the reverse, or a config that does not match the weights)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in MODEL_TYPES:
        raise GenerationError(f"expected a melt_jax model (OuroModel, MeltModel), got {type(model).__name__}")
    kind = model.config.model_type
    expected, int8_model = _expected(model)
    try:
        got = {name: tuple(np.shape(x)) for name, x in param_paths(params, key=jax.tree_util.keystr).items()}
    except Exception as e:  # not a pytree of arrays
        raise GenerationError(f"params are not a tree of arrays: {e}") from None
    int8_params = is_int8_params(params)
    if int8_model != int8_params:
        which = (
            "the model is int8 but its params are float" if int8_model else "the params are int8 but the model is float"
        )
        raise GenerationError(f"{which}; use the (model, params) pair that quantize_int8 returns together")
    mismatches = param_mismatches(expected, got)
    missing, extra = sorted(mismatches.missing), sorted(mismatches.unexpected)
    if missing or extra:
        # A MELT model with a fixed gate has exactly Ouro's params, so the kinds only differ when the trees do.
        params_kind = param_table.model_type_of_params(param_paths(params))
        if params_kind != kind:
            melt = params_kind == "melt"
            found = "a MELT checkpoint (it has kv_gate weights)" if melt else "an Ouro checkpoint (no kv_gate weights)"
            raise GenerationError(f"the model is {kind!r} but the params are {found}; load it with the matching model")
        raise GenerationError(f"params do not match the {kind} model: missing {missing[:3]}, unexpected {extra[:3]}")
    if mismatches.misshapen:
        name = mismatches.misshapen[0]
        raise GenerationError(f"params{name} has shape {got[name]}, the model's config expects {expected[name]}")
