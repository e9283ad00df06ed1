"""Training objectives: LoopLM Stage I and II, MELT phase 1 and 2 (docs/melt.md, 'Phase 1: interpolation'
and 'Phase 2: distillation').

Every objective is a pure function `(params, batch, ...) -> (loss, metrics)` of float32 scalars,
where batch = {"tokens": int32 [B, S], "loss_mask": float32 [B, S]} and optionally "segment_ids" int32
[B, S] (packed documents: every forward, student's and teacher's, then attends only within a
document); loss_mask[b, s] weighs the prediction of tokens[b, s] from tokens[b, :s] (column 0 is
never predicted). The prediction made at position s is weighted by loss_mask[:, s + 1], so
per-position terms below are [.., B, S-1].

Per-loop logits are computed for one loop and one block of at most LOSS_BLOCK positions at a time,
under `jax.checkpoint` (`map_loop_blocks`): neither pass holds more than [B, LOSS_BLOCK, V] of them
(at 10,000 tokens and a 49,152-token vocabulary a whole loop would be 2 GB of float32 per sequence),
and the backward pass keeps only the hidden states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from melt_jax.model.losses import target_log_probs
from melt_jax.model.melt import MeltModel
from melt_jax.model.melt_training import sequential_forward, two_pass_forward
from melt_jax.model.ouro import OuroModel
from melt_jax.model.param_table import EXIT_GATE, param_spec, path_of

Array = jax.Array
Batch = dict[str, Array]


# Positions per block of the per-loop logits (see the module docstring).
LOSS_BLOCK = 1024


def map_loop_blocks(fn: Callable[..., Array], per_loop: tuple[Array, ...], shared: tuple[Array, ...] = ()) -> Array:
    """fn(*per_loop[t], *shared) for every loop t, computed block by block along the sequence:
    per_loop arrays are [T, B, S, ...], shared ones [B, S, ...], fn maps [B, s, ...] slices of them to
    [B, s]; returns [T, B, S]. Each (loop, block) is recomputed in the backward pass, so only the
    inputs are kept. Blocks hold LOSS_BLOCK positions; the sequence is padded to whole blocks."""
    num_loops, batch, seq = per_loop[0].shape[:3]
    block = min(seq, LOSS_BLOCK)
    num_blocks = -(-seq // block)
    pad = num_blocks * block - seq

    def blocks(x: Array, leading: int) -> Array:  # [*lead, B, S, ...] -> [*lead, n, B, block, ...]
        x = jnp.pad(x, [(0, 0)] * (leading + 1) + [(0, pad)] + [(0, 0)] * (x.ndim - leading - 2))
        x = x.reshape(*x.shape[: leading + 1], num_blocks, block, *x.shape[leading + 2 :])
        return jnp.moveaxis(x, leading + 1, leading)

    def loop_major(x: Array) -> Array:  # [T, B, S, ...] -> [T * n, B, block, ...]
        x = blocks(x, 1)
        return x.reshape(num_loops * num_blocks, *x.shape[2:])

    loop_blocks = [loop_major(x) for x in per_loop]
    shared_blocks = [blocks(x, 0) for x in shared]  # [n, B, block, ...]
    block_index = jnp.tile(jnp.arange(num_blocks), num_loops)  # [T * n]

    def one(xs):
        index, *loop_slices = xs
        shared_slices = [x[index] for x in shared_blocks]
        return fn(*loop_slices, *shared_slices)

    out = jax.lax.map(jax.checkpoint(one), (block_index, *loop_blocks))  # [T * n, B, block]
    out = out.reshape(num_loops, num_blocks, batch, block)
    return jnp.moveaxis(out, 1, 2).reshape(num_loops, batch, num_blocks * block)[:, :, :seq]


def token_weights(batch: Batch) -> Array:
    """Weights of the predictions made at positions 0..S-2: loss_mask[:, 1:], float32 [B, S-1]."""
    return batch["loss_mask"][:, 1:].astype(jnp.float32)


def weighted_mean(values: Array, weights: Array) -> Array:
    """sum(values * weights) / sum(weights) over the trailing [B, S-1] axes (leading axes kept)."""
    axes = (-2, -1)
    return jnp.sum(values * weights, axis=axes) / jnp.maximum(jnp.sum(weights), 1.0)


def kl_divergence(teacher_logits: Array, student_logits: Array) -> Array:
    """KL(teacher || student) of the softmax distributions at temperature 1: [B, S, V] -> [B, S]."""
    teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)


def loop_cross_entropies(model: OuroModel, params, loop_hidden: Array, tokens: Array) -> Array:
    """Next-token loss of every loop: loop_hidden [T, B, S, H] -> float32 [T, B, S-1]."""

    def one_block(hidden, targets):  # [B, s, H], [B, s]
        logits = model.project_logits(params, hidden)
        return -target_log_probs(logits, targets)

    return map_loop_blocks(one_block, (loop_hidden[:, :, :-1],), (tokens[:, 1:],))


def exit_entropy(exit_pdf: Array) -> Array:
    """Entropy of the exit distribution over loops: [..., T] -> [...] (0 log 0 = 0)."""
    p = exit_pdf.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def train_only(params, role: str):
    """`params` with the gradient stopped at every param whose role in the parameter table is not `role`."""

    def keep_or_stop(key_path, x):
        return x if param_spec(path_of(key_path)).role == role else jax.lax.stop_gradient(x)

    return jax.tree_util.tree_map_with_path(keep_or_stop, params)


# --------------------------------------------------------------------------------------------------
# LoopLM


def looplm_loss(model: OuroModel, params, batch: Batch, beta: float) -> tuple[Array, dict]:
    """Stage I: per token sum_t p_t * CE_t - beta * H(p), averaged over the weighted predictions."""
    tokens = batch["tokens"]
    out = model.apply({"params": params}, tokens, segment_ids=batch.get("segment_ids"), exit_policy=None)
    ce = loop_cross_entropies(model, params, out.loop_hidden, tokens)  # [T, B, S-1]
    exit_pdf = out.exit_pdf[:, :-1].astype(jnp.float32)  # [B, S-1, T]
    expected_ce = jnp.einsum("BST,TBS->BS", exit_pdf, ce)
    entropy = exit_entropy(exit_pdf)  # [B, S-1]
    weights = token_weights(batch)
    loss = weighted_mean(expected_ce - beta * entropy, weights)
    metrics = {  # loss = expected_ce - beta * exit_entropy (negative once beta * H exceeds the CE)
        "loss": loss,
        "expected_ce": weighted_mean(expected_ce, weights),
        "exit_entropy": weighted_mean(entropy, weights),
        "loop_ce": weighted_mean(ce, weights),  # [T]
    }
    return loss, metrics


def exit_gate_loss(model: OuroModel, params, batch: Batch) -> tuple[Array, dict]:
    """Stage II: trains only the exit gate (the params of role EXIT_GATE in the parameter table; all
    other params are held constant here).

    With CE_t the detached per-loop losses, I_t = max(0, CE_{t-1} - CE_t) and w_t =
    sigmoid(50 (I_t - 0.005)); the loss is the mean over loops t >= 2 of BCE(1 - lambda_t, w_t),
    lambda_t = sigmoid(gate logit t): the gate learns to continue while a loop still helps.
    """
    frozen = jax.tree.map(jax.lax.stop_gradient, params)
    params = train_only(params, EXIT_GATE)
    tokens = batch["tokens"]
    out = model.apply({"params": params}, tokens, segment_ids=batch.get("segment_ids"), exit_policy=None)
    ce = jax.lax.stop_gradient(loop_cross_entropies(model, frozen, out.loop_hidden, tokens))  # [T, B, S-1]
    improvement = jnp.maximum(0.0, ce[:-1] - ce[1:])  # [T-1, B, S-1]: loops 2..T
    target = jax.nn.sigmoid(50.0 * (improvement - 0.005))  # w_t: probability of continuing
    gate_logits = out.gate_logits[1:, :, :-1].astype(jnp.float32)  # [T-1, B, S-1]
    # BCE(1 - lambda, w) = -(w log(1 - lambda) + (1 - w) log lambda), lambda = sigmoid(gate logit).
    bce = -(target * jax.nn.log_sigmoid(-gate_logits) + (1 - target) * jax.nn.log_sigmoid(gate_logits))
    weights = token_weights(batch)
    loss = jnp.mean(weighted_mean(bce, weights))
    metrics = {
        "loss": loss,
        "loop_ce": weighted_mean(ce, weights),
        "continue_target": weighted_mean(target, weights),  # [T-1]
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# MELT distillation


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A MELT student, its frozen LoopLM teacher, and how the student's training forward runs.

    forward: "two_pass" (default) or "sequential" (melt_training), in chunks of the student config's
    chunk_size, which must divide the sequence.
    """

    student: MeltModel
    teacher: OuroModel
    forward: str = "two_pass"

    def __post_init__(self):
        if self.forward not in ("two_pass", "sequential"):
            raise ValueError(f"forward must be 'two_pass' or 'sequential', got {self.forward!r}")

    def student_forward(self, params, tokens: Array, alpha, collect: tuple[str, ...] = (), segment_ids=None):
        model = self.student.clone(collect=collect)
        run = two_pass_forward if self.forward == "two_pass" else sequential_forward
        return run(model, params, tokens, self.student.config.chunk_size, alpha, segment_ids)

    def teacher_forward(self, teacher_params, tokens: Array, collect: tuple[str, ...] = (), segment_ids=None):
        teacher_params = jax.lax.stop_gradient(teacher_params)
        teacher = self.teacher.clone(collect=collect)
        return teacher.apply({"params": teacher_params}, tokens, segment_ids=segment_ids, exit_policy=None)

    def loop_kl(self, params, teacher_params, student_hidden: Array, teacher_hidden: Array) -> Array:
        """KL(teacher_t || student_t) of every loop's next-token distributions: [T, B, S-1]."""
        teacher_params = jax.lax.stop_gradient(teacher_params)

        def one_block(student_h, teacher_h):  # [B, s, H]
            student_logits = self.student.project_logits(params, student_h)
            teacher_logits = self.teacher.project_logits(teacher_params, teacher_h)
            return kl_divergence(teacher_logits, student_logits)

        teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
        return map_loop_blocks(one_block, (student_hidden[:, :, :-1], teacher_hidden[:, :, :-1]))


