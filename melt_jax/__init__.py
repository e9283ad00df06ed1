"""melt_jax: Ouro (looped language models) and MELT, the Memory-Efficient Looped Transformer, in JAX."""

from melt_jax.errors import ConfigError, MeltJaxError
from melt_jax.model.cache import KVCache, init_cache
from melt_jax.model.config import MeltConfig, OuroConfig
from melt_jax.model.exit import ExitPolicy, exit_distribution, threshold_exit_loops
from melt_jax.model.melt import MeltModel
from melt_jax.model.ouro import OuroModel, OuroOutput
from melt_jax.model.registry import MODEL_TYPES, config_from_json_file, model_for
from melt_jax.platforms import skip_absent_tpu

skip_absent_tpu()  # before any device is used: no libtpu start-up (and its warnings) without a TPU chip

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
