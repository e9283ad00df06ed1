"""A MELT model from an Ouro model: the same weights plus MELT's new gate parameters, initialised as
the parameter table says (docs/melt.md, 'The gate')."""

from __future__ import annotations

import numpy as np

from melt_jax.model import param_table
from melt_jax.model.config import MeltConfig, OuroConfig
from melt_jax.model.registry import require_model_type


def melt_from_ouro(ouro_config: OuroConfig, ouro_params: dict, **melt_fields) -> tuple[MeltConfig, dict]:
    """A MELT model initialised from an Ouro model: the same weights (not copied) plus the params only
    MELT has (the per-layer gates), each filled with the init of its row of the parameter table
    (W_z = U_z = 0, b_z = gate_bias_init), in the params' dtype. `melt_fields` set MeltConfig fields
    (gate_bias_init, chunk_size)."""
    require_model_type(ouro_config, "ouro", "the model to build MELT from")
    config = MeltConfig.from_ouro(ouro_config, **melt_fields)
    dtype = ouro_params["layers"]["attn_in_norm"]["scale"].dtype
    new = {
        spec.path: np.full(spec.param_shape(config), spec.initial_value(config), dtype)
        for spec in param_table.PARAMS
        if spec.when in param_table.MELT_ONLY and spec.exists(config)
    }
    return config, param_table.params_from_paths(new, base=ouro_params)
