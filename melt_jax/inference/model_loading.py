"""Loading a model for inference from a checkpoint directory."""

from __future__ import annotations

import jax

from melt_jax.checkpoint import load_params
from melt_jax.errors import GenerationError
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
