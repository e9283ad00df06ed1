"""Stopping a stage on SIGINT (Ctrl-C) or SIGTERM (a preempted VM, a job scheduler): the training
loop finishes its step, saves a checkpoint there and raises StageInterrupted, which the command line
reports in one line with exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A
second signal while it saves acts as it would without this (Ctrl-C raises KeyboardInterrupt at once).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StageInterrupted(Exception):  # noqa: N818 - it is what happened, not an error in the input
    """The stage stopped on a signal after saving its checkpoint at `step` in `checkpoint_dir`."""

    def __init__(self, signum: int, stage: str, step: int, checkpoint_dir: Path):
        self.signum, self.stage, self.step, self.checkpoint_dir = signum, stage, step, checkpoint_dir
        name = signal.Signals(signum).name
        super().__init__(
            f"[{stage}] stopped by {name} at step {step}; checkpoint saved in {checkpoint_dir}: "
            "rerun the same command to resume"
        )

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM set `received` instead of stopping the
    process; the first one puts the previous handlers back."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def stop_requested(self, step: int, every: int) -> bool:
        """Whether the loop stops after `step`. Several processes agree on it every `every` steps (one
        gather of a flag), so that all of them save the same step."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        self.received = int(np.max(flags)) or None
        return self.received is not None
