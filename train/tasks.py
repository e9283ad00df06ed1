"""What a stage trains: the model, its starting params, its loss and the frozen teacher, built from
the run config and the checkpoints it names."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp

from melt_jax.aot import abstract_arrays
from melt_jax.checkpoint import load_config, load_params
from melt_jax.errors import ConfigError, TrainingError
from melt_jax.inference.param_check import param_mismatches
from melt_jax.model.config import MeltConfig, OuroConfig, preset_config
from melt_jax.model.ouro import OuroModel
from melt_jax.model.ouro_to_melt import melt_from_ouro
from melt_jax.model.param_table import param_paths
from melt_jax.model.params import abstract_params
from melt_jax.model.registry import config_from_json_file, model_for, require_model_type
from melt_jax.sharding import param_shardings
from melt_jax.train.config import TrainConfig
from melt_jax.train.objectives import (
    Distillation,
    exit_gate_loss,
    linear_alpha,
    looplm_loss,
    phase1_loss,
    phase2_loss,
)


@dataclasses.dataclass
class Task:
    """The trained model, its starting params (None for a fresh init; arrays read sharded from a
    checkpoint, or host arrays for new MELT gates), its loss `loss(params, teacher_params, batch,
    step) -> (loss, metrics)`, the frozen teacher if any (sharded on the mesh), and the fields of a
    training batch (`batch_fields`: "segment_ids" too when documents attend only within themselves)."""

    config: OuroConfig
    model: OuroModel
    init_params: dict | None
    loss: Callable
    trainable: str = "all"
    teacher_params: dict | None = None
    batch_fields: tuple[str, ...] = ("tokens", "loss_mask")


def _named_config(name: str, dtype: str) -> OuroConfig:
    """The config a preset name (Ouro or MELT) or a config.json path names, in `dtype`."""
    if Path(name).is_file() or name.endswith(".json"):
        config = config_from_json_file(name)
    else:
        config = preset_config(name)
    return config.replace(dtype=dtype, param_dtype=dtype)


def _model_config(cfg: TrainConfig) -> OuroConfig:
    """The config of a LoopLM trained from scratch: a preset or config.json, with cfg's overrides."""
    config = _named_config(cfg.model, cfg.dtype)
    require_model_type(config, "ouro", f"model={cfg.model}")  # a LoopLM trains from scratch, not MELT
    if cfg.vocab_size > 0:
        config = config.replace(vocab_size=cfg.vocab_size)
    if cfg.num_layers > 0:
        config = config.replace(num_hidden_layers=cfg.num_layers)
    if cfg.intermediate_size > 0:
        config = config.replace(intermediate_size=cfg.intermediate_size)
    if cfg.num_heads > 0:
        # head_dim stays the model's: fewer heads narrow the attention rather than widen each head
        config = config.replace(num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads)
    config.validate()
    return config


def _check_same_shapes(student: dict, teacher: dict, what: str) -> None:
    """TrainingError naming the first teacher param the student lacks, else the first whose shape
    differs from the student's."""
    teacher_shapes = {name: tuple(x.shape) for name, x in param_paths(teacher).items()}
    student_shapes = {name: tuple(x.shape) for name, x in param_paths(student).items()}
    mismatches = param_mismatches(teacher_shapes, student_shapes)
    if mismatches.missing:
        raise TrainingError(f"{what}: the student has no param {mismatches.missing[0]}")
    if mismatches.misshapen:
        name = mismatches.misshapen[0]
        raise TrainingError(
            f"{what}: param {name} has shape {teacher_shapes[name]} in the teacher "
            f"but {student_shapes[name]} in the student"
        )


def _load_checkpoint(
    path: str, model_type: str, field: str, dtype: str, mesh, abstract: bool = False
) -> tuple[OuroConfig, dict]:
    """(config, params in `dtype` sharded on `mesh`, each process reading only its shards) of the
    checkpoint at `path`, which must hold a `model_type` model; TrainingError naming the config field
    otherwise (checked before any param is read). With `abstract`, `path` may also be a preset name or
    a config.json, and the params are ShapeDtypeStructs carrying their shardings (nothing is read)."""
    if abstract and not Path(path).is_dir():
        config = _named_config(path, dtype)
    else:
        config = load_config(path, dtype=dtype)
    try:
        require_model_type(config, model_type, f"{field}={path}")
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    if abstract:
        shapes = abstract_params(model_for(config))
        return config, abstract_arrays(shapes, param_shardings(shapes, mesh))
    return load_params(path, dtype=dtype, mesh=mesh)


def build_task(cfg: TrainConfig, mesh, abstract: bool = False) -> Task:
    """The model, starting params and loss of the stage `cfg.stage`; checkpoints are read sharded on
    `mesh`; every model computes attention as `cfg.attention` says. With `abstract` (compiling without
    running) no param is read or made: the params are ShapeDtypeStructs, and `init_from` / `teacher`
    may name a preset or a config.json instead of a checkpoint."""
    dtype = cfg.dtype
    load = functools.partial(_load_checkpoint, dtype=dtype, mesh=mesh, abstract=abstract)
    batch_fields = ("tokens", "loss_mask", "segment_ids") if cfg.data.isolate_documents else ("tokens", "loss_mask")
    if cfg.stage in ("looplm", "exit_gate"):
        if cfg.init_from:
            config, params = load(cfg.init_from, "ouro", "init_from")
        else:
            config, params = _model_config(cfg), None
        config = config.replace(remat=cfg.remat, attention=cfg.attention)
        model = model_for(config)
        if cfg.stage == "looplm":
            loss = lambda p, t, batch, step: looplm_loss(model, p, batch, cfg.beta)  # noqa: E731
            return Task(config, model, params, loss, batch_fields=batch_fields)
        loss = lambda p, t, batch, step: exit_gate_loss(model, p, batch)  # noqa: E731
        return Task(config, model, params, loss, trainable="exit_gate", batch_fields=batch_fields)

    teacher_config, teacher_params = load(cfg.teacher, "ouro", "teacher")
    teacher_config = teacher_config.replace(attention=cfg.attention)
    if cfg.init_from:
        config, params = load(cfg.init_from, "melt", "init_from")
    elif abstract:
        config = MeltConfig.from_ouro(teacher_config, gate_bias_init=cfg.gate_bias_init, gate=cfg.gate)
        params = abstract_params(model_for(config))
    else:
        config, params = melt_from_ouro(
            teacher_config, teacher_params, gate_bias_init=cfg.gate_bias_init, gate=cfg.gate
        )
    config = config.replace(chunk_size=cfg.chunk_size, remat=cfg.remat, attention=cfg.attention)
    _check_same_shapes(params, teacher_params, f"teacher {cfg.teacher}")
    distillation = Distillation(model_for(config), model_for(teacher_config), cfg.forward)
    if cfg.stage == "melt_phase1":

        def loss(p, t, batch, step):
            alpha = linear_alpha(step, cfg.steps) if cfg.interpolate else jnp.float32(1.0)
            return phase1_loss(distillation, p, t, batch, alpha)

    else:

        def loss(p, t, batch, step):
            return phase2_loss(distillation, p, t, batch, cfg.align_beta)

    return Task(config, distillation.student, params, loss, teacher_params=teacher_params, batch_fields=batch_fields)
