"""Spread of the training pipeline's result over seeds and XLA thread counts.

    python benchmarks/pipeline_spread.py [--seeds 0 1 2 3 4] [--threads 1 2] [--out DIR] [field=value ...]

Runs `python -m melt_jax.train pipeline output_dir=DIR/t{threads}_s{seed} train.seed={seed}
train.progress=false [field=value ...]` for every (seed, thread count), each in a subprocess pinned
with `taskset` to that many cores: XLA's CPU thread pool takes its size from the cores a process may
run on, and the thread count changes the order in which reductions add up, so the same seed trains
a slightly different model. Runs of one thread go side by side, one per core this process may use;
runs of more threads go one at a time. The train seed also draws the training data.

Printed: one row per run (teacher and student accuracy and per-loop accuracy, first-to-last-loop
gain, accuracy drop, wall time) and min / median / max of each figure, then whether every run meets
the embedded default's stated result (--min-teacher, --min-gain, --max-drop). Exits 1 when a run
fails or misses it. DIR keeps each run's output (summary.json, metrics) and spread.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def pipeline_command(out: Path, seed: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "melt_jax.train",
        "pipeline",
        f"output_dir={out}",
        f"train.seed={seed}",
        "train.progress=false",
        *overrides,
    ]


def start(cores: list[int], out: Path, seed: int, overrides: list[str]) -> subprocess.Popen:
    """The pipeline in a subprocess pinned to `cores`, its output in out/pipeline.log."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    with open(out / "pipeline.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["taskset", "-c", ",".join(map(str, cores)), *pipeline_command(out, seed, overrides)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def result_row(out: Path, threads: int, seed: int, returncode: int, seconds: float) -> dict:
    row = {"threads": threads, "seed": seed, "returncode": returncode, "seconds": round(seconds, 1)}
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return dict(row, error="no summary.json (see pipeline.log)")
    summary = json.loads(summary_path.read_text())
    teacher, student = summary["models"]["teacher (Ouro)"], summary["models"]["student (MELT)"]
    return dict(
        row,
        teacher=teacher["accuracy"],
        teacher_steps=teacher.get("steps", 0),
        teacher_loops=teacher["accuracy_per_loop"],
        student=student["accuracy"],
        student_loops=student["accuracy_per_loop"],
        gain=teacher["accuracy_per_loop"][-1] - teacher["accuracy_per_loop"][0],
        drop=summary["accuracy_drop"],
    )


def run_all(seeds: list[int], threads: list[int], root: Path, overrides: list[str]) -> list[dict]:
    cpus = sorted(os.sched_getaffinity(0))
    jobs = [(t, s) for t in threads for s in seeds]
    rows = []
    while jobs:
        threads_now = jobs[0][0]
        lanes = len(cpus) if threads_now == 1 else 1
        batch = [job for job in jobs if job[0] == threads_now][:lanes]
        running = []
        started = time.perf_counter()
        for lane, (t, s) in enumerate(batch):
            cores = [cpus[lane]] if t == 1 else cpus[:t]
            out = root / f"t{t}_s{s}"
            running.append((t, s, out, start(cores, out, s, overrides)))
            jobs.remove((t, s))
        # Each run's wall time ends when it does, not when the run listed before it in the batch does.
        finished = {}
        while len(finished) < len(running):
            for index, (_, _, _, process) in enumerate(running):
                if index not in finished and process.poll() is not None:
                    finished[index] = time.perf_counter() - started
            time.sleep(0.2)
        for index, (t, s, out, process) in enumerate(running):
            row = result_row(out, t, s, process.returncode, finished[index])
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def loops(values) -> str:
    return " ".join(f"{x:.2f}" for x in values)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['threads']} | {row['seed']} | {row['error']} (exit {row['returncode']}) |"
    return (
        f"| {row['threads']} | {row['seed']} | {row['teacher_steps']} | {row['teacher']:.3f} | "
        f"{loops(row['teacher_loops'])} | "
        f"{row['gain']:+.2f} | {row['student']:.3f} | {loops(row['student_loops'])} | {row['drop']:+.3f} | "
        f"{row['seconds']:.0f} |"
    )


def spread_lines(rows: list[dict]) -> list[str]:
    good = [r for r in rows if "error" not in r]
    if not good:
        return []
    lines = []
    for name, pick in (("min", min), ("median", statistics.median), ("max", max)):

        def agg(key, index=None, pick=pick):
            values = [r[key] if index is None else r[key][index] for r in good]
            return pick(values)

        num_loops = len(good[0]["teacher_loops"])
        teacher_loops = [agg("teacher_loops", i) for i in range(num_loops)]
        student_loops = [agg("student_loops", i) for i in range(num_loops)]
        lines.append(
            f"| {name} | | {agg('teacher_steps'):.0f} | {agg('teacher'):.3f} | {loops(teacher_loops)} | "
            f"{agg('gain'):+.2f} | "
            f"{agg('student'):.3f} | {loops(student_loops)} | {agg('drop'):+.3f} | {agg('seconds'):.0f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/pipeline_spread", help="folder for the runs' outputs")
    parser.add_argument("--min-teacher", type=float, default=0.95)
    parser.add_argument("--min-gain", type=float, default=0.3, help="teacher's last loop minus first loop")
    parser.add_argument("--max-drop", type=float, default=0.05, help="teacher minus student accuracy")
    parser.add_argument("overrides", nargs="*", help="pipeline overrides field=value, passed to every run")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    if max(args.threads) > cores:
        parser.error(f"--threads {max(args.threads)} needs that many cores; this process may use {cores}")

    root = Path(args.out)
    print(f"## Pipeline over seeds {args.seeds} x XLA threads {args.threads} ({cores} cores)\n")
    print(
        "| threads | seed | teacher steps | teacher | teacher per loop | last - first | student | student per loop "
        "| drop | wall s |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|---|---:|---:|")
    rows = run_all(args.seeds, args.threads, root, args.overrides)
    for line in spread_lines(rows):
        print(line)
    (root / "spread.json").write_text(json.dumps(rows, indent=2) + "\n")

    misses = [
        r
        for r in rows
        if "error" in r or r["teacher"] < args.min_teacher or r["gain"] < args.min_gain or r["drop"] > args.max_drop
    ]
    print(
        f"\n{len(rows) - len(misses)} of {len(rows)} runs reach teacher >= {args.min_teacher}, last loop >= first "
        f"+ {args.min_gain} and student within {args.max_drop} of the teacher"
    )
    for r in misses:
        print(f"  missed: threads {r['threads']} seed {r['seed']}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
