"""Loading a model for inference from a checkpoint directory, and reading an exit policy from its
command-line form."""

from __future__ import annotations

import dataclasses

import jax

from melt_jax.checkpoint import load_params
from melt_jax.errors import GenerationError
from melt_jax.model.config import OuroConfig
from melt_jax.model.exit import ExitPolicy
from melt_jax.model.ouro import OuroModel
from melt_jax.model.params import with_layer_layout
from melt_jax.model.registry import model_for

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
