"""Weight conversion between Hugging Face Ouro checkpoints and melt_jax params.

Installed as `melt_jax.convert` (the folder convert/ of the checkout). The name mapping comes from one
table, the parameter table of melt_jax/model/param_table.py, applied by convert/mapping.py in both directions.

    load_hf_checkpoint(path, dtype="float32") -> (OuroConfig, params)     HF folder -> params
    save_hf_checkpoint(config, params, path, dtype=None, max_shard_bytes=5e9)  params -> HF folder

Command line: `melt-convert import|export ...` or `python -m melt_jax.convert ...` (convert/cli.py).
"""

from .errors import ConversionError
from .hf_export import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint
from .hf_import import load_hf_checkpoint
from .mapping import OURO_RULES, TensorRule, hf_tensor_plan, param_shapes

__all__ = [
    "ConversionError",
    "DEFAULT_MAX_SHARD_BYTES",
    "OURO_RULES",
    "TensorRule",
    "hf_tensor_plan",
    "load_hf_checkpoint",
    "param_shapes",
    "save_hf_checkpoint",
]
