"""Evaluation during training, jitted under the run's mesh: on the synthetic task, per-loop loss over the
answer tokens and per-loop exact-match accuracy of its held-out examples (one prompt + answer a row, as
melt-eval scores a synthetic dataset's answers); on other data, per-loop loss and perplexity over all
tokens of held-out packed rows (as melt-eval scores text).

The result has the keys of `evaluation.evaluate_dataset` (what melt-eval reports, one definition of
each: see melt_jax/inference/evaluation.py), computed with evaluation's functions; the loop over
batches is this module's own because its rows are global arrays on the run's mesh, fed by every
process."""

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
    answers(params, tokens, answer_mask) -> (evaluation.LossSums over the answer tokens, per-loop
        exact-match counts over the rows [T])
    """

    loss: Callable
    answers: Callable


def make_eval_steps(task: Task, mesh) -> EvalSteps:
    model = task.model

    def loss(params, tokens, loss_mask, segment_ids):
        return evaluation.loss_sums(model, params, tokens, loss_mask, ExitPolicy.last(), segment_ids=segment_ids)

    def answers(params, tokens, answer_mask):
        sums, matches = evaluation.answer_sums(model, params, tokens, answer_mask)
        return sums, jnp.sum(matches, axis=1)  # [T]

    return EvalSteps(loss=under_mesh(jax.jit(loss), mesh), answers=under_mesh(jax.jit(answers), mesh))


def _global_rows(rows: np.ndarray, mesh) -> Array:
    """A global batch from the same host rows on every process (each contributes its slice)."""
    per_process = rows.shape[0] // jax.process_count()
    start = jax.process_index() * per_process
    return global_batch_array(rows[start : start + per_process], mesh)


def held_out_loss(steps: EvalSteps, params, data: StageData, cfg: TrainConfig, mesh) -> tuple[evaluation.LossSums, int]:
    """The loss sums of up to cfg.eval_batches batches of held-out rows (rows reused cyclically when
    there are fewer than a batch), and the number of batches."""
    batch = cfg.batch_size
    total = None
    held = data.held_out.as_dict()
    n = held["tokens"].shape[0]
    num_batches = min(cfg.eval_batches, max(1, n // batch))
    for i in range(num_batches):
        rows = np.arange(i * batch, (i + 1) * batch) % n
        tokens, loss_mask = (_global_rows(held[name][rows], mesh) for name in ("tokens", "loss_mask"))
        segment_ids = _global_rows(held["segment_ids"][rows], mesh) if cfg.data.isolate_documents else None
        sums = steps.loss(params, tokens, loss_mask, segment_ids)
        total = sums if total is None else total + sums
    return total, num_batches


def held_out_answers(
    steps: EvalSteps, params, answers: dict[str, np.ndarray], batch: int, mesh
) -> tuple[evaluation.LossSums, np.ndarray, int, int]:
    """Over the whole batches of the held-out examples: the loss sums over their answer tokens, the
    per-loop exact-match counts [T], the number of examples counted and of batches."""
    tokens, answer_mask = answers["tokens"], answers["answer_mask"]
    total, correct, total_rows, num_batches = None, 0, 0, 0
    for start in range(0, tokens.shape[0] - batch + 1, batch):
        t = _global_rows(tokens[start : start + batch], mesh)
        a = _global_rows(answer_mask[start : start + batch], mesh)
        sums, matches = steps.answers(params, t, a)
        total = sums if total is None else total + sums
        correct = correct + np.asarray(matches)
        total_rows += batch
        num_batches += 1
    return total, np.atleast_1d(correct), total_rows, num_batches


def evaluate(steps: EvalSteps, params, data: StageData, cfg: TrainConfig, mesh) -> dict:
    """The held-out evaluation (see the module docstring), the last loop as the exit: the keys of
    `evaluation.evaluate_dataset` (what melt-eval reports): "loss_per_loop" (loop 0 first), "loss",
    "tokens_scored", "num_tokens", "num_batches" and, on the synthetic task, "accuracy_per_loop",
    "accuracy", "num_examples", else "perplexity_per_loop", "perplexity"."""
    if data.answers is None:
        total, num_batches = held_out_loss(steps, params, data, cfg, mesh)
        return total.report(num_batches, "all")
    total, correct, num_examples, num_batches = held_out_answers(steps, params, data.answers, cfg.batch_size, mesh)
    result = total.report(num_batches, "answer")
    result["accuracy_per_loop"] = [float(c) / max(num_examples, 1) for c in correct]
    result["accuracy"] = result["accuracy_per_loop"][-1]
    result["num_examples"] = num_examples
    return result
