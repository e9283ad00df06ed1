"""The training loop of one stage: sharded state, jitted step, evaluation, logging, checkpoints.

`run_stage(config)` trains one stage (see train/config.py) and leaves in config.output_dir:
  checkpoints/<step>/   orbax CheckpointManager checkpoints (resumed from automatically)
  metrics.jsonl         one JSON record per logged step and per evaluation
  tensorboard/          the same as TensorBoard scalars, when tensorboardX is installed
  model/                the final model (config.json + params, melt_jax.checkpoint layout)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from melt_jax import evaluation
from melt_jax.checkpoint import load_config, load_params, save_params
from melt_jax.config import OuroConfig
from melt_jax.data import BatchIterator, PackedData, build_train_data, pack_documents, tokenize_dataset
from melt_jax.errors import ConfigError, MeltJaxError
from melt_jax.exit import ExitPolicy
from melt_jax.melt import melt_from_ouro
from melt_jax.ouro import OuroModel
from melt_jax.params import abstract_params
from melt_jax.registry import config_from_json_file, model_for, require_model_type
from melt_jax.sharding import (
    batch_sharding,
    check_batch_divisible,
    global_batch_array,
    make_mesh,
    param_shardings,
    replicated,
    shardings_following_params,
)
from melt_jax.synthetic import answer_batch, pack_answer_examples, synthetic_reasoning_dataset
from melt_jax.tokenizer import Tokenizer, load_tokenizer
from melt_jax.train.checkpointing import RunCheckpoints
from melt_jax.train.config import TrainConfig, to_dict
from melt_jax.train.metrics import MetricsLog
from melt_jax.train.objectives import (
    Distillation,
    exit_gate_loss,
    linear_alpha,
    looplm_loss,
    phase1_loss,
    phase2_loss,
)
from melt_jax.train.optimizer import build_optimizer

Array = jax.Array


class TrainingError(MeltJaxError, RuntimeError):
    """A run that cannot go on: a non-finite loss, a teacher that does not fit the student."""


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: Array  # uint32 [2]


# --------------------------------------------------------------------------------------------------
# What a stage trains


@dataclasses.dataclass
class Task:
    """The trained model, its starting params (None for a fresh init; arrays read sharded from a
    checkpoint, or host arrays for new MELT gates), its loss `loss(params, teacher_params, batch,
    step) -> (loss, metrics)` and the frozen teacher if any (sharded on the mesh)."""

    config: OuroConfig
    model: OuroModel
    init_params: dict | None
    loss: Callable
    trainable: str = "all"
    teacher_params: dict | None = None


def _model_config(cfg: TrainConfig) -> OuroConfig:
    """The config of a LoopLM trained from scratch: a preset or config.json, with cfg's overrides."""
    if Path(cfg.model).is_file() or cfg.model.endswith(".json"):
        config = config_from_json_file(cfg.model)
    else:
        config = OuroConfig.preset(cfg.model)
    config = config.replace(dtype=cfg.dtype, param_dtype=cfg.dtype)
    if cfg.vocab_size > 0:
        config = config.replace(vocab_size=cfg.vocab_size)
    if cfg.num_layers > 0:
        config = config.replace(num_hidden_layers=cfg.num_layers)
    config.validate()
    return config


