"""Evaluation during training: per-loop loss and perplexity on held-out rows, and per-loop
exact-match accuracy on the synthetic task's held-out examples, jitted under the run's mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.inference import evaluation
from melt_jax.model.exit import ExitPolicy
from melt_jax.sharding import (
    global_batch_array,
)
from melt_jax.train.config import TrainConfig
from melt_jax.train.stage_data import StageData
from melt_jax.train.steps import under_mesh
from melt_jax.train.tasks import Task

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EvalSteps:
    """The jitted evaluation programs of a stage, run under the mesh (`evaluation`'s functions, with
    the model's inference computation: MELT chunked).

    loss(params, tokens, loss_mask, segment_ids) -> evaluation.LossSums (per-loop weighted CE sums [T],
        weight); segment_ids None unless the task's batches carry them
    correct(params, tokens, answer_mask) -> per-loop exact-match counts over the rows [T]
    """

    loss: Callable
    correct: Callable


def make_eval_steps(task: Task, mesh) -> EvalSteps:
    model = task.model

    def loss(params, tokens, loss_mask, segment_ids):
        return evaluation.loss_sums(model, params, tokens, loss_mask, ExitPolicy.last(), segment_ids=segment_ids)

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
        tokens, loss_mask = (_global_rows(held[name][rows], mesh) for name in ("tokens", "loss_mask"))
        segment_ids = _global_rows(held["segment_ids"][rows], mesh) if cfg.data.isolate_documents else None
        sums = steps.loss(params, tokens, loss_mask, segment_ids)
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
