"""Evaluation of Ouro and MELT: every loop's next-token loss and teacher-forced answer accuracy.

The functions taking `(model, params, tokens, ...)` are pure and jit-able with `model` (and any policy
or chunk size) static; the trainer calls them inside its own jitted evaluation step. `evaluate_dataset`
is the host-level loop over batches.

The teacher-forced forward is the model's own `scoring_forward`: for Ouro one forward over the whole
sequence (equal to cached decoding), for MELT the chunked values of inference, chunks of `chunk_size`
tokens (default config.chunk_size) from position 0; chunk_size=1 is exactly what token-by-token
decoding computes.

Masks: `loss_mask[b, s]` (and `answer_mask`) weigh the *prediction of* tokens[b, s], which is made from
the logits at position s - 1; position 0 has no prediction and its mask entry is ignored.

One definition of each metric for melt-eval and the training program's held-out evaluation
(`LossSums.report`): "loss_per_loop" [T] lists loops from 0 (the first pass) to T-1 (the last; `--exit
loop:N` counts the same way); "tokens_scored" names the tokens a loss is over: "answer" (the answer
tokens of prompt + answer rows, one example per row: the synthetic task) or "all" (every token of packed
text but the first of each document). Perplexity, exp(loss), is reported over "all" tokens of text only:
over a synthetic task's answers (one or two tokens an example) it says nothing the loss does not, and
over its prompts (random digits) nothing at all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.errors import DataError
from melt_jax.model.exit import ExitPolicy, select_hidden
from melt_jax.model.losses import target_log_probs

Array = jax.Array

# The token sets a loss is reported over (LossSums.report's tokens_scored).
TOKEN_SETS = ("answer", "all")


@flax.struct.dataclass
class LossSums:
    """Weighted sums of next-token cross-entropy over a batch, to be added over batches.

    per_loop: [T] sum of w * CE of each loop's logits; policy: [] the same for the exit policy's
    logits; weight: [] sum of the weights w (the number of scored tokens for a 0/1 mask).
    """

    per_loop: Array
    policy: Array
    weight: Array

    def __add__(self, other: LossSums) -> LossSums:
        return jax.tree.map(jnp.add, self, other)

    def report(self, num_batches: int, tokens_scored: str = "all") -> dict:
        """The weighted means as melt-eval and the held-out evaluation report them: {"loss_per_loop"
        (loop 0 first), "loss" (the exit policy's), "tokens_scored" ("answer" or "all", see the module
        docstring), "num_tokens" (total weight), "num_batches"} and, over "all" tokens,
        "perplexity_per_loop" and "perplexity"."""
        if tokens_scored not in TOKEN_SETS:
            raise ValueError(f"tokens_scored must be one of {', '.join(TOKEN_SETS)}, got {tokens_scored!r}")
        weight = float(self.weight)
        per_loop = [float(x) / weight for x in np.asarray(self.per_loop)]
        loss = float(self.policy) / weight
        result = {"loss_per_loop": per_loop, "loss": loss, "tokens_scored": tokens_scored}
        if tokens_scored == "all":
            result.update(perplexity_per_loop=[perplexity(x) for x in per_loop], perplexity=perplexity(loss))
        return dict(result, num_tokens=weight, num_batches=num_batches)


def hidden_states(
    model: nn.Module, params, tokens: Array, chunk_size: int | None = None, segment_ids: Array | None = None
) -> tuple[Array, Array]:
    """Every loop's normed hidden state [T, B, S, H] and the exit distribution [B, S, T] of the model's
    teacher-forced forward on tokens [B, S] (`scoring_forward`: MELT chunked with `chunk_size`, default
    config.chunk_size; Ouro does not depend on it), each token attending only within its segment
    when segment ids [B, S] are given (packed documents)."""
    out = model.scoring_forward(params, tokens, chunk_size, segment_ids)
    return out.loop_hidden, out.exit_pdf


def loop_logits(model: nn.Module, params, tokens: Array, chunk_size: int | None = None) -> Array:
    """Every loop's logits [T, B, S, V] of a teacher-forced forward on tokens [B, S] (see the module
    docstring for MELT's chunking). Memory grows with T * V; `loss_sums` avoids it."""
    hidden, _ = hidden_states(model, params, tokens, chunk_size)
    return model.project_logits(params, hidden)


