"""AdamW with warmup + cosine or constant schedules, gradient clipping, and separate learning rates
for the LoopLM weights and MELT's new gate parameters (optax.multi_transform)."""

from __future__ import annotations

import dataclasses

import jax
import optax

from melt_jax.model.param_table import EXIT_GATE, KV_GATE, param_spec, path_of

TRAINABLE = ("all", "exit_gate")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """learning_rate: the LoopLM weights; gate_learning_rate: MELT's kv_gate params (paper: 8e-6 and
    5e-4 when distilling Ouro-1.4B). schedule: "cosine" (to min_lr_ratio * peak) or "constant", both
    after a linear warmup. AdamW as in the Ouro paper: betas (0.9, 0.95), weight decay 0.1 (not on norm
    scales and biases), global-norm clipping 1.0."""

    learning_rate: float = 1e-3
    gate_learning_rate: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


def learning_rate_schedule(config: OptimizerConfig, peak: float, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then constant or cosine decay to the end."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=config.min_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def param_groups(params, trainable: str = "all"):
    """Per param, by its role in the parameter table: "gate" (MELT's KV gate), "loop_lm" (everything
    else) or "frozen". With trainable "exit_gate" (LoopLM Stage II) only the exit gate trains."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")

    def group(key_path, _):
        role = param_spec(path_of(key_path)).role
        if trainable == "exit_gate":
            return "loop_lm" if role == EXIT_GATE else "frozen"
        return "gate" if role == KV_GATE else "loop_lm"

    return jax.tree_util.tree_map_with_path(group, params)


def _decay_mask(params):
    """Per param: whether AdamW's weight decay applies (the `decay` of its row of the parameter table)."""
    return jax.tree_util.tree_map_with_path(lambda key_path, _: param_spec(path_of(key_path)).decay, params)


def build_optimizer(config: OptimizerConfig, params, total_steps: int, trainable: str = "all"):
    """The optimizer for `params` (arrays or shapes): clip, then AdamW per group."""

    def adamw(peak):
        return optax.adamw(
            learning_rate_schedule(config, peak, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )

    transforms = {
        "loop_lm": adamw(config.learning_rate),
        "gate": adamw(config.gate_learning_rate),
        "frozen": optax.set_to_zero(),
    }
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.multi_transform(transforms, param_groups(params, trainable)),
    )
