"""Loading a model for inference from a checkpoint directory, checking that params fit a model, and
reading an exit policy from its command-line form."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np

from melt_jax.checkpoint import load_params
from melt_jax.errors import GenerationError
from melt_jax.model import param_table
from melt_jax.model.config import OuroConfig
from melt_jax.model.exit import ExitPolicy
from melt_jax.model.ouro import OuroModel
from melt_jax.model.params import abstract_params, with_layer_layout
from melt_jax.model.registry import MODEL_TYPES, model_for

Array = jax.Array


def load_model(path, dtype: str | None = None, int8: bool = False) -> tuple[OuroModel, dict]:
    """(model, params on the default device) of a melt_jax checkpoint directory, Ouro or MELT, in the
    layer layout of inference: the layers unrolled (`config.scan_layers` false; see
    melt_jax/model/ouro.py), so that decoding reads every weight in place. With `int8`, the matmul
    weights are int8 with per-channel scales and the activations run in `dtype` (see
    melt_jax.inference.quantization). CheckpointError / ConfigError name what is wrong with the directory."""
    if not isinstance(int8, bool):
        raise GenerationError(f"int8 must be true or false, got {int8!r}")
    config, params = load_params(path, dtype)
    model, params = with_layer_layout(model_for(config), params, scan_layers=False)
    params = jax.device_put(params)
    if int8:
        from melt_jax.inference.quantization import quantize_int8  # qwix only where int8 is asked for

        model, params = quantize_int8(model, params)
    return model, params


def parse_exit_policy(text: str, config: OuroConfig, skip_loops: bool = False) -> ExitPolicy:
    """An exit policy from its command-line form: 'last', 'loop:N' (0-based; 'step:N' is read the same), 'threshold:X',
    'weighted', or 'default' (what upstream Ouro returns: config.early_exit_step / _threshold); with
    `skip_loops`, one that skips the loops after the exit ('loop:N', 'threshold:X' or a 'default'
    that is one of them)."""
    name, _, value = text.partition(":")
    try:
        if name in ("last", "weighted") and not value:
            policy = ExitPolicy(name)
        elif name == "default" and not value:
            policy = ExitPolicy.upstream_default(config)
        elif name in ("loop", "step") and value:
            policy = ExitPolicy.at_loop(int(value))
        elif name == "threshold" and value:
            policy = ExitPolicy.at_threshold(float(value))
        else:
            raise ValueError("unknown form")
        policy.validate(config.num_loops)
        if skip_loops:
            policy = dataclasses.replace(policy, skip_loops=True)
    except ValueError as e:
        raise GenerationError(
            f"bad exit policy {text!r} ({e}); expected last, loop:N (0 <= N < {config.num_loops}), "
            "threshold:X, weighted or default"
        ) from None
    return policy


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