def _weighted_ce_sum(logits: Array, tokens: Array, weights: Array) -> Array:
    """sum_{b, s>=1} weights[b, s] * CE(logits[b, s-1], tokens[b, s]) in float32; logits [B, S, V]."""
    return -jnp.sum(target_log_probs(logits[:, :-1], tokens[:, 1:]) * weights[:, 1:])


def answer_matches(logits: Array, tokens: Array, answer_mask: Array) -> Array:
    """Teacher-forced exact match per row, bool [B]: argmax(logits[b, s-1]) == tokens[b, s] at every s
    where answer_mask [B, S] > 0 (rows with an empty mask match). logits [B, S, V] or [B, S-1, V]."""
    predicted = jnp.argmax(logits[:, : tokens.shape[1] - 1], axis=-1)  # [B, S-1]
    correct = (predicted == tokens[:, 1:]) | (answer_mask[:, 1:] <= 0)  # [B, S-1]
    return jnp.all(correct, axis=1)


def teacher_forced_exact_match(logits: Array, batch: Mapping[str, Array | np.ndarray]) -> Array:
    """Per example, 1.0 if argmax(logits[b, s-1]) == tokens[b, s] at every s where answer_mask is 1,
    else 0.0: float32 [B]. logits [B, S, V]; batch as made by `synthetic.answer_batch`."""
    tokens = jnp.asarray(batch["tokens"])  # [B, S]
    mask = jnp.asarray(batch["answer_mask"])  # [B, S]
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise DataError(
            f"logits of shape {logits.shape} do not match tokens of shape {tokens.shape} (expected [B, S, V])"
        )
    return answer_matches(logits, tokens, mask).astype(jnp.float32)


def loss_sums(
    model: nn.Module,
    params,
    tokens: Array,
    loss_mask: Array,
    exit_policy: ExitPolicy = ExitPolicy(),
    chunk_size: int | None = None,
    segment_ids: Array | None = None,
) -> LossSums:
    """Weighted next-token CE sums of every loop and of `exit_policy`'s logits, on tokens [B, S]
    with loss_mask [B, S] (weight of the prediction of each token) and, for packed documents, their
    segment ids [B, S]. Loops are projected one at a time (a scan over T), so no [T, B, S, V] tensor
    is built."""
    hidden, exit_pdf = hidden_states(model, params, tokens, chunk_size, segment_ids)  # [T, B, S, H], [B, S, T]
    return _loss_sums_of(model, params, hidden, exit_pdf, tokens, loss_mask, exit_policy)


def _loss_sums_of(
    model, params, hidden: Array, exit_pdf: Array, tokens: Array, loss_mask: Array, exit_policy
) -> LossSums:
    """`loss_sums` from the forward's hidden states [T, B, S, H] and exit distribution [B, S, T]."""
    weights = loss_mask.astype(jnp.float32)  # [B, S]

    def loop_loss(_, h):  # h [B, S, H]
        return None, _weighted_ce_sum(model.project_logits(params, h), tokens, weights)

    _, per_loop = jax.lax.scan(loop_loss, None, hidden)  # [T]
    loop = exit_policy.fixed_loop(hidden.shape[0])
    if loop is not None:  # one loop for every token: its sum is already there
        exit_policy.validate(hidden.shape[0])
        policy = per_loop[loop]
    else:
        chosen, _ = select_hidden(hidden, exit_pdf, exit_policy)  # [B, S, H]
        policy = _weighted_ce_sum(model.project_logits(params, chosen), tokens, weights)
    return LossSums(per_loop=per_loop, policy=policy, weight=jnp.sum(weights[:, 1:]))


