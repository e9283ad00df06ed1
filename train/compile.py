"""A stage's training step compiled ahead of time for the devices it will run on, without running it:
what each device would hold, and whether it fits.

`compile_stage(cfg, topology)` builds the stage as `run_stage` does (the same task, optimizer, state
shardings, mesh and jitted step), with every array abstract: params, optimizer state, teacher and
batch are ShapeDtypeStructs, so nothing is read or allocated and `teacher=` / `init_from=` may name a
preset ("ouro-1.4b") or a config.json instead of a checkpoint. With a TPU topology ("v5p:2x2x2") the
TPU compiler lays the step out for those chips (melt_jax.aot); without one, for this machine's devices.
"""

from __future__ import annotations

import dataclasses

import jax

from melt_jax.aot import CompileReport, compile_and_measure, topology_devices
from melt_jax.model.attention import describe_attention
from melt_jax.model.params import abstract_params
from melt_jax.sharding import check_batch_divisible, make_mesh
from melt_jax.train.config import TrainConfig
from melt_jax.train.optimizer import build_optimizer
from melt_jax.train.steps import abstract_batch, abstract_state, jit_train_step, shardings_of
from melt_jax.train.tasks import build_task


def compile_stage(cfg: TrainConfig, topology: str | None = None) -> CompileReport:
    """The per-device memory of stage `cfg.stage`'s training step on the mesh cfg.mesh over the
    devices of `topology` (a TPU topology name; None: this machine's devices)."""
    cfg.validate()
    devices = topology_devices(topology)
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_divisible(cfg.batch_size, mesh)
    # Everything is traced under the mesh, so that the model makes the choices of the devices it is
    # compiled for (melt_jax.model.attention.target_platform), not of this machine's.
    with jax.set_mesh(mesh):
        task = build_task(cfg, mesh, abstract=True)
        optimizer = build_optimizer(cfg.optimizer, abstract_params(task.model), cfg.steps, task.trainable)
        state = abstract_state(task, mesh, optimizer)
        teacher = task.teacher_params
        teacher_shardings = None if teacher is None else shardings_of(teacher)
        step = jit_train_step(task, optimizer, shardings_of(state), teacher_shardings, mesh, cfg.steps, cfg.decay_steps)
        batch = abstract_batch(task.batch_fields, cfg.batch_size, cfg.data.seq_len, mesh)

    def lower():
        with jax.set_mesh(mesh):
            return step.lower(state, teacher, batch)

    report = compile_and_measure(lower, list(mesh.devices.flat))
    return dataclasses.replace(report, attention=describe_attention(cfg.attention, devices[0].platform))
