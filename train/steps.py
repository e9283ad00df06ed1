"""The sharded training state and the jitted optimizer step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from melt_jax.aot import abstract_arrays
from melt_jax.model.params import abstract_params
from melt_jax.sharding import (
    batch_sharding,
    param_shardings,
    replicated,
    shardings_following_params,
)
from melt_jax.train.config import TrainConfig
from melt_jax.train.tasks import Task

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: Array  # uint32 [2]
    # int32 scalar: the step at which a held-out evaluation reaching TrainConfig.decay_at_accuracy
    # started the learning-rate decay, NOT_TRIGGERED until one does. Only this is state: the decay
    # otherwise starts decay_steps before the stage's `steps`, which a resumed run may change.
    decay_start: Array


NOT_TRIGGERED = np.iinfo(np.int32).max


def _place(tree: dict, shardings: Any) -> Any:
    """New global arrays with `shardings` holding the values of `tree`: jax.Arrays are copied on the
    devices (the trained params are donated, so they must not share buffers with the teacher); host
    arrays (the same full value on every process) are sliced, each device taking its shard."""

    def on_devices(x, sharding):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding, may_alias=False)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: np.asarray(x[index]))

    return jax.tree.map(on_devices, tree, shardings)


def init_state(task: Task, cfg: TrainConfig, mesh, optimizer) -> TrainState:
    """The initial TrainState, sharded on `mesh`: params initialised in place from their shapes (each
    device computes only its shards) or placed from the starting checkpoint."""
    shapes = abstract_params(task.model)
    shardings = param_shardings(shapes, mesh)
    if task.init_params is None:
        init = jax.jit(
            lambda rng: task.model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"], out_shardings=shardings
        )
        params = init(jax.random.PRNGKey(cfg.seed))
    else:
        params = _place(task.init_params, shardings)
    opt_shardings = shardings_following_params(jax.eval_shape(optimizer.init, shapes), shapes, shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed + 1), replicated(mesh))
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    decay_start = jax.device_put(jnp.array(NOT_TRIGGERED, jnp.int32), replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng, decay_start=decay_start)


def abstract_state(task: Task, mesh, optimizer) -> TrainState:
    """The TrainState's shapes, dtypes and shardings on `mesh` (ShapeDtypeStruct leaves), as
    `init_state` would make it; allocates nothing."""
    shapes = abstract_params(task.model)
    shardings = param_shardings(shapes, mesh)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt_shardings = shardings_following_params(opt_shapes, shapes, shardings, mesh)
    scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated(mesh))  # noqa: E731
    return TrainState(
        step=scalar((), jnp.int32),
        params=abstract_arrays(shapes, shardings),
        opt_state=abstract_arrays(opt_shapes, opt_shardings),
        rng=scalar((2,), jnp.uint32),
        decay_start=scalar((), jnp.int32),
    )


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def under_mesh(fn: Callable, mesh) -> Callable:
    """fn called (and so traced) with `mesh` set by jax.set_mesh, which turns on the models'
    activation sharding constraints (melt_jax.sharding.constrain)."""

    @functools.wraps(fn)
    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    return call


def scheduled_decay_start(triggered: Array | int, steps: int, decay_steps: int) -> Array:
    """The step at which the learning-rate decay starts: the triggered start (TrainState.decay_start)
    or decay_steps before the stage's last step, whichever comes first."""
    return jnp.minimum(triggered, steps - decay_steps)


def decay_factor(step: Array, decay_start: Array, decay_steps: int) -> Array:
    """The learning-rate factor of the update made at `step` (steps taken before it): 1 before
    decay_start, then falling linearly, 1 - k / decay_steps at decay_start + k, to 0 after
    decay_steps updates; 1 throughout when decay_steps is 0."""
    if not decay_steps:
        return jnp.float32(1.0)
    remaining = (decay_start + decay_steps - step).astype(jnp.float32)
    return jnp.clip(remaining / decay_steps, 0.0, 1.0)


def train_step(
    loss: Callable, optimizer, state: TrainState, teacher_params, batch, steps: int = 0, decay_steps: int = 0
) -> tuple[TrainState, dict]:
    """One optimizer step: the gradient of loss(params, teacher_params, batch, state.step) -> (loss,
    metrics), the optimizer update scaled by `decay_factor` over the last `decay_steps` of `steps`
    or from the triggered start (for AdamW the same as scaling its learning rate, weight decay
    included), the step count and RNG advanced; metrics gain the grad norm and the learning-rate
    factor."""
    if decay_steps and not 0 < decay_steps <= steps:
        raise ValueError(f"train_step: decay_steps={decay_steps} needs the stage's steps >= it, got steps={steps}")

    def loss_of(params):
        return loss(params, teacher_params, batch, state.step)

    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    factor = decay_factor(state.step, scheduled_decay_start(state.decay_start, steps, decay_steps), decay_steps)
    if decay_steps:
        updates = jax.tree.map(lambda u: (u * factor).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr_factor=factor)
    rng = jax.random.split(state.rng)[0]
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


# What a step may read of a batch, [B, S] each; a task names the ones its loss reads (Task.batch_fields).
BATCH_DTYPES = {"tokens": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32}


def abstract_batch(fields: tuple[str, ...], batch_size: int, seq_len: int, mesh) -> dict:
    """The shapes, dtypes and shardings of a training batch of `fields` (ShapeDtypeStruct leaves)."""
    return {
        name: jax.ShapeDtypeStruct((batch_size, seq_len), BATCH_DTYPES[name], sharding=batch_sharding(mesh))
        for name in fields
    }


def jit_train_step(
    task: Task, optimizer, state_shardings, teacher_shardings, mesh, steps: int = 0, decay_steps: int = 0
):
    """`train_step` jitted (state, teacher_params, batch) -> (state, metrics): the state is donated and
    a batch holds the arrays `task.batch_fields`; to be called (or lowered) under `jax.set_mesh(mesh)`,
    which shards activations by the logical rules."""
    step = functools.partial(train_step, task.loss, optimizer, steps=steps, decay_steps=decay_steps)
    batch_shardings = {name: batch_sharding(mesh) for name in task.batch_fields}
    return jax.jit(
        step,
        in_shardings=(state_shardings, teacher_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def make_train_step(
    task: Task, optimizer, state_shardings, teacher_shardings, mesh, steps: int = 0, decay_steps: int = 0
):
    """The jitted `train_step` (state, teacher_params, batch) -> (state, metrics), called under the mesh."""
    jitted = jit_train_step(task, optimizer, state_shardings, teacher_shardings, mesh, steps, decay_steps)
    return under_mesh(jitted, mesh)
