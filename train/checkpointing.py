"""Training checkpoints with orbax's CheckpointManager.

A run directory holds `checkpoints/<step>/` with two items: `state` (the TrainState: step, params,
optimizer state, RNG; saved from the sharded arrays, restored onto the shardings of the current mesh,
which may differ from the saving run's) and `meta` (JSON: data-iterator position, stage, alpha, tokens
seen). Saves are asynchronous and committed atomically by orbax, so a run killed at any moment leaves
only complete checkpoints behind; the last `keep` are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from melt_jax.errors import TrainingError


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of the arrays in `tree` (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class RunCheckpoints:
    """The checkpoints of one run: save(step, state, meta), latest_step(), restore(step, target)."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """The state saved at `step`, laid out like `target_state` (arrays or ShapeDtypeStructs with
        shardings), and its meta dict."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_like(target_state)), meta=ocp.args.JsonRestore()
                ),
            )
        except ValueError as e:  # orbax: the saved tree differs from the target's
            raise TrainingError(
                f"the checkpoint at step {step} in {self.directory} does not hold this run's training state "
                f"(another model, optimizer or state layout; use a new output_dir): {str(e).splitlines()[0]}"
            ) from None
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until the asynchronous saves in flight are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