def _check_same_shapes(student: dict, teacher: dict, what: str) -> None:
    """TrainingError naming the first teacher param whose shape differs from the student's."""
    flat_teacher = {tuple(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(teacher)}
    flat_student = {tuple(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(student)}
    for path, x in flat_teacher.items():
        name = "/".join(path)
        if path not in flat_student:
            raise TrainingError(f"{what}: the student has no param {name}")
        if tuple(flat_student[path].shape) != tuple(x.shape):
            raise TrainingError(
                f"{what}: param {name} has shape {tuple(x.shape)} in the teacher "
                f"but {tuple(flat_student[path].shape)} in the student"
            )


def _load_checkpoint(path: str, model_type: str, field: str, dtype: str, mesh) -> tuple[OuroConfig, dict]:
    """(config, params in `dtype` sharded on `mesh`, each process reading only its shards) of the
    checkpoint at `path`, which must hold a `model_type` model; TrainingError naming the config field
    otherwise (checked before any param is read)."""
    config = load_config(path, dtype=dtype)
    try:
        require_model_type(config, model_type, f"{field}={path}")
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    return load_params(path, dtype=dtype, mesh=mesh)


def build_task(cfg: TrainConfig, mesh) -> Task:
    """The model, starting params and loss of the stage `cfg.stage`; checkpoints are read sharded on
    `mesh`."""
    dtype = cfg.dtype
    if cfg.stage in ("looplm", "exit_gate"):
        if cfg.init_from:
            config, params = _load_checkpoint(cfg.init_from, "ouro", "init_from", dtype, mesh)
        else:
            config, params = _model_config(cfg), None
        model = model_for(config)
        if cfg.stage == "looplm":
            loss = lambda p, t, batch, step: looplm_loss(model, p, batch, cfg.beta)  # noqa: E731
            return Task(config, model, params, loss)
        loss = lambda p, t, batch, step: exit_gate_loss(model, p, batch)  # noqa: E731
        return Task(config, model, params, loss, trainable="exit_gate")

    teacher_config, teacher_params = _load_checkpoint(cfg.teacher, "ouro", "teacher", dtype, mesh)
    if cfg.init_from:
        config, params = _load_checkpoint(cfg.init_from, "melt", "init_from", dtype, mesh)
    else:
        config, params = melt_from_ouro(teacher_config, teacher_params, gate_bias_init=cfg.gate_bias_init)
    config = config.replace(chunk_size=cfg.chunk_size)
    _check_same_shapes(params, teacher_params, f"teacher {cfg.teacher}")
    distillation = Distillation(model_for(config), model_for(teacher_config), cfg.forward)
    if cfg.stage == "melt_phase1":

        def loss(p, t, batch, step):
            return phase1_loss(distillation, p, t, batch, linear_alpha(step, cfg.steps))

    else:

        def loss(p, t, batch, step):
            return phase2_loss(distillation, p, t, batch, cfg.align_beta)

    return Task(config, distillation.student, params, loss, teacher_params=teacher_params)


# --------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class StageData:
    tokenizer: Tokenizer
    train: PackedData
    held_out: PackedData
    answers: dict[str, np.ndarray] | None  # synthetic task: tokens / answer_mask of eval examples


def build_data(cfg: TrainConfig) -> StageData:
    """Packed training rows, held-out rows for the per-loop loss and, for the synthetic task, the
    held-out examples for exact-match accuracy."""
    d = cfg.data
    tokenizer = load_tokenizer(d.tokenizer)
    if d.source == "synthetic":
        train = synthetic_reasoning_dataset(d.synthetic_task(d.num_examples, seed=cfg.seed))
        held = synthetic_reasoning_dataset(d.synthetic_task(d.eval_examples, seed=cfg.seed + 10_000))
        if d.loss == "answer":
            packed = pack_answer_examples(tokenizer, train["prompt"], train["answer"], d.seq_len)
            held_out = pack_answer_examples(tokenizer, held["prompt"], held["answer"], d.seq_len)
        else:
            packed = pack_documents(tokenize_dataset(train, tokenizer, "text"), d.seq_len, tokenizer.pad_id)
            held_out = pack_documents(tokenize_dataset(held, tokenizer, "text"), d.seq_len, tokenizer.pad_id)
        answers = answer_batch(tokenizer, held["prompt"], held["answer"], d.seq_len)
        return StageData(tokenizer, packed, held_out, answers)
    packed = build_train_data(d.source, tokenizer, d.seq_len, text_field=d.text_field)
    n_held = min(cfg.eval_batches * cfg.batch_size, packed.num_rows // 10)
    if n_held == 0:  # too little data to hold some out: evaluate on training rows
        return StageData(tokenizer, packed, packed, None)
    rows = packed.as_dict()
    train = {k: v[:-n_held] for k, v in rows.items()}
    held = {k: v[-n_held:] for k, v in rows.items()}
    return StageData(tokenizer, PackedData(**train), PackedData(**held), None)


def batch_digest(batch: dict[str, np.ndarray], previous: str) -> str:
    """A running hash of the token batches a run has trained on (to check resumption)."""
    return hashlib.sha256(previous.encode() + np.ascontiguousarray(batch["tokens"]).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# State and steps


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
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


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


def train_step(loss: Callable, optimizer, state: TrainState, teacher_params, batch) -> tuple[TrainState, dict]:
    """One optimizer step: the gradient of loss(params, teacher_params, batch, state.step) -> (loss,
    metrics), the optimizer update, the step count and RNG advanced; metrics gain the grad norm."""

    def loss_of(params):
        return loss(params, teacher_params, batch, state.step)

    (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    rng = jax.random.split(state.rng)[0]
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def make_train_step(task: Task, optimizer, state_shardings, teacher_shardings, mesh):
    """The jitted `train_step` (state, teacher_params, batch) -> (state, metrics); the state is donated
    and the activations are sharded by the logical rules."""
    step = functools.partial(train_step, task.loss, optimizer)
    batch_shardings = {"tokens": batch_sharding(mesh), "loss_mask": batch_sharding(mesh)}
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, teacher_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )
    return under_mesh(jitted, mesh)


@dataclasses.dataclass(frozen=True)
class EvalSteps:
    """The jitted evaluation programs of a stage, run under the mesh (`evaluation`'s functions, with
    the model's inference computation: MELT chunked).

    loss(params, tokens, loss_mask) -> evaluation.LossSums (per-loop weighted CE sums [T], weight)
    correct(params, tokens, answer_mask) -> per-loop exact-match counts over the rows [T]
    """

    loss: Callable
    correct: Callable


def make_eval_steps(task: Task, mesh) -> EvalSteps:
    model = task.model

    def loss(params, tokens, loss_mask):
        return evaluation.loss_sums(model, params, tokens, loss_mask, ExitPolicy.last())

    def correct(params, tokens, answer_mask):
        return jnp.sum(evaluation.loop_answer_matches(model, params, tokens, answer_mask), axis=1)  # [T]

    return EvalSteps(loss=under_mesh(jax.jit(loss), mesh), correct=under_mesh(jax.jit(correct), mesh))


def _global_rows(rows: np.ndarray, mesh) -> Array:
    """A global batch from the same host rows on every process (each contributes its slice)."""
    per_process = rows.shape[0] // jax.process_count()
    start = jax.process_index() * per_process
    return global_batch_array(rows[start : start + per_process], mesh)


def evaluate(steps: EvalSteps, params, data: StageData, cfg: TrainConfig, mesh) -> dict:
    """Per-loop loss and perplexity on held-out rows; per-loop exact-match accuracy on the synthetic
    task's held-out examples (teacher-forced answer tokens all argmax = greedy exact match)."""
    batch = cfg.batch_size
    total = None
    held = data.held_out.as_dict()
    n = held["tokens"].shape[0]
    for i in range(min(cfg.eval_batches, max(1, n // batch))):
        rows = np.arange(i * batch, (i + 1) * batch) % n
        sums = steps.loss(params, _global_rows(held["tokens"][rows], mesh), _global_rows(held["loss_mask"][rows], mesh))
        total = sums if total is None else total + sums
    loop_loss = np.asarray(total.per_loop) / max(float(total.weight), 1.0)
    result = {"loop_loss": [float(x) for x in loop_loss], "loop_ppl": [evaluation.perplexity(x) for x in loop_loss]}
    if data.answers is not None:
        tokens, answer_mask = data.answers["tokens"], data.answers["answer_mask"]
        correct, total_rows = 0, 0
        for start in range(0, tokens.shape[0] - batch + 1, batch):
            t = _global_rows(tokens[start : start + batch], mesh)
            a = _global_rows(answer_mask[start : start + batch], mesh)
            correct = correct + np.asarray(steps.correct(params, t, a))
            total_rows += batch
        result["loop_accuracy"] = [float(c) / max(total_rows, 1) for c in np.atleast_1d(correct)]
        result["accuracy"] = result["loop_accuracy"][-1]
    return result


# --------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class StageResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_metrics: dict
    evaluation: dict
    tokens_seen: int
    batch_digest: str
    seconds: float


def _host_params(params) -> dict:
    """Params as host numpy arrays (gathered from all processes)."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    return jax.tree.map(np.asarray, params)


def _format(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]
    return out


def run_stage(cfg: TrainConfig, *, stop_after: int | None = None, log: Callable[[str], None] = print) -> StageResult:
    """Trains one stage to cfg.steps, resuming from the run's latest checkpoint if there is one.
    `stop_after` ends this call after that many steps of this call (an interruption, for tests)."""
    cfg.validate()
    started = time.perf_counter()
    is_main = jax.process_index() == 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    check_batch_divisible(cfg.batch_size, mesh)
    task = build_task(cfg, mesh)
    data = build_data(cfg)
    if data.tokenizer.vocab_size > task.config.vocab_size:
        raise TrainingError(
            f"tokenizer {cfg.data.tokenizer} has {data.tokenizer.vocab_size} tokens "
            f"but the model's vocab_size is {task.config.vocab_size}"
        )
    iterator = BatchIterator(
        data.train,
        cfg.batch_size,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        shuffle=cfg.data.shuffle,
    )
    optimizer = build_optimizer(cfg.optimizer, abstract_params(task.model), cfg.steps, task.trainable)
    state = init_state(task, cfg, mesh, optimizer)
    state_shardings = shardings_of(state)
    teacher_params = task.teacher_params
    teacher_shardings = None if teacher_params is None else shardings_of(teacher_params)
    jitted_step = make_train_step(task, optimizer, state_shardings, teacher_shardings, mesh)
    eval_steps = make_eval_steps(task, mesh)

    checkpoints = RunCheckpoints(out / "checkpoints", cfg.keep_checkpoints, cfg.async_checkpoints)
    meta = {"stage": cfg.stage, "tokens_seen": 0, "batch_digest": "", "data": iterator.state()}
    latest = checkpoints.latest_step()
    if latest is not None:
        state, meta = checkpoints.restore(latest, state)
        if meta.get("stage") != cfg.stage:
            raise TrainingError(f"{out} holds checkpoints of stage {meta.get('stage')!r}, not {cfg.stage!r}")
        iterator.restore(meta["data"])
        log(f"[{cfg.stage}] resumed from step {latest} in {checkpoints.directory}")
    if is_main:
        (out / "run_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    step = int(state.step)
    last_saved = latest
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    metrics_log = MetricsLog(out, enabled=is_main, tensorboard=cfg.tensorboard, log=log)
    progress = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=step, desc=cfg.stage, unit="step", dynamic_ncols=True)

    def check_finite(metrics, at_step):
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            where = f"step {last_saved}" if last_saved is not None else "none yet"
            raise TrainingError(
                f"[{cfg.stage}] loss is {loss} at step {at_step}: stopping. "
                f"Last good checkpoint: {where} in {checkpoints.directory}"
            )
        return loss

    metrics: dict = {}
    model_dir = out / "model"
    final_eval: dict = {}
    window_start, window_steps = time.perf_counter(), 0
    steps_this_call = 0
    try:
        while step < cfg.steps:
            local = next(iterator)
            meta["batch_digest"] = batch_digest(local, meta["batch_digest"])
            batch = {name: global_batch_array(local[name], mesh) for name in ("tokens", "loss_mask")}
            state, metrics = jitted_step(state, teacher_params, batch)
            step += 1
            steps_this_call += 1
            window_steps += 1
            meta["tokens_seen"] += tokens_per_step
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = check_finite(metrics, step)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                metrics_log.write({"step": step, "tokens_per_s": tokens_per_s, **_format(metrics)})
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)
            if cfg.eval_every and cfg.eval_batches and step % cfg.eval_every == 0 and step < cfg.steps:
                metrics_log.write({"step": step, "eval": evaluate(eval_steps, state.params, data, cfg, mesh)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                check_finite(metrics, step)
                meta["data"] = iterator.state()
                checkpoints.save(step, state, dict(meta))
                last_saved = step
            if stop_after is not None and steps_this_call >= stop_after and step < cfg.steps:
                break
        checkpoints.wait()
        if step >= cfg.steps:
            if cfg.eval_batches:
                final_eval = evaluate(eval_steps, state.params, data, cfg, mesh)
                metrics_log.write({"step": step, "eval": final_eval})
            host = _host_params(state.params)
            if is_main:
                save_params(model_dir, task.config, host, overwrite=True)
            multihost_utils.sync_global_devices("model saved")
    finally:
        if progress is not None:
            progress.close()
        checkpoints.close()
        metrics_log.close()
    return StageResult(
        output_dir=out,
        model_dir=model_dir,
        steps=step,
        final_metrics=_format(metrics) if metrics else {},
        evaluation=final_eval,
        tokens_seen=meta["tokens_seen"],
        batch_digest=meta["batch_digest"],
        seconds=time.perf_counter() - started,
    )
