"""Ouro's exit distribution over loops and the choice of which loop's output a token returns.

By default all T loops are computed and an exit policy only selects among their outputs. A policy
with `skip_loops` (kinds 'loop' and 'threshold') also stops computing: over a KV cache, the loops
after every token's exit loop are not run (melt_jax/model/ouro.py, `OuroModel.run_loops_skipping`;
docs/melt.md, 'Early exit that skips loops').
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from melt_jax.errors import GenerationError
from melt_jax.model.config import OuroConfig

Array = jax.Array


def round_to(x: Array, dtype) -> Array:
    """x (float32 or wider) rounded to the precision of `dtype`, kept in x's dtype.

    XLA may keep reduced-precision intermediates in float32 ("excess precision"); reduce_precision
    forces the rounding that eager PyTorch does after every op in bf16/fp16.
    """
    info = jnp.finfo(dtype)
    if info.bits >= jnp.finfo(x.dtype).bits:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def exit_distribution(gate_logits: Array) -> Array:
    """Exit probabilities p_t from per-loop gate logits [T, B, S]; returns [B, S, T].

    lambda_t = sigmoid(gate_logit_t); p_t = lambda_t * prod_{j<t}(1 - lambda_j) for t < T-1 and the
    last loop takes the remaining mass. Computed as upstream does: loop by loop in the dtype of
    `gate_logits`, every op rounded to that dtype (so bf16 results match eager PyTorch).
    """
    dtype = gate_logits.dtype
    num_loops = gate_logits.shape[0]
    compute = jnp.promote_types(dtype, jnp.float32)
    rounded = lambda x: round_to(x, dtype)  # noqa: E731
    lambdas = rounded(jax.nn.sigmoid(gate_logits.astype(compute)))  # [T, B, S]
    remaining = jnp.ones_like(lambdas[0])
    probs = []
    for t in range(num_loops):  # T is small and static
        if t < num_loops - 1:
            probs.append(rounded(lambdas[t] * remaining))
            remaining = rounded(remaining * rounded(1 - lambdas[t]))
        else:
            probs.append(remaining)
    return jnp.stack(probs, axis=-1).astype(dtype)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """s = fl(a + b) and the exact rounding error e, so that a + b == s + e exactly."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def cumulative_exit_probs(exit_pdf: Array) -> Array:
    """cumsum(p) over loops, [B, S, T], rounded the way PyTorch's CPU cumsum rounds it upstream.

    torch.cumsum accumulates in a wider type (float32 for bf16/fp16 inputs, float64 for float32) and
    rounds each partial sum to the input dtype. Reduced-precision inputs are therefore summed in
    float32; float32 inputs in float64 when x64 is enabled, else in double-float32 (an exact running
    sum hi + lo, good to ~2^-48), rounded once per output.
    """
    dtype = exit_pdf.dtype
    num_loops = exit_pdf.shape[-1]
    outputs = []
    if jnp.dtype(dtype).itemsize < 4 or jax.config.jax_enable_x64:
        wide = jnp.float32 if jnp.dtype(dtype).itemsize < 4 else jnp.float64
        total = jnp.zeros(exit_pdf.shape[:-1], wide)
        for t in range(num_loops):  # T is small and static
            total = total + exit_pdf[..., t].astype(wide)
            outputs.append(round_to(total, dtype).astype(dtype))
    else:
        hi = jnp.zeros(exit_pdf.shape[:-1], dtype)
        lo = jnp.zeros_like(hi)
        for t in range(num_loops):
            s, e = _two_sum(hi, exit_pdf[..., t])
            lo = lo + e
            hi = s + lo  # the running sum rounded to the model dtype
            lo = lo - (hi - s)
            outputs.append(hi)
    return jnp.stack(outputs, axis=-1)


