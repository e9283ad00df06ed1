"""Wall time and peak host memory of the training program's whole pipeline on its embedded default
(teacher LoopLM from scratch, MELT phase 1, MELT phase 2, the teacher/student comparison).

    python benchmarks/pipeline_cost.py [--tail 30] [field=value ...]

Runs, in a subprocess, in a fresh temporary output directory (removed afterwards):

    python -m melt_jax.train pipeline output_dir=<tmp> train.progress=false [field=value ...]

(`melt-train pipeline`; extra `field=value` arguments are passed through as pipeline overrides,
e.g. teacher_steps=100.) Measured:

  wall time    from starting the subprocess to its exit (Python start-up, imports, compilation of
               every stage's steps, training, evaluation, checkpoints and the summary)
  peak RSS     resource.getrusage(RUSAGE_CHILDREN).ru_maxrss of the pipeline process: its largest
               resident set (KiB on Linux), the pipeline runs all stages in that one process
  CPU time     user + system seconds of the subprocess (its CPU time / wall time is how many cores
               it kept busy on average)
  output size  bytes the run wrote to its output directory (checkpoints, models, metrics)

Printed: the command, these figures, the tail of the pipeline's own output (its per-stage lines and
its summary table: accuracy, per-loop loss, KV cache bytes per token of teacher and student), and the
machine's load during the run (benchmarks/machine_load.py): on a shared machine the wall time carries
the noise of other work. The pipeline exits 1 when the student's accuracy is not within its margin
and 2 on a bad config; this script reports the exit status and exits with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_load import busy_report, cpu_times, machine_line


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tail", type=int, default=30, help="lines of the pipeline's output to print")
    parser.add_argument("overrides", nargs="*", help="pipeline overrides field=value, passed through")
    args = parser.parse_args()

    times_at_start = cpu_times()
    print("## Cost of the training pipeline on its embedded default\n")
    print(f"{machine_line()}; python {platform.python_version()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    with tempfile.TemporaryDirectory(prefix="melt_pipeline_") as tmp:
        command = [
            sys.executable,
            "-m",
            "melt_jax.train",
            "pipeline",
            f"output_dir={tmp}",
            "train.progress=false",
            *args.overrides,
        ]
        print(f"command: {' '.join(command)}\n", flush=True)
        start = time.perf_counter()
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        wall_s = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        output_bytes = directory_bytes(Path(tmp))

    lines = child.stdout.rstrip("\n").splitlines()
    print(f"--- last {min(args.tail, len(lines))} lines of the pipeline's output ---")
    print("\n".join(lines[-args.tail :]))
    if child.returncode != 0:
        print("--- its stderr (last 20 lines) ---")
        print("\n".join(child.stderr.rstrip("\n").splitlines()[-20:]))
    print("---\n")

    cpu_s = usage.ru_utime + usage.ru_stime
    status = {
        0: "0 (student within the accuracy margin)",
        1: "1 (student NOT within the accuracy margin)",
        2: "2 (bad config or input)",
    }.get(child.returncode, str(child.returncode))
    print("| pipeline | wall time (s) | peak RSS (GB) | CPU time (s) | cores busy | output (MB) | exit status |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(
        f"| {' '.join(args.overrides) or 'embedded default'} | {wall_s:.0f} | {usage.ru_maxrss * 1024 / 1e9:.2f} | "
        f"{cpu_s:.0f} | {cpu_s / wall_s:.2f} | {output_bytes / 1e6:.1f} | {status} |"
    )
    print(f"\npeak RSS = getrusage(RUSAGE_CHILDREN).ru_maxrss = {usage.ru_maxrss:,} KiB")
    print(f"\n{busy_report(times_at_start)}")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