def per_loop_losses(model: nn.Module, params, tokens: Array, loss_mask: Array, chunk_size: int | None = None) -> Array:
    """Mean next-token cross-entropy of each loop's logits [T] over the tokens weighted by
    loss_mask [B, S] (the weighted mean; 0 when the mask is empty)."""
    sums = loss_sums(model, params, tokens, loss_mask, ExitPolicy.last(), chunk_size)
    return sums.per_loop / jnp.maximum(sums.weight, 1e-9)


def answer_accuracy(
    model: nn.Module,
    params,
    tokens: Array,
    answer_mask: Array,
    exit_policy: ExitPolicy = ExitPolicy(),
    chunk_size: int | None = None,
) -> Array:
    """Teacher-forced exact match per row, bool [B]: every token of tokens [B, S] where answer_mask > 0
    is the argmax of the logits (chosen by `exit_policy`, default the last loop) at the position
    before it. This is exactly whether greedy decoding after the prompt reproduces the answer. Rows
    with an empty mask count as correct."""
    hidden, exit_pdf = hidden_states(model, params, tokens, chunk_size)
    return _policy_matches(model, params, hidden, exit_pdf, tokens, answer_mask, exit_policy)


def _policy_matches(
    model, params, hidden: Array, exit_pdf: Array, tokens: Array, answer_mask: Array, exit_policy
) -> Array:
    """`answer_accuracy` from the forward's hidden states [T, B, S, H] and exit distribution."""
    chosen, _ = select_hidden(hidden, exit_pdf, exit_policy)  # [B, S, H]
    return answer_matches(model.project_logits(params, chosen[:, :-1]), tokens, answer_mask)


def loop_answer_matches(
    model: nn.Module, params, tokens: Array, answer_mask: Array, chunk_size: int | None = None
) -> Array:
    """`answer_accuracy` of every loop's logits: bool [T, B] (loops projected one at a time)."""
    hidden, _ = hidden_states(model, params, tokens, chunk_size)  # [T, B, S, H]
    return _loop_matches(model, params, hidden, tokens, answer_mask)


def _loop_matches(model, params, hidden: Array, tokens: Array, answer_mask: Array) -> Array:
    """`loop_answer_matches` from the forward's hidden states [T, B, S, H]: bool [T, B]."""
    return jax.lax.map(lambda h: answer_matches(model.project_logits(params, h[:, :-1]), tokens, answer_mask), hidden)


def answer_sums(
    model: nn.Module, params, tokens: Array, answer_mask: Array, chunk_size: int | None = None
) -> tuple[LossSums, Array]:
    """From one forward on prompt + answer rows tokens [B, S]: the LossSums over the answer tokens
    (answer_mask [B, S]; the last loop as the exit) and every loop's exact match, bool [T, B]."""
    hidden, exit_pdf = hidden_states(model, params, tokens, chunk_size)
    sums = _loss_sums_of(model, params, hidden, exit_pdf, tokens, answer_mask, ExitPolicy.last())
    return sums, _loop_matches(model, params, hidden, tokens, answer_mask)


def token_log_probs(
    model: nn.Module,
    params,
    tokens: Array,
    exit_policy: ExitPolicy = ExitPolicy(),
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    """For each next token of tokens [B, S]: its log-probability under the logits chosen by
    `exit_policy` at the position before it, float32 [B, S-1], and whether it is their argmax,
    bool [B, S-1] (what lm-evaluation-harness's loglikelihood needs)."""
    hidden, exit_pdf = hidden_states(model, params, tokens, chunk_size)
    chosen, _ = select_hidden(hidden, exit_pdf, exit_policy)  # [B, S, H]
    logits = model.project_logits(params, chosen[:, :-1])  # [B, S-1, V]
    return target_log_probs(logits, tokens[:, 1:]), jnp.argmax(logits, axis=-1) == tokens[:, 1:]


# --------------------------------------------------------------------------------------------------
# Host-level loop over a dataset


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "chunk_size"))
def _batch_metrics(model, params, tokens, loss_mask, answer_mask, row_mask, exit_policy, chunk_size, segment_ids):
    """LossSums of a batch and, with an answer mask (else None), its (exact matches, rows) counted
    over row_mask [B]: one forward for both, each token attending within its segment where
    segment_ids [B, S] are given (else None)."""
    hidden, exit_pdf = hidden_states(model, params, tokens, chunk_size, segment_ids)
    sums = _loss_sums_of(model, params, hidden, exit_pdf, tokens, loss_mask, exit_policy)
    if answer_mask is None:
        return sums, None
    correct = _policy_matches(model, params, hidden, exit_pdf, tokens, answer_mask, exit_policy)  # [B]
    per_loop = _loop_matches(model, params, hidden, tokens, answer_mask)  # [T, B]
    return sums, (jnp.sum(correct & row_mask), jnp.sum(row_mask), jnp.sum(per_loop & row_mask, axis=1))


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