def threshold_exit_loops(exit_pdf: Array, threshold: float) -> Array:
    """Per token, the first loop t with cumsum(p)_t >= `threshold`, else the last loop.
    exit_pdf [B, S, T] -> int32 [B, S].

    The comparison is made in the model dtype on upstream's rounding of the cumulative sum (see
    `cumulative_exit_probs`), so threshold 1.0 stops a token before the last loop exactly when
    upstream does.
    """
    num_loops = exit_pdf.shape[-1]
    cumulative = cumulative_exit_probs(exit_pdf).astype(jnp.float32)  # exact: already rounded
    threshold = jnp.asarray(threshold, exit_pdf.dtype).astype(jnp.float32)
    reached = cumulative >= threshold  # [B, S, T]
    first = jnp.argmax(reached, axis=-1).astype(jnp.int32)
    return jnp.where(reached.any(axis=-1), first, num_loops - 1)


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """Which loop's output each token returns.

    kind:
      'last'      the last loop (T-1);
      'loop'      loop `loop` for every token (0-based);
      'threshold' per token, the first loop whose cumulative exit probability >= `threshold`;
      'weighted'  sum_t p_t * output_t (the mixture used by Ouro's training loss).

    skip_loops: the loops after a token's exit loop are not computed ('loop' and 'threshold' only;
    needs a KV cache). The token returns the same loop's output; what later tokens attend to in
    place of its skipped loops' keys and values is the exit loop's rows (see `OuroModel.run_loops_skipping`).
    """

    kind: Literal["last", "loop", "threshold", "weighted"] = "last"
    loop: int | None = None
    threshold: float | None = None
    skip_loops: bool = False

    def __post_init__(self):
        if self.kind not in ("last", "loop", "threshold", "weighted"):
            raise ValueError(f"unknown exit policy kind {self.kind!r}")
        if self.kind == "loop" and (self.loop is None or self.loop < 0):
            raise ValueError(f"exit policy 'loop' needs a loop index >= 0, got {self.loop!r}")
        if self.kind == "threshold" and self.threshold is None:
            raise ValueError("exit policy 'threshold' needs a threshold")
        if self.skip_loops and self.kind not in ("loop", "threshold"):
            raise ValueError(
                f"exit policy {self.kind!r} cannot skip loops: only 'loop' and 'threshold' choose one loop"
            )

    @classmethod
    def last(cls) -> ExitPolicy:
        return cls("last")

    @classmethod
    def at_loop(cls, loop: int, skip_loops: bool = False) -> ExitPolicy:
        return cls("loop", loop=loop, skip_loops=skip_loops)

    @classmethod
    def at_threshold(cls, threshold: float, skip_loops: bool = False) -> ExitPolicy:
        return cls("threshold", threshold=threshold, skip_loops=skip_loops)

    @classmethod
    def weighted(cls) -> ExitPolicy:
        return cls("weighted")

    @classmethod
    def upstream_default(cls, config: OuroConfig) -> ExitPolicy:
        """What upstream `OuroForCausalLM.forward` returns at inference without arguments:
        config.early_exit_step if set, else the threshold config.early_exit_threshold (1.0 in the
        released configs), else the last loop."""
        if config.early_exit_step is not None:
            return cls.at_loop(config.early_exit_step)
        if config.early_exit_threshold is not None:
            return cls.at_threshold(config.early_exit_threshold)
        return cls.last()

    @classmethod
    def parse(cls, text: str, config: OuroConfig, skip_loops: bool = False) -> ExitPolicy:
        """An exit policy from its text form (the command lines' --exit, the lm-eval adapter's exit):
        'last', 'loop:N' (0-based; 'step:N' is read the same), 'threshold:X', 'weighted', or 'default'
        (what upstream Ouro returns: config.early_exit_step / _threshold); with `skip_loops`, one that
        skips the loops after the exit ('loop:N', 'threshold:X' or a 'default' that is one of them).
        GenerationError names the text and the forms it may take."""
        name, _, value = text.partition(":")
        try:
            if name in ("last", "weighted") and not value:
                policy = cls(name)
            elif name == "default" and not value:
                policy = cls.upstream_default(config)
            elif name in ("loop", "step") and value:
                policy = cls.at_loop(int(value))
            elif name == "threshold" and value:
                policy = cls.at_threshold(float(value))
            else:
                raise ValueError("unknown form")
            policy.validate(config.num_loops)
            if skip_loops:
                policy = dataclasses.replace(policy, skip_loops=True)
        except ValueError as e:
            raise GenerationError(
                f"bad exit policy {text!r} ({e}); expected last, loop:N (0 <= N < {config.num_loops}), "
                "threshold:X, weighted or default"
            ) from None
        return policy

    def fixed_loop(self, num_loops: int) -> int | None:
        """The loop every token exits at ('last', 'loop'), or None when it depends on the token."""
        if self.kind == "last":
            return num_loops - 1
        if self.kind == "loop":
            return self.loop
        return None

    def validate(self, num_loops: int) -> None:
        if self.kind == "loop" and self.loop >= num_loops:
            raise ValueError(f"exit loop {self.loop} is out of range for {num_loops} loops")

    def exited(self, gate_logits: Array, loop_index: Array) -> Array:
        """bool [B, S]: the tokens whose exit loop is <= loop_index (traced), from the gate logits
        [T, B, S] of loops 0..loop_index (later entries are not read: a token's exit probability up to
        loop t depends on the gates up to t only). The last loop is every token's exit."""
        num_loops = gate_logits.shape[0]
        last = loop_index >= num_loops - 1
        if self.kind == "loop":
            return jnp.broadcast_to(last | (loop_index >= self.loop), gate_logits.shape[1:])
        if self.kind == "threshold":
            exit_loops = threshold_exit_loops(exit_distribution(gate_logits), self.threshold)  # [B, S]
            return last | (exit_loops <= loop_index)
        return jnp.broadcast_to(last, gate_logits.shape[1:])


def select_hidden(loop_hidden: Array, exit_pdf: Array, policy: ExitPolicy) -> tuple[Array, Array | None]:
    """The per-token hidden state chosen by `policy`, from every loop's normed hidden state.

    loop_hidden [T, B, S, H], exit_pdf [B, S, T] -> ([B, S, H], exit loops int32 [B, S] or None).
    The LM head is linear, so selecting (or mixing) hidden states and projecting once gives the same
    logits as projecting every loop and selecting (or mixing) logits, without a [T, B, S, V] tensor.
    """
    num_loops = loop_hidden.shape[0]
    policy.validate(num_loops)
    loop = policy.fixed_loop(num_loops)
    if loop is not None:
        return loop_hidden[loop], None
    if policy.kind == "weighted":
        weights = exit_pdf.astype(loop_hidden.dtype)
        return jnp.einsum("BST,TBSH->BSH", weights, loop_hidden), None
    loops = threshold_exit_loops(exit_pdf, policy.threshold)  # [B, S]
    chosen = jnp.take_along_axis(loop_hidden, loops[None, :, :, None], axis=0)[0]
    return chosen, loops
