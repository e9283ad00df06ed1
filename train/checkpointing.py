"""Training checkpoints with orbax's CheckpointManager.

A run directory holds `checkpoints/<step>/` with two items: `state` (the TrainState: step, params,
optimizer state, RNG; saved from the sharded arrays, restored onto the shardings of the current mesh,
which may differ from the saving run's) and `meta` (JSON: the data loader's settings, stage,
alpha, tokens seen) and, when a data iterator is given, `data`: the grain iterator's position, one small
JSON file per process written by grain's checkpoint handler. Saves
are asynchronous and committed atomically by orbax, so a run killed at any moment leaves
only complete checkpoints behind; the last `keep` are kept. A checkpoint whose files were damaged
afterwards (a truncated or missing file) is moved aside by `restore_latest`, which resumes from the
newest intact one.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from melt_jax.errors import TrainingError

DAMAGED = "damaged_checkpoints"  # beside checkpoints/: where damaged checkpoints are moved


class DamagedCheckpoint(TrainingError):
    """A checkpoint whose files cannot be read back (truncated, missing or corrupt)."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of the arrays in `tree` (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class RunCheckpoints:
    """The checkpoints of one run: save(step, state, meta), latest_step(), restore(step, target)."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True, data_iterator: Any = None):
        """`data_iterator`: a grain iterator whose position is saved in (and restored from) the
        checkpoints' `data` item; None to read only the state and meta (or only the steps saved)."""
        self.directory = Path(directory).absolute()
        self.data_iterator = data_iterator
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        items = ("state", "meta") if data_iterator is None else ("state", "meta", "data")
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=items)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if self.data_iterator is not None:
            # The position now, not when a background thread gets to it: training moves the iterator on.
            items["data"] = grain.checkpoint.CheckpointSave(_Position(self.data_iterator.get_state()))
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """The state saved at `step`, laid out like `target_state` (arrays or ShapeDtypeStructs with
        shardings), and its meta dict; the data iterator, if any, is moved to its saved position."""
        items = {"state": ocp.args.StandardRestore(abstract_like(target_state)), "meta": ocp.args.JsonRestore()}
        saved_position = None
        if self.data_iterator is not None:
            saved_position = self._saved_by_other_processes(step)
            if saved_position is None:
                items["data"] = grain.checkpoint.CheckpointRestore(self.data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # orbax: the saved tree differs from the target's
            raise TrainingError(
                f"the checkpoint at step {step} in {self.directory} does not hold this run's training state "
                f"(another model, optimizer or state layout; use a new output_dir): {_first_line(e)}"
            ) from None
        except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise bare Exceptions for unreadable files
            _drop_pending_reads()
            raise DamagedCheckpoint(_first_line(e).split(". See full")[0][:160]) from None
        if saved_position is not None:
            self.data_iterator.set_state(saved_position)
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, target_state: Any, warn: Callable[[str], None]) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that reads back; None when there is none. Damaged
        checkpoints newer than it are moved to `damaged_checkpoints/` beside this directory (so that
        the run can save those steps again), each with a one-line warning; TrainingError when no
        checkpoint is intact (nothing is moved then)."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, target_state)
            except DamagedCheckpoint as e:
                damaged.append((step, str(e)))
                continue
            for bad, why in damaged:
                warn(f"warning: checkpoint at step {bad} is damaged ({why}); moved to {self._move_aside(bad)}")
            if damaged:
                multihost_utils.sync_global_devices("damaged checkpoints moved")
                self.manager.reload()
            return step, state, meta
        if damaged:
            listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise TrainingError(
                f"no intact checkpoint in {self.directory} ({listed}): move the damaged steps away to "
                "train this stage from scratch, or use a new output_dir"
            )
        return None

    def _saved_by_other_processes(self, step: int) -> dict | None:
        """The data position of the checkpoint of `step` when another number of processes saved it (None
        when it holds this process's file, which grain's handler reads). Each process's position counts
        the global batches drawn, the same on all of them, so any of the saved files gives it."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        folder = self.directory / str(step) / "data"
        saved = sorted(folder.glob("process_*.json")) if folder.is_dir() else []
        if not saved:
            raise DamagedCheckpoint(f"it holds no data loader position ({folder} is missing or empty)")
        if (folder / name).is_file():
            return None
        try:
            positions = [json.loads(p.read_text()) for p in saved]
        except (OSError, ValueError) as e:
            raise DamagedCheckpoint(f"unreadable data position in {folder}: {_first_line(e)}") from None
        if any(p != positions[0] for p in positions):
            raise TrainingError(
                f"the checkpoint at step {step} in {self.directory} holds different data positions in "
                f"{[p.name for p in saved]}: it cannot be resumed on {jax.process_count()} processes"
            )
        return positions[0]

    def _move_aside(self, step: int) -> Path:
        """Moves the checkpoint of `step` to damaged_checkpoints/<step> (a numbered name if taken)."""
        target = self.directory.parent / DAMAGED / str(step)
        suffix = 1
        while target.exists():
            target, suffix = target.with_name(f"{step}.{suffix}"), suffix + 1
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), target)
        return target

    def wait(self) -> None:
        """Blocks until the asynchronous saves in flight are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class _Position:
    """A grain iterator's state taken at one moment, in the form grain's checkpoint handler saves."""

    def __init__(self, state: dict):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=4).encode()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _drop_pending_reads() -> None:
    """Collects the reads a failed restore left behind; their "Exception ignored" reports would
    repeat the error, at whatever moment they are collected."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
