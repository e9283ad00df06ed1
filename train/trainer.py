"""The training loop of one stage: data, task, state and steps put together, with logging and checkpoints.

`run_stage(config)` trains one stage (see train/config.py) and leaves in config.output_dir:
  checkpoints/<step>/   orbax CheckpointManager checkpoints (resumed from automatically)
  metrics.jsonl         one JSON record per logged step and per evaluation
  tensorboard/          the same as TensorBoard scalars, when tensorboardX is installed
  model/                the final model (config.json + params, melt_jax.checkpoint layout)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from melt_jax.checkpoint import save_params
from melt_jax.data.pipeline import BatchIterator
from melt_jax.errors import TrainingError
from melt_jax.model.params import abstract_params
from melt_jax.sharding import (
    check_batch_divisible,
    global_batch_array,
    make_mesh,
)
from melt_jax.train.checkpointing import RunCheckpoints
from melt_jax.train.config import TrainConfig, to_dict
from melt_jax.train.held_out import evaluate, make_eval_steps
from melt_jax.train.metrics import MetricsLog
from melt_jax.train.optimizer import build_optimizer
from melt_jax.train.stage_data import batch_digest, build_data
from melt_jax.train.steps import init_state, make_train_step, scheduled_decay_start, shardings_of
from melt_jax.train.tasks import build_task


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
    jitted_step = make_train_step(task, optimizer, state_shardings, teacher_shardings, mesh, cfg.steps, cfg.decay_steps)
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
    # The stage ends when the learning-rate decay does (it starts earlier at a held-out accuracy of
    # decay_at_accuracy), at the latest at cfg.steps.
    decay_start = int(scheduled_decay_start(int(state.decay_start), cfg.steps, cfg.decay_steps))
    end = decay_start + cfg.decay_steps
    last_saved = latest
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    metrics_log = MetricsLog(out, enabled=is_main, tensorboard=cfg.tensorboard, log=log)
    progress = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=step, desc=cfg.stage, unit="step", dynamic_ncols=True)

    def check_finite(metrics, at_loop):
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            where = f"step {last_saved}" if last_saved is not None else "none yet"
            raise TrainingError(
                f"[{cfg.stage}] loss is {loss} at step {at_loop}: stopping. "
                f"Last good checkpoint: {where} in {checkpoints.directory}"
            )
        return loss

    metrics: dict = {}
    model_dir = out / "model"
    final_eval: dict = {}
    latest_eval, latest_eval_step = None, None
    window_start, window_steps = time.perf_counter(), 0
    steps_this_call = 0
    try:
        profile, tracing = cfg.profile_range(), False
        while step < end and not meta.get("stopped_early"):
            if profile is not None and step + 1 == profile[0] and is_main:
                jax.profiler.start_trace(str(out / "profile"))
                tracing = True
            local = next(iterator)
            meta["batch_digest"] = batch_digest(local, meta["batch_digest"])
            batch = {name: global_batch_array(local[name], mesh) for name in task.batch_fields}
            state, metrics = jitted_step(state, teacher_params, batch)
            step += 1
            if profile is not None and step == profile[1] and is_main:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                log(f"[{cfg.stage}] profile of steps {profile[0]}..{profile[1]} in {out / 'profile'}")
            steps_this_call += 1
            window_steps += 1
            meta["tokens_seen"] += tokens_per_step
            if step % cfg.log_every == 0 or step == end:
                loss = check_finite(metrics, step)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                metrics_log.write({"step": step, "tokens_per_s": tokens_per_s, **_format(metrics)})
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)
            if cfg.eval_every and cfg.eval_batches and step % cfg.eval_every == 0 and step < end:
                latest_eval, latest_eval_step = evaluate(eval_steps, state.params, data, cfg, mesh), step
                metrics_log.write({"step": step, "eval": latest_eval})
                accuracy = latest_eval.get("accuracy", 0.0)
                if cfg.stop_at_accuracy and accuracy >= cfg.stop_at_accuracy:
                    meta["stopped_early"] = True
                    log(f"[{cfg.stage}] held-out accuracy {accuracy:.3f} at step {step}: stopping")
                if cfg.decay_at_accuracy and accuracy >= cfg.decay_at_accuracy and step < decay_start:
                    state = state.replace(decay_start=jax.device_put(np.int32(step), state.decay_start.sharding))
                    decay_start, end = step, step + cfg.decay_steps
                    log(
                        f"[{cfg.stage}] held-out accuracy {accuracy:.3f} at step {step}: "
                        f"learning rate decays to 0 by step {end}"
                    )
            if step % cfg.checkpoint_every == 0 or step == end or meta.get("stopped_early"):
                check_finite(metrics, step)
                meta["data"] = iterator.state()
                checkpoints.save(step, state, dict(meta))
                last_saved = step
            if stop_after is not None and steps_this_call >= stop_after and step < end:
                break
        checkpoints.wait()
        finished = step >= end or meta.get("stopped_early", False)
        if finished:
            if latest_eval is not None and latest_eval_step == step:
                final_eval = latest_eval
            elif cfg.eval_batches:
                final_eval = evaluate(eval_steps, state.params, data, cfg, mesh)
                metrics_log.write({"step": step, "eval": final_eval})
            host = _host_params(state.params)
            if is_main:
                save_params(model_dir, task.config, host, overwrite=True)
            multihost_utils.sync_global_devices("model saved")
    finally:
        if tracing:
            jax.profiler.stop_trace()
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
