"""The settings a run directory was trained with, and the check that a rerun into it uses them.

A stage writes its TrainConfig to `run_config.json`, the pipeline its PipelineConfig to
`pipeline_config.json`. A rerun into a directory that already holds training compares its settings
with the recorded ones, field by field (dotted names, as on the command line):
  - fields that change how a run goes but not what it computes (FREE: logging, progress, checkpoint
    cadence, mesh, remat, attention kernel, output_dir) are never compared;
  - fields that a run can continue under (CHANGEABLE: step counts, schedules, learning rates,
    evaluation, loss weights) stop the rerun unless it is given `accept_changes`; the record is then
    rewritten and the change appended to `settings_changes.jsonl`;
  - every other field (the model, its data and their order, the seed, the stage's inputs) cannot
    change within a run: the rerun stops and asks for another output_dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from melt_jax.train.config import RunConfigError

FREE = (
    "output_dir",
    "progress",
    "tensorboard",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpoints",
    "profile_steps",
    "remat",
    "attention",
    "mesh",
    "accuracy_margin",
    "loss_margin",
)
CHANGEABLE = (
    "steps",
    "decay_steps",
    "decay_at_accuracy",
    "stop_at_accuracy",
    "stop_at_loss",
    "eval_every",
    "eval_batches",
    "beta",
    "align_beta",
    "interpolate",
    "forward",
    "optimizer",
    "data.eval_examples",
    # the pipeline's own fields
    "teacher_steps",
    "teacher_warmup_steps",
    "teacher_eval_every",
    "teacher_decay_at_accuracy",
    "teacher_decay_steps",
    "phase1_steps",
    "phase2_steps",
    "teacher_learning_rate",
    "student_learning_rate",
    "gate_learning_rate",
    "student_decay_steps",
)
PATHS = ("init_from", "teacher")  # compared as the directories they name
CHANGES = "settings_changes.jsonl"


def _matches(name: str, fields: tuple[str, ...]) -> bool:
    """Whether the dotted `name` is one of `fields` or inside one (a section), the pipeline's
    `train.` prefix left out."""
    name = name.removeprefix("train.")
    return any(name == f or name.startswith(f + ".") for f in fields)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if _matches(name, PATHS) and old is not None and new is not None:
        return Path(old).resolve() == Path(new).resolve()
    return False


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (old, new)} of the compared fields whose values differ."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    names = [n for n in dict.fromkeys([*flat_old, *flat_new]) if not _matches(n, FREE)]
    return {n: (flat_old.get(n), flat_new.get(n)) for n in names if not _same(n, flat_old.get(n), flat_new.get(n))}


def holds_training(run_dir: Path) -> bool:
    """Whether a stage's directory holds a checkpoint or a final model."""
    checkpoints = run_dir / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    return saved or (run_dir / "model" / "config.json").exists()


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name} {json.dumps(old)} -> {json.dumps(new)}" for name, (old, new) in changes.items())


def check_rerun(
    record: Path, values: dict[str, Any], trained: bool, accept_changes: bool
) -> dict[str, tuple[Any, Any]]:
    """The changed fields of a rerun whose settings are `values` against the `record` file, when the
    directory holds training (`trained`); {} for a new run. RunConfigError naming every changed field
    (old -> new) unless they are all CHANGEABLE and `accept_changes` is set."""
    if not (trained and record.exists()):
        return {}
    changes = differences(json.loads(record.read_text()), values)
    if not changes:
        return {}
    fixed = [n for n in changes if not _matches(n, CHANGEABLE)]
    if fixed or not accept_changes:
        how = "give another output_dir to start a new run"
        if fixed:
            how += f" ({', '.join(fixed)} cannot change within a run)"
        else:
            how += ", or add --accept-changes to continue this one with the new settings"
        raise RunConfigError(f"{record.parent} was trained with other settings: {_describe(changes)}; {how}")
    return changes


def write_record(record: Path, values: dict[str, Any], changes: dict[str, tuple[Any, Any]], **where: Any) -> None:
    """Writes the settings to `record` (through a temporary file) and appends accepted `changes`, with
    `where` (e.g. the step they apply from), to settings_changes.jsonl beside it."""
    temporary = record.with_name(record.name + ".tmp")
    temporary.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(temporary, record)
    if changes:
        entry = {**where, "changes": {name: {"old": old, "new": new} for name, (old, new) in changes.items()}}
        with open(record.parent / CHANGES, "a") as log:
            log.write(json.dumps(entry) + "\n")


def describe_accepted(changes: dict[str, tuple[Any, Any]]) -> str:
    return f"continuing with changed settings: {_describe(changes)}"
