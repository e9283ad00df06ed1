"""Where a run's metrics go: `metrics.jsonl` (one JSON record a line, always) and TensorBoard event
files under `tensorboard/` when the `tensorboardX` package is installed (`pip install melt-jax[tensorboard]`).

A record is {"step": N, name: value, ...}; values are numbers, lists of numbers (per-loop values,
written to TensorBoard as name/loop_1, name/loop_2, ...) or nested records (the evaluation, written
as eval/name). Only the main process writes. A run resumed at step N keeps the records up to N: the
later ones (written after its checkpoint by the interrupted run, and written again now) are dropped
from metrics.jsonl, and TensorBoard is told to purge them (`purge_step`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def tensorboard_available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The record's numbers as flat TensorBoard tags (the step left out)."""
    out: dict[str, float] = {}
    for name, value in record.items():
        if name == "step" and not prefix:
            continue
        tag = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(scalars(value, prefix=f"{tag}/"))
        elif isinstance(value, (list, tuple)):
            out.update({f"{tag}/loop_{i}": float(v) for i, v in enumerate(value)})  # loop 0 first
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def keep_records_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """The records of the metrics.jsonl at `path` with a step <= `step` (a line cut short by a killed
    process is dropped too); the file is rewritten, through a temporary file, when any is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    kept, records = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
            records.append(record)
    if len(kept) != len(lines):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)
    return records


class MetricsLog:
    """Appends records to `run_dir`/metrics.jsonl and, if asked and installed, to TensorBoard, after
    dropping the records past `start_step` (the step the run starts or resumes at). Does nothing on
    processes other than the main one (`enabled=False`). `evaluated_steps`: the steps with an
    evaluation record."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool,
        log: Callable[[str], None] = print,
        start_step: int = 0,
    ):
        self.run_dir = Path(run_dir)
        self.evaluated_steps: set[int] = set()
        self.jsonl = None
        if enabled:
            kept = keep_records_up_to(self.run_dir / "metrics.jsonl", start_step)
            self.evaluated_steps = {r["step"] for r in kept if "eval" in r}
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.writer = None
        if enabled and tensorboard:
            if tensorboard_available():
                from tensorboardX import SummaryWriter

                logdir = str(self.run_dir / "tensorboard")
                self.writer = SummaryWriter(logdir=logdir, purge_step=start_step + 1)
            else:
                log("tensorboardX is not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if "eval" in record:
            self.evaluated_steps.add(record["step"])
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, global_step=record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
