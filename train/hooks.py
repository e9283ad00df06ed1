"""The hooks of the training loop: each does one job after the steps it is due at.

The loop (train/trainer.py) draws a batch, runs the step and calls `Hooks.after_step`, which runs
every hook registered with `every=n` after each step divisible by n and, with `at_end=True`, after
the stage's last step (or the step that stopped it early) too. The hooks read and change the
`StageRun` they are given: the train state, the step reached, where the stage ends.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from melt_jax.errors import TrainingError
from melt_jax.train.checkpointing import RunCheckpoints
from melt_jax.train.metrics import MetricsLog


@dataclasses.dataclass
class StageRun:
    """What the training loop and its hooks share.

    state: the TrainState; metrics: the last step's metrics (device arrays, {} before the first);
    meta: what a checkpoint saves beside the state (stage, tokens_seen, batch_digest, data position,
    stopped_early once a held-out accuracy stopped the stage); step: the steps taken so far;
    decay_start: the step the learning-rate decay starts at, decay_steps: its length (the stage ends
    where it ends, `end`); evaluation: the latest held-out evaluation, made after step
    evaluation_step; last_saved: the step of the latest checkpoint (None: none yet).
    """

    stage: str
    state: Any
    meta: dict
    step: int
    decay_start: int
    decay_steps: int
    checkpoint_dir: Path
    log: Callable[[str], None]
    last_saved: int | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    evaluation: dict | None = None
    evaluation_step: int | None = None

    @property
    def end(self) -> int:
        """The step the stage ends at: where the decay ends."""
        return self.decay_start + self.decay_steps

    @property
    def stopped_early(self) -> bool:
        return bool(self.meta.get("stopped_early"))

    @property
    def at_end(self) -> bool:
        """Whether the step just taken is the stage's last (it reached the end or stopped early)."""
        return self.step == self.end or self.stopped_early

    @property
    def finished(self) -> bool:
        """Whether the stage is done: at its end or stopped early (then nothing is left to train)."""
        return self.step >= self.end or self.stopped_early

    def evaluated_now(self) -> bool:
        """Whether a held-out evaluation was made after the step just taken."""
        return self.evaluation is not None and self.evaluation_step == self.step

    def check_finite(self) -> float:
        """The last step's loss; TrainingError naming the last good checkpoint when it is not finite."""
        loss = float(self.metrics["loss"])
        if not math.isfinite(loss):
            where = f"step {self.last_saved}" if self.last_saved is not None else "none yet"
            raise TrainingError(
                f"[{self.stage}] loss is {loss} at step {self.step}: stopping. "
                f"Last good checkpoint: {where} in {self.checkpoint_dir}"
            )
        return loss


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(run)` after every step divisible by `every` (0: none by count) and, with `at_end`, after
    the stage's last step."""

    fn: Callable[[StageRun], None]
    every: int = 1
    at_end: bool = False

    def due(self, run: StageRun) -> bool:
        if self.every and run.step % self.every == 0:
            return True
        return self.at_end and run.at_end


class Hooks:
    """The hooks of one stage, run in the order they were added."""

    def __init__(self):
        self.hooks: list[Hook] = []
        self.before: list[Callable[[StageRun], None]] = []
        self.closers: list[Callable[[], None]] = []

    def add(self, fn: Callable[[StageRun], None], every: int = 1, at_end: bool = False) -> None:
        """Runs `fn(run)` after every step divisible by `every` and, with `at_end`, after the last."""
        self.hooks.append(Hook(fn, every, at_end))

    def add_before_step(self, fn: Callable[[StageRun], None]) -> None:
        """Runs `fn(run)` before every step (run.step is then the steps taken so far)."""
        self.before.append(fn)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Runs `fn()` when the loop ends, normally or by an exception."""
        self.closers.append(fn)

    def before_step(self, run: StageRun) -> None:
        for fn in self.before:
            fn(run)

    def after_step(self, run: StageRun) -> None:
        for hook in self.hooks:
            if hook.due(run):
                hook.fn(run)

    def close(self) -> None:
        for fn in self.closers:
            fn()


# --------------------------------------------------------------------------------------------------
# Progress and metrics


def stop_rule(
    steps: int,
    stop_at_accuracy: float = 0.0,
    decay_at_accuracy: float = 0.0,
    decay_steps: int = 0,
    stop_at_loss: float = 0.0,
) -> str:
    """What ends a stage, in words: "stops at step 100", "stops at acc >= 0.95 or step 4000", "stops at
    loss <= 2.1 or step 4000", or "decays at acc >= 0.95, stops 500 steps later, by step 4000"."""
    early = []
    if stop_at_accuracy:
        early.append(f"acc >= {stop_at_accuracy:g}")
    if stop_at_loss:
        early.append(f"loss <= {stop_at_loss:g}")
    if decay_at_accuracy:
        also = "".join(f" (or at {e})" for e in early)
        return f"decays at acc >= {decay_at_accuracy:g}, stops {decay_steps} steps later{also}, by step {steps}"
    return f"stops at {' or '.join([*early, f'step {steps}'])}"


class ProgressBar:
    """A tqdm bar of the stage's steps up to where the stage now ends (run.end: the bar shrinks when an
    accuracy starts the decay early), with the latest logged loss (and the LoopLM loss's CE and
    entropy terms), tokens/s, the latest held-out accuracy and what will stop the stage (`stops`,
    `stop_rule`)."""

    def __init__(self, stage: str, total: int, initial: int, stops: str = ""):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=stage, unit="step", dynamic_ncols=True)
        self.stops = stops
        self.postfix: dict[str, str] = {}

    def show(self, loss: float, tokens_per_s: float, metrics: dict | None = None) -> None:
        metrics = metrics or {}
        self.postfix.update(loss=f"{loss:.4f}")
        if "expected_ce" in metrics and "exit_entropy" in metrics:
            self.postfix.update(ce=f"{float(metrics['expected_ce']):.4f}", H=f"{float(metrics['exit_entropy']):.3f}")
        self.postfix.update(tok_s=f"{tokens_per_s:,.0f}")
        self._refresh()

    def _refresh(self) -> None:
        postfix = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        self.bar.set_postfix_str(f"{postfix}; {self.stops}" if self.stops else postfix)

    def advance(self, run: StageRun) -> None:
        if run.end != self.bar.total:
            self.bar.total = run.end
        self.bar.update(1)
        if run.evaluated_now() and "accuracy" in run.evaluation:
            self.postfix["acc"] = f"{run.evaluation['accuracy']:.3f}"
            self._refresh()
        elif run.evaluated_now() and "loss" in run.evaluation:  # text: the held-out loss is what to watch
            self.postfix["val"] = f"{run.evaluation['loss']:.4f}"
            self._refresh()
        if run.stopped_early:
            self.bar.total = run.step
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def format_metrics(metrics: dict) -> dict:
    """Metrics as JSON numbers: scalars as floats, arrays (per-loop values) as flat lists of floats."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]
    return out


class LogMetrics:
    """Writes the last step's metrics and the tokens/s since the previous record to the MetricsLog
    (stopping on a non-finite loss), and shows them on the progress bar."""

    def __init__(self, metrics_log: MetricsLog, tokens_per_step: int, start_step: int, progress: ProgressBar | None):
        self.metrics_log = metrics_log
        self.tokens_per_step = tokens_per_step
        self.progress = progress
        self.window_start, self.window_first_step = time.perf_counter(), start_step

    def __call__(self, run: StageRun) -> None:
        loss = run.check_finite()
        elapsed = time.perf_counter() - self.window_start
        tokens_per_s = (run.step - self.window_first_step) * self.tokens_per_step / max(elapsed, 1e-9)
        self.metrics_log.write({"step": run.step, "tokens_per_s": tokens_per_s, **format_metrics(run.metrics)})
        if self.progress is not None:
            self.progress.show(loss, tokens_per_s, run.metrics)
        self.window_start, self.window_first_step = time.perf_counter(), run.step


# --------------------------------------------------------------------------------------------------
# Held-out evaluation and what its accuracy triggers


class HeldOutEvaluation:
    """Evaluates the params on the held-out data (`evaluate(params) -> dict`, train/held_out.py's
    keys), keeps the result on the run and writes it to the MetricsLog as {"step", "eval"}. The
    stage's last step is left to the final evaluation that follows the loop."""

    def __init__(self, evaluate: Callable[[Any], dict], metrics_log: MetricsLog):
        self.evaluate = evaluate
        self.metrics_log = metrics_log

    def __call__(self, run: StageRun) -> None:
        if run.step >= run.end:
            return
        run.evaluation, run.evaluation_step = self.evaluate(run.state.params), run.step
        self.metrics_log.write({"step": run.step, "eval": run.evaluation})


def _accuracy_now(run: StageRun) -> float | None:
    """The held-out accuracy (last loop) of an evaluation made after the step just taken, else None."""
    return run.evaluation.get("accuracy", 0.0) if run.evaluated_now() else None


def _stop_early(run: StageRun, reached: str) -> None:
    """Ends the stage at the step just taken (marked in the checkpoint meta, so that a rerun resumes
    as finished)."""
    run.meta["stopped_early"] = True
    run.log(f"[{run.stage}] {reached} at step {run.step}: stopping")


class StopAtAccuracy:
    """Ends the stage at the first evaluation whose held-out accuracy reaches `threshold`."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, run: StageRun) -> None:
        accuracy = _accuracy_now(run)
        if accuracy is None or accuracy < self.threshold:
            return
        _stop_early(run, f"held-out accuracy {accuracy:.3f}")


class StopAtLoss:
    """Ends the stage at the first evaluation whose held-out loss (last loop) is at most `threshold`:
    on text, the loss over all tokens of the held-out rows; on the synthetic task, over its answers."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, run: StageRun) -> None:
        if not run.evaluated_now() or run.evaluation["loss"] > self.threshold:
            return
        _stop_early(run, f"held-out loss {run.evaluation['loss']:.4f}")


class DecayAtAccuracy:
    """Starts the learning-rate decay at the first evaluation whose held-out accuracy reaches
    `threshold` before the scheduled decay start: TrainState.decay_start becomes this step, and the
    stage ends `decay_steps` later."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, run: StageRun) -> None:
        accuracy = _accuracy_now(run)
        if accuracy is None or accuracy < self.threshold or run.step >= run.decay_start:
            return
        sharding = run.state.decay_start.sharding
        run.state = run.state.replace(decay_start=jax.device_put(np.int32(run.step), sharding))
        run.decay_start = run.step
        run.log(
            f"[{run.stage}] held-out accuracy {accuracy:.3f} at step {run.step}: "
            f"learning rate decays to 0 by step {run.end}"
        )


# --------------------------------------------------------------------------------------------------
# Checkpoints and profiling


class SaveCheckpoint:
    """Saves the train state with the meta (the data loader's settings; RunCheckpoints saves its
    position), after checking that the last step's loss is finite."""

    def __init__(self, checkpoints: RunCheckpoints, data_settings: Callable[[], Any]):
        self.checkpoints = checkpoints
        self.data_settings = data_settings

    def __call__(self, run: StageRun) -> None:
        run.check_finite()
        run.meta["data"] = self.data_settings()
        self.checkpoints.save(run.step, run.state, dict(run.meta))
        run.last_saved = run.step


class Profiler:
    """A jax.profiler trace of steps first..last (counted from 1) in `directory`."""

    def __init__(self, directory: Path, first: int, last: int):
        self.directory = directory
        self.first, self.last = first, last
        self.tracing = False

    def start(self, run: StageRun) -> None:
        """Before each step: starts the trace when the next step is the first traced one."""
        if run.step + 1 == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def stop(self, run: StageRun) -> None:
        """After each step: stops the trace after the last traced one."""
        if run.step != self.last:
            return
        jax.block_until_ready(run.state)
        jax.profiler.stop_trace()
        self.tracing = False
        run.log(f"[{run.stage}] profile of steps {self.first}..{self.last} in {self.directory}")

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