def phase1_loss(distillation: Distillation, params, teacher_params, batch: Batch, alpha: Array) -> tuple[Array, dict]:
    """Phase 1: all-loop KD (mean over loops of KL(teacher_t || student_t)) of the student whose keys
    and values are alpha * MELT + (1 - alpha) * Ouro."""
    tokens, segment_ids = batch["tokens"], batch.get("segment_ids")
    student = distillation.student_forward(params, tokens, alpha, segment_ids=segment_ids)
    teacher = distillation.teacher_forward(teacher_params, tokens, segment_ids=segment_ids)
    kl = distillation.loop_kl(params, teacher_params, student.loop_hidden, teacher.loop_hidden)
    loop_kd = weighted_mean(kl, token_weights(batch))  # [T]
    loss = jnp.mean(loop_kd)
    return loss, {"loss": loss, "kd": loss, "loop_kd": loop_kd, "alpha": jnp.asarray(alpha, jnp.float32)}


def phase2_loss(distillation: Distillation, params, teacher_params, batch: Batch, beta: float) -> tuple[Array, dict]:
    """Phase 2: KD + beta * attention alignment, the mean over loops, layers and token positions of
    ||o_melt(l, t) - stopgrad(o_ouro(l, t))||^2 (o: attention sublayer output after o_proj, squared
    L2 norm over the hidden axis)."""
    tokens, segment_ids = batch["tokens"], batch.get("segment_ids")
    collect = ("attention_output",)
    student = distillation.student_forward(params, tokens, None, collect, segment_ids)
    teacher = distillation.teacher_forward(teacher_params, tokens, collect, segment_ids)
    kl = distillation.loop_kl(params, teacher_params, student.loop_hidden, teacher.loop_hidden)
    loop_kd = weighted_mean(kl, token_weights(batch))  # [T]
    kd = jnp.mean(loop_kd)
    difference = student.intermediates["attention_output"].astype(jnp.float32) - jax.lax.stop_gradient(
        teacher.intermediates["attention_output"].astype(jnp.float32)
    )  # [T, L, B, S, H]
    alignment = jnp.mean(jnp.sum(jnp.square(difference), axis=-1))
    loss = kd + beta * alignment
    return loss, {"loss": loss, "kd": kd, "loop_kd": loop_kd, "alignment": alignment}


def linear_alpha(step: Array, phase1_steps: int) -> Array:
    """Phase-1 interpolation weight at a step: 0 at the first step, rising linearly to 1 at the last."""
    return jnp.clip(jnp.asarray(step, jnp.float32) / max(phase1_steps - 1, 1), 0.0, 1.0)
