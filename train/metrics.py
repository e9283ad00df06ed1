"""Where a run's metrics go: `metrics.jsonl` (one JSON record a line, always) and TensorBoard event
files under `tensorboard/` when the `tensorboardX` package is installed (`pip install melt-jax[tensorboard]`).

A record is {"step": N, name: value, ...}; values are numbers, lists of numbers (per-loop values,
written to TensorBoard as name/loop_1, name/loop_2, ...) or nested records (the evaluation, written
as eval/name). Only the main process writes.
"""

from __future__ import annotations

import json
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


class MetricsLog:
    """Appends records to `run_dir`/metrics.jsonl and, if asked and installed, to TensorBoard.
    Does nothing on processes other than the main one (`enabled=False`)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 (closed in close())
        self.writer = None
        if enabled and tensorboard:
            if tensorboard_available():
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(logdir=str(self.run_dir / "tensorboard"))
            else:
                log("tensorboardX is not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
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
