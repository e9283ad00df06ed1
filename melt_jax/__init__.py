"""melt_jax: Ouro (looped language models) and MELT, the Memory-Efficient Looped Transformer, in JAX."""

from melt_jax.cache import KVCache, init_ouro_cache, ouro_cache_bytes_per_token
from melt_jax.config import OuroConfig
from melt_jax.errors import ConfigError, MeltJaxError
from melt_jax.exit import ExitPolicy, exit_distribution, threshold_exit_steps
from melt_jax.ouro import OuroModel, OuroOutput

__all__ = [
    "ConfigError",
    "ExitPolicy",
    "KVCache",
    "MeltJaxError",
    "OuroConfig",
    "OuroModel",
    "OuroOutput",
    "exit_distribution",
    "init_ouro_cache",
    "ouro_cache_bytes_per_token",
    "threshold_exit_steps",
]
