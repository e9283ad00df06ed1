"""melt_jax: Ouro (looped language models) and MELT, the Memory-Efficient Looped Transformer, in JAX."""

from melt_jax.cache import KVCache, init_cache
from melt_jax.config import MeltConfig, OuroConfig
from melt_jax.errors import ConfigError, MeltJaxError
from melt_jax.exit import ExitPolicy, exit_distribution, threshold_exit_loops
from melt_jax.melt import MeltModel
from melt_jax.ouro import OuroModel, OuroOutput
from melt_jax.registry import MODEL_TYPES, config_from_json_file, model_for

__all__ = [
    "MODEL_TYPES",
    "ConfigError",
    "ExitPolicy",
    "KVCache",
    "MeltConfig",
    "MeltJaxError",
    "MeltModel",
    "OuroConfig",
    "OuroModel",
    "OuroOutput",
    "config_from_json_file",
    "exit_distribution",
    "init_cache",
    "model_for",
    "threshold_exit_loops",
]
