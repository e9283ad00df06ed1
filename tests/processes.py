"""Training processes the tests run and interrupt: a `melt-train stage` subprocess killed with SIGKILL
once it has committed a checkpoint at a given step."""

import os
import signal
import subprocess
import sys
import time


def finished_checkpoint_steps(directory) -> list[int]:
    """Steps of the committed checkpoints (orbax writes into a temporary folder, then renames it)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def kill_after_checkpoint(fields: list[str], checkpoints, step: int, timeout_s: float = 300) -> subprocess.Popen:
    """Runs `melt-train stage *fields steps=100000` on the CPU until a checkpoint at `step` or later is
    committed under `checkpoints`, then SIGKILLs it (mid-run, typically while it saves the next one).
    Returns the finished process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "melt_jax.train", "stage", *fields, "steps=100000"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not (steps := finished_checkpoint_steps(checkpoints)) or steps[-1] < step:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, f"no checkpoint at step {step} within {timeout_s:.0f} s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    return proc
