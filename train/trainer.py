"""The training loop of one stage: data, task, state and steps put together, with logging and checkpoints.

`run_stage(config)` trains one stage (see train/config.py): a loop that draws a batch, runs the step
and calls the hooks due after it (train/hooks.py: metrics, progress, held-out evaluation and the
decay or stop its accuracy triggers, checkpoints, profiling). It leaves in config.output_dir:
  run_config.json       the settings the run was trained with (a rerun must match them: train/run_record.py)
  checkpoints/<step>/   orbax CheckpointManager checkpoints (resumed from automatically; damaged ones
                        are moved to damaged_checkpoints/)
  metrics.jsonl         one JSON record per logged step and per evaluation (train/held_out.py's keys);
                        on a resume, the records after the resumed step are dropped
  tensorboard/          the same as TensorBoard scalars, when tensorboardX is installed
  model/                the final model (config.json + params, melt_jax.checkpoint layout)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from melt_jax.checkpoint import generation_files, save_params
from melt_jax.data.loader import GrainBatches
from melt_jax.data.tokenized_corpus import PackedRows
from melt_jax.errors import TrainingError
from melt_jax.model.attention import describe_attention
from melt_jax.model.params import abstract_params
from melt_jax.sharding import (
    check_batch_divisible,
    global_batch_array,
    make_mesh,
)
from melt_jax.train.checkpointing import RunCheckpoints
from melt_jax.train.config import TrainConfig, to_dict
from melt_jax.train.held_out import evaluate, make_eval_steps
from melt_jax.train.hooks import (
    DecayAtAccuracy,
    HeldOutEvaluation,
    Hooks,
    LogMetrics,
    Profiler,
    ProgressBar,
    SaveCheckpoint,
    StageRun,
    StopAtAccuracy,
    StopAtLoss,
    format_metrics,
    stop_rule,
)
from melt_jax.train.metrics import MetricsLog
from melt_jax.train.optimizer import build_optimizer
from melt_jax.train.run_record import check_rerun, describe_accepted, holds_training, write_record
from melt_jax.train.signals import StageInterrupted, StopSignals
from melt_jax.train.stage_data import StageData, batch_digest, build_data
from melt_jax.train.steps import init_state, make_train_step, scheduled_decay_start, shardings_of
from melt_jax.train.tasks import Task, build_task


@dataclasses.dataclass
class StageResult:
    """What a call of run_stage leaves: the steps reached, the last step's metrics, the final held-out
    evaluation (train/held_out.py's `evaluate`; {} when the stage is not finished or not evaluated)."""

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


def _is_main() -> bool:
    return jax.process_index() == 0


@dataclasses.dataclass
class _Stage:
    """What a stage trains with: the mesh, task and data, the data iterator, the jitted training
    step `train_step(state, teacher_params, batch) -> (state, metrics)` from `state` (freshly
    initialised), and the held-out evaluation `evaluate(params) -> dict`."""

    cfg: TrainConfig
    mesh: Any
    task: Task
    data: StageData
    iterator: GrainBatches
    state: Any
    train_step: Callable
    evaluate: Callable[[Any], dict]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.data.seq_len


def _check_vocab(cfg: TrainConfig, task: Task, data: StageData) -> None:
    if data.tokenizer.vocab_size > task.config.vocab_size:
        raise TrainingError(
            f"tokenizer {cfg.data.tokenizer} has {data.tokenizer.vocab_size} tokens "
            f"but the model's vocab_size is {task.config.vocab_size}"
        )


def _build_stage(cfg: TrainConfig) -> _Stage:
    """The mesh, task, data, initial state and jitted programs of a stage."""
    mesh = make_mesh(cfg.mesh)
    check_batch_divisible(cfg.batch_size, mesh)
    task = build_task(cfg, mesh)
    data = build_data(cfg)
    _check_vocab(cfg, task, data)
    # A tokenized corpus may have more rows than a host holds permutations of: grain's index shuffle
    # orders it. Rows in memory keep the per-epoch permutations their measured figures were made with.
    order = "index_shuffle" if isinstance(data.train, PackedRows) else "permutation"
    iterator = GrainBatches(
        data.train,
        cfg.batch_size,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        order=order,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    optimizer = build_optimizer(cfg.optimizer, abstract_params(task.model), cfg.steps, task.trainable)
    state = init_state(task, cfg, mesh, optimizer)
    teacher_shardings = None if task.teacher_params is None else shardings_of(task.teacher_params)
    train_step = make_train_step(
        task, optimizer, shardings_of(state), teacher_shardings, mesh, cfg.steps, cfg.decay_steps
    )
    eval_steps = make_eval_steps(task, mesh)

    def evaluate_params(params) -> dict:
        return evaluate(eval_steps, params, data, cfg, mesh)

    return _Stage(cfg, mesh, task, data, iterator, state, train_step, evaluate_params)


def evaluate_checkpoint(cfg: TrainConfig, path: str) -> dict:
    """The held-out evaluation that a stage of `cfg` makes (its data, batches, mesh and metrics), of
    the LoopLM checkpoint at `path`: how the pipeline scores a teacher it did not train. {} when cfg
    has no evaluation batches."""
    if not cfg.eval_batches:
        return {}
    cfg = dataclasses.replace(cfg, stage="looplm", init_from=str(path), teacher=None)
    mesh = make_mesh(cfg.mesh)
    task = build_task(cfg, mesh)
    data = build_data(cfg)
    _check_vocab(cfg, task, data)
    return evaluate(make_eval_steps(task, mesh), task.init_params, data, cfg, mesh)


def _start_run(cfg: TrainConfig, stage: _Stage, checkpoints: RunCheckpoints, log: Callable[[str], None]) -> StageRun:
    """The run at its start: resumed from the latest checkpoint if there is one, else at step 0.
    The stage ends when the learning-rate decay does (it starts earlier at a held-out accuracy of
    decay_at_accuracy), at the latest at cfg.steps."""
    state = stage.state
    meta = {"stage": cfg.stage, "tokens_seen": 0, "batch_digest": "", "data": stage.iterator.state()}
    latest = None
    restored = checkpoints.restore_latest(state, warn=lambda m: log(f"[{cfg.stage}] {m}"))
    if restored is not None:
        latest, state, meta = restored
        if meta.get("stage") != cfg.stage:
            raise TrainingError(
                f"{Path(cfg.output_dir)} holds checkpoints of stage {meta.get('stage')!r}, not {cfg.stage!r}"
            )
        stage.iterator.restore(meta["data"])
        log(f"[{cfg.stage}] resumed from step {latest} in {checkpoints.directory}")
    decay_start = int(scheduled_decay_start(int(state.decay_start), cfg.steps, cfg.decay_steps))
    return StageRun(
        stage=cfg.stage,
        state=state,
        meta=meta,
        step=int(state.step),
        decay_start=decay_start,
        decay_steps=cfg.decay_steps,
        checkpoint_dir=checkpoints.directory,
        log=log,
        last_saved=latest,
    )


def _stage_hooks(
    cfg: TrainConfig, stage: _Stage, run: StageRun, save: SaveCheckpoint, metrics_log: MetricsLog
) -> Hooks:
    """The hooks of a stage, in the order they run after a step: profiling, metrics and progress,
    held-out evaluation and what its accuracy triggers, checkpoints."""
    hooks = Hooks()
    profile = cfg.profile_range()
    if profile is not None and _is_main():
        profiler = Profiler(Path(cfg.output_dir) / "profile", *profile)
        hooks.add_before_step(profiler.start)
        hooks.add(profiler.stop)
        hooks.add_closer(profiler.close)
    stops = stop_rule(cfg.steps, cfg.stop_at_accuracy, cfg.decay_at_accuracy, cfg.decay_steps, cfg.stop_at_loss)
    progress = ProgressBar(cfg.stage, run.end, run.step, stops) if _is_main() and cfg.progress else None
    hooks.add(LogMetrics(metrics_log, stage.tokens_per_step, run.step, progress), every=cfg.log_every, at_end=True)
    if progress is not None:
        hooks.add(progress.advance)
        hooks.add_closer(progress.close)
    eval_every = cfg.eval_every if cfg.eval_batches else 0
    hooks.add(HeldOutEvaluation(stage.evaluate, metrics_log), every=eval_every)
    if cfg.stop_at_accuracy:
        hooks.add(StopAtAccuracy(cfg.stop_at_accuracy), every=eval_every)
    if cfg.stop_at_loss:
        hooks.add(StopAtLoss(cfg.stop_at_loss), every=eval_every)
    if cfg.decay_at_accuracy:
        hooks.add(DecayAtAccuracy(cfg.decay_at_accuracy), every=eval_every)
    hooks.add(save, every=cfg.checkpoint_every, at_end=True)
    return hooks


def _take_step(run: StageRun, stage: _Stage) -> None:
    """Draws the next batch and runs the training step on it."""
    local = next(stage.iterator)
    run.meta["batch_digest"] = batch_digest(local, run.meta["batch_digest"])
    batch = {name: global_batch_array(local[name], stage.mesh) for name in stage.task.batch_fields}
    run.state, run.metrics = stage.train_step(run.state, stage.task.teacher_params, batch)
    run.step += 1
    run.meta["tokens_seen"] += stage.tokens_per_step


def _train(run: StageRun, stage: _Stage, hooks: Hooks, stop_after: int | None, signals: StopSignals) -> None:
    """Steps until the stage ends (or stops early), calling the hooks due after each step; with
    `stop_after`, at most that many steps; after a SIGINT or SIGTERM, none more."""
    steps_this_call = 0
    while run.step < run.end and not run.stopped_early:
        hooks.before_step(run)
        _take_step(run, stage)
        steps_this_call += 1
        hooks.after_step(run)
        if signals.stop_requested(run.step, stage.cfg.log_every):
            break
        if stop_after is not None and steps_this_call >= stop_after and run.step < run.end:
            break


def _final_evaluation(run: StageRun, stage: _Stage, metrics_log: MetricsLog) -> dict:
    """The held-out evaluation of the final params: the one made after the last step if there was
    one, else a new one (written to the MetricsLog); {} without evaluation batches."""
    if run.evaluated_now():
        return run.evaluation
    if not stage.cfg.eval_batches:
        return {}
    result = stage.evaluate(run.state.params)
    if run.step not in metrics_log.evaluated_steps:  # a finished stage run again is evaluated again
        metrics_log.write({"step": run.step, "eval": result})
    return result


def _carried_files(cfg: TrainConfig) -> list[Path]:
    """The tokenizer and generation files of the checkpoint the stage starts from (init_from, else the
    teacher), carried on to its model: a student of a converted Ouro generates, evaluates and exports
    with the teacher's tokenizer."""
    source = cfg.init_from or cfg.teacher
    return generation_files(source) if source else []


def _save_model(model_dir: Path, stage: _Stage, params) -> None:
    """The final params as a melt_jax checkpoint (written by the main process), with the tokenizer
    and generation files of the checkpoint the stage started from."""
    host = _host_params(params)
    if _is_main():
        save_params(model_dir, stage.task.config, host, overwrite=True, files=_carried_files(stage.cfg))
    multihost_utils.sync_global_devices("model saved")


def _check_rerun(cfg: TrainConfig, accept_changes: bool, log: Callable[[str], None]) -> dict:
    """The accepted setting changes of a rerun into a directory that holds training ({} otherwise);
    RunConfigError when its settings differ from the recorded ones (train/run_record.py)."""
    out = Path(cfg.output_dir)
    changes = check_rerun(out / "run_config.json", to_dict(cfg), holds_training(out), accept_changes)
    if changes:
        log(f"[{cfg.stage}] {describe_accepted(changes)}")
    return changes


def _save_if_interrupted(run: StageRun, save: SaveCheckpoint, signals: StopSignals) -> None:
    """After a SIGINT or SIGTERM: saves the step reached, unless it is saved already."""
    if signals.received is not None and run.last_saved != run.step:
        save(run)


def run_stage(
    cfg: TrainConfig,
    *,
    stop_after: int | None = None,
    accept_changes: bool = False,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Trains one stage to cfg.steps, resuming from the run's latest intact checkpoint if there is one.
    A rerun into a directory trained with other settings raises RunConfigError naming them, unless
    they may change within a run and `accept_changes` is set. On SIGINT or SIGTERM it saves a
    checkpoint at the step reached and raises StageInterrupted. `stop_after` ends this call after
    that many steps of this call (an interruption, for tests)."""
    cfg.validate()
    changes = _check_rerun(cfg, accept_changes, log)
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    with StopSignals() as signals:
        out.mkdir(parents=True, exist_ok=True)
        stage = _build_stage(cfg)
        log(f"[{cfg.stage}] attention {describe_attention(cfg.attention, stage.mesh.devices.flat[0].platform)}")
        checkpoints = RunCheckpoints(
            out / "checkpoints", cfg.keep_checkpoints, cfg.async_checkpoints, stage.iterator.checkpoint_item
        )
        run = _start_run(cfg, stage, checkpoints, log)
        if _is_main():
            write_record(out / "run_config.json", to_dict(cfg), changes, step=run.step)
        metrics_log = MetricsLog(out, enabled=_is_main(), tensorboard=cfg.tensorboard, log=log, start_step=run.step)
        save = SaveCheckpoint(checkpoints, stage.iterator.state)
        hooks = _stage_hooks(cfg, stage, run, save, metrics_log)
        evaluation: dict = {}
        try:
            _train(run, stage, hooks, stop_after, signals)
            _save_if_interrupted(run, save, signals)
            checkpoints.wait()
            if run.finished:
                evaluation = _final_evaluation(run, stage, metrics_log)
                _save_model(out / "model", stage, run.state.params)
            if signals.received is not None:
                raise StageInterrupted(signals.received, run.stage, run.step, run.checkpoint_dir)
        finally:
            hooks.close()
            checkpoints.close()
            metrics_log.close()
    return StageResult(
        output_dir=out,
        model_dir=out / "model",
        steps=run.step,
        final_metrics=format_metrics(run.metrics) if run.metrics else {},
        evaluation=evaluation,
        tokens_seen=run.meta["tokens_seen"],
        batch_digest=run.meta["batch_digest"],
        seconds=time.perf_counter() - started,
    )