def _check_batch(batch: Mapping[str, np.ndarray], vocab_size: int) -> None:
    tokens = np.asarray(batch["tokens"])
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"evaluation batch 'tokens' must be [batch, length >= 2], got shape {tokens.shape}")
    for name in ("loss_mask", "answer_mask"):
        if name in batch and np.shape(batch[name]) != tokens.shape:
            raise ValueError(f"evaluation batch {name!r} has shape {np.shape(batch[name])}, tokens {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise ValueError(f"evaluation batch has token ids {bad[:5].tolist()} outside the vocabulary [0, {vocab_size})")


def evaluate_dataset(
    model: nn.Module,
    params,
    batches: Iterable[Mapping[str, np.ndarray]],
    exit_policy: ExitPolicy = ExitPolicy(),
    chunk_size: int | None = None,
    tokens_scored: str = "all",
) -> dict:
    """Per-loop loss, perplexity (over "all" tokens, see `LossSums.report`) and (where batches carry an
    answer mask) teacher-forced accuracy over `batches`, each a mapping with

        tokens       int [B, S]
        loss_mask    [B, S] weight of each token's prediction (default: every token after the first)
        answer_mask  [B, S] optional, 1 at answer tokens (see `answer_accuracy`)
        row_mask     [B] optional, 0 for padding rows that must not count as examples
        segment_ids  int [B, S] optional, packed documents: each token attends only within its
                     segment (as a model trained with isolated documents saw them)

    `tokens_scored` names the tokens the loss masks select ("answer" or "all"). Returns
    `LossSums.report`'s keys and, with answer masks, "accuracy" (the exit policy's), "accuracy_per_loop"
    (loop 0 first) and "num_examples". Losses are weighted means over the scored tokens of all batches.
    """
    total: LossSums | None = None
    correct = examples = 0
    correct_per_loop = 0
    num_batches = 0
    for batch in batches:
        _check_batch(batch, model.config.vocab_size)
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        loss_mask = batch.get("loss_mask")
        if loss_mask is None:
            loss_mask = np.ones(tokens.shape, np.float32)
        answer_mask = jnp.asarray(batch["answer_mask"]) if "answer_mask" in batch else None
        row_mask = jnp.asarray(batch.get("row_mask", np.ones(tokens.shape[0], bool)), bool)
        segment_ids = jnp.asarray(batch["segment_ids"], jnp.int32) if "segment_ids" in batch else None
        sums, counts = _batch_metrics(
            model,
            params,
            tokens,
            jnp.asarray(loss_mask, jnp.float32),
            answer_mask,
            row_mask,
            exit_policy,
            chunk_size,
            segment_ids,
        )
        total = sums if total is None else total + sums
        if counts is not None:
            correct, examples = correct + int(counts[0]), examples + int(counts[1])
            correct_per_loop = correct_per_loop + np.asarray(counts[2])
        num_batches += 1
    if total is None:
        raise ValueError("evaluate_dataset got no batches")
    if float(total.weight) <= 0:
        raise ValueError("evaluate_dataset: the loss masks of all batches are empty; nothing to score")
    result = total.report(num_batches, tokens_scored)
    if examples:
        result["accuracy"] = correct / examples
        result["accuracy_per_loop"] = [float(c) / examples for c in correct_per_loop]
        result["num_examples"] = examples
    return result
