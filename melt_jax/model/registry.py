"""The model types melt_jax knows: a config's `model_type` names its config class and model class.

Everything that must build a model from a config or a file (checkpoint loading, the converter, the
sampler, evaluation, the trainer) asks this table instead of testing which kind of model it has. A
new model type is a config class (a subclass of OuroConfig with its own `model_type`), a model class,
and one `register` line below.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn

from melt_jax.errors import ConfigError
from melt_jax.model.config import MeltConfig, OuroConfig
from melt_jax.model.melt import MeltModel
from melt_jax.model.ouro import OuroModel


@dataclasses.dataclass(frozen=True)
class ModelType:
    """One model type: the `model_type` string of its config.json, its config and model classes."""

    name: str
    config_class: type[OuroConfig]
    model_class: type[nn.Module]


MODEL_TYPES: dict[str, ModelType] = {}


def register(config_class: type[OuroConfig], model_class: type[nn.Module]) -> None:
    """Makes `config_class.model_type` name this pair of classes."""
    MODEL_TYPES[config_class.model_type] = ModelType(config_class.model_type, config_class, model_class)


register(OuroConfig, OuroModel)
register(MeltConfig, MeltModel)


def model_type(name: str) -> ModelType:
    """The registered model type `name`; ConfigError listing the known ones otherwise."""
    if name not in MODEL_TYPES:
        known = ", ".join(repr(n) for n in MODEL_TYPES)
        raise ConfigError(f"unknown model_type {name!r}; known model types: {known}")
    return MODEL_TYPES[name]


def model_for(config: OuroConfig, **attributes) -> nn.Module:
    """The model of `config`, as the class its model_type names; `attributes` set module fields
    (e.g. collect)."""
    return model_type(config.model_type).model_class(config, **attributes)


def require_model_type(config: OuroConfig, expected: str, what: str) -> None:
    """ConfigError unless `config` is of model type `expected`; `what` names the checkpoint or field in
    the message."""
    if config.model_type != expected:
        raise ConfigError(f"{what} must be a {expected} checkpoint, got model_type {config.model_type!r}")


def config_from_json_file(path: str | os.PathLike, **overrides) -> OuroConfig:
    """The config of a `config.json`, as the config class its model_type names (`overrides` set
    runtime fields such as dtype). An unreadable file or an unknown model_type raises ConfigError."""
    try:
        with open(path) as f:
            name = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        name = None  # from_json_file reports the problem with the file
    config_class = MODEL_TYPES[name].config_class if name in MODEL_TYPES else OuroConfig
    return config_class.from_json_file(path, **overrides)
