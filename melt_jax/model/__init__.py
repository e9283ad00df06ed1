"""The models: configs and presets, Ouro and MELT, their KV caches, the exit policies, the training
forwards of MELT, the parameter table and the registry of model types (docs/melt.md).

Import from this package (`from melt_jax.model import OuroModel, ExitPolicy`); the modules inside it
import each other directly. Attention, its KV sources and its implementations are the subpackage
`melt_jax.model.attention`. Building blocks that only the models use (layers, remat, gate modules)
stay in their modules.
"""

from melt_jax.model.cache import KVCache, init_cache
from melt_jax.model.chunking import check_chunk_size, num_chunks, padded_chunking, scan_chunks
from melt_jax.model.config import GATES, PRESETS, REMAT_POLICIES, MeltConfig, OuroConfig
from melt_jax.model.exit import (
    ExitPolicy,
    cumulative_exit_probs,
    exit_distribution,
    select_hidden,
    threshold_exit_loops,
)
from melt_jax.model.losses import IGNORE_INDEX, mean_next_token_loss, next_token_cross_entropy, target_log_probs
from melt_jax.model.melt import MeltModel
from melt_jax.model.melt_training import sequential_forward, two_pass_forward
from melt_jax.model.ouro import INTERMEDIATES, OuroModel, OuroOutput
from melt_jax.model.ouro_to_melt import melt_from_ouro
from melt_jax.model.param_table import ParamSpec, param_paths, param_shapes, params_from_paths, params_of
from melt_jax.model.params import (
    abstract_params,
    count_params,
    init_params,
    is_int8_params,
    param_bytes,
    stack_layers,
    unstack_layers,
    with_layer_layout,
)
from melt_jax.model.registry import MODEL_TYPES, config_from_json_file, model_for, model_type, require_model_type

__all__ = [
    "GATES",
    "IGNORE_INDEX",
    "INTERMEDIATES",
    "MODEL_TYPES",
    "PRESETS",
    "REMAT_POLICIES",
    "ExitPolicy",
    "KVCache",
    "MeltConfig",
    "MeltModel",
    "OuroConfig",
    "OuroModel",
    "OuroOutput",
    "ParamSpec",
    "abstract_params",
    "check_chunk_size",
    "config_from_json_file",
    "count_params",
    "cumulative_exit_probs",
    "exit_distribution",
    "init_cache",
    "init_params",
    "is_int8_params",
    "mean_next_token_loss",
    "melt_from_ouro",
    "model_for",
    "model_type",
    "next_token_cross_entropy",
    "num_chunks",
    "padded_chunking",
    "param_bytes",
    "param_paths",
    "param_shapes",
    "params_from_paths",
    "params_of",
    "require_model_type",
    "scan_chunks",
    "select_hidden",
    "sequential_forward",
    "stack_layers",
    "target_log_probs",
    "threshold_exit_loops",
    "two_pass_forward",
    "unstack_layers",
    "with_layer_layout",
]
