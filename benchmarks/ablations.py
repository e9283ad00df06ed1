"""The paper's MELT ablations at the embedded default's scale: students that differ in one thing each,
distilled from the same teacher, over several seeds.

    python benchmarks/ablations.py [--quick] [--seeds 0 1 2] [--teacher DIR] [--out DIR] [--png PATH]
                                   [--teacher-steps N] [--steps N]

The teacher is the pipeline's LoopLM stage with its default settings (seed 0), trained once into
OUT/teacher unless --teacher names a trained one (e.g. runs/pipeline/looplm/model). Every variant runs
the pipeline's two distillation stages (phase 1, phase 2) from that teacher with one setting changed
(train.gate, train.interpolate, train.align_beta, train.chunk_size, train.forward); the seed
(train.seed) draws the order of the training data. Reported per variant: the student's exact-match
accuracy and per-loop accuracy on the held-out examples (teacher-forced, chunked as the student was
trained: what the pipeline reports), the same accuracy read token by token (chunk size 1, what
decoding computes; the teacher's is the same either way), and phase 2's last KD (mean over loops of
KL(teacher || student) on the last training batch), as mean and min..max over the seeds, beside what
the MELT paper reports for the same ablation. --quick: one seed and half the distillation steps.
On a quiet 2-core machine: 15.7 minutes from a trained --teacher; --quick, training its teacher,
615-720 s (10-12 minutes).

Writes OUT/ablations.json and a PNG of the accuracies (--png, default OUT/ablations.png); prints the
Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from melt_jax.checkpoint import load_params
from melt_jax.inference import loop_answer_matches
from melt_jax.model import model_for
from melt_jax.train.pipeline import PipelineConfig
from melt_jax.train.stage_data import held_out_answers
from melt_jax.train.trainer import run_stage

# name -> (train settings that differ from the default student, what the paper reports for it)
VARIANTS: dict[str, tuple[dict, str]] = {
    "element-wise gate (MELT)": ({}, "best of the cache updates"),
    "scalar gate per layer": ({"gate": "scalar"}, "below the element-wise gate"),
    "fixed mean over loops": ({"gate": "mean"}, "below the element-wise gate"),
    "fixed EMA (z = 0.5)": ({"gate": "ema"}, "below the element-wise gate"),
    "last loop only (z = 0)": ({"gate": "last"}, "below the element-wise gate"),
    "no phase 1 (alpha = 1)": ({"interpolate": False}, "worse than with phase 1"),
    "no alignment (beta = 0)": ({"align_beta": 0.0}, "worse than with alignment"),
    "chunk 1": ({"chunk_size": 1}, "-"),
    "chunk = sequence (64)": ({"chunk_size": 64}, "fails (no chunking)"),
    "sequential forward": ({"forward": "sequential"}, "-"),
}


def log_quietly(message: str) -> None:
    if message.startswith("=="):
        print(message, flush=True)


def train_teacher(out: Path, steps: int) -> Path:
    train = dataclasses.replace(PipelineConfig().train, progress=False)
    config = PipelineConfig(output_dir=str(out), teacher_steps=steps, train=train)
    looplm = config.stage_configs()[0]
    run_stage(looplm, log=log_quietly)
    return Path(looplm.output_dir) / "model"


def last_evaluation(metrics_path: Path) -> dict:
    """The last evaluation record of a stage's metrics.jsonl (accuracy, accuracy_per_loop, loss_per_loop, ...)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [r["eval"] for r in records if "eval" in r][-1]


def token_by_token_accuracy(stage) -> list[float]:
    """Per-loop exact match on the stage's held-out examples when the answer is read token by token
    (chunk size 1: what decoding computes), whatever chunk the student was trained with."""
    config, params = load_params(Path(stage.output_dir) / "model")
    answers = held_out_answers(stage)
    matches = jax.jit(loop_answer_matches, static_argnames=("model", "chunk_size"))(
        model_for(config), params, answers["tokens"], answers["answer_mask"], chunk_size=1
    )  # [T, examples]
    return [float(x) for x in np.asarray(matches).mean(axis=1)]


def run_variant(out: Path, teacher: Path, seed: int, settings: dict, steps: int) -> dict:
    """Phase 1 and phase 2 of one student; its evaluation and phase 2's last metrics."""
    base = PipelineConfig()
    train = dataclasses.replace(base.train, seed=seed, progress=False, **settings)
    config = dataclasses.replace(base, output_dir=str(out), train=train, phase1_steps=steps, phase2_steps=steps)
    phase1, phase2 = (dataclasses.replace(c, teacher=str(teacher)).validate() for c in config.stage_configs()[-2:])
    started = time.perf_counter()
    run_stage(phase1, log=log_quietly)
    result = run_stage(phase2, log=log_quietly)
    decoded = token_by_token_accuracy(phase2)
    return {
        "accuracy": result.evaluation["accuracy"],
        "token_by_token_accuracy": decoded[-1],
        "accuracy_per_loop": result.evaluation["accuracy_per_loop"],
        "loss_per_loop": result.evaluation["loss_per_loop"],
        "kd": result.final_metrics["kd"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def table(results: dict, teacher: dict) -> str:
    teacher_loops = " ".join(f"{x:.2f}" for x in teacher["accuracy_per_loop"])
    lines = [
        "| variant | accuracy, mean (min..max) | token by token | per-loop accuracy (mean) | KD, mean (min..max) "
        "| paper |",
        "|---|---:|---:|---|---:|---|",
        f"| teacher (Ouro) | {teacher['accuracy']:.3f} | = | {teacher_loops} | - | - |",
    ]
    for name, runs in results.items():
        loops = [
            statistics.fmean(r["accuracy_per_loop"][t] for r in runs) for t in range(len(runs[0]["accuracy_per_loop"]))
        ]
        lines.append(
            f"| {name} | {spread([r['accuracy'] for r in runs])} "
            f"| {spread([r['token_by_token_accuracy'] for r in runs])} | {' '.join(f'{x:.2f}' for x in loops)} "
            f"| {spread([r['kd'] for r in runs], '{:.4f}')} | {VARIANTS[name][1]} |"
        )
    return "\n".join(lines)


def plot(results: dict, teacher: dict, path: Path) -> None:
    """Grouped bars: each variant's accuracy as the pipeline reports it and read token by token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    for offset, key, label in (
        (-0.2, "accuracy", "chunked as trained"),
        (0.2, "token_by_token_accuracy", "token by token"),
    ):
        values = [[r[key] for r in results[n]] for n in names]
        means = [statistics.fmean(v) for v in values]
        errors = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
        ax.barh([i + offset for i in range(len(names))], means, height=0.4, xerr=errors, capsize=2, label=label)
    ax.axvline(teacher["accuracy"], color="black", linestyle="--", label="teacher (Ouro)")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("student exact-match accuracy (mean, min..max over seeds)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.12), ncol=3, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, half the distillation steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed of the students (0 1 2)")
    parser.add_argument("--teacher", default=None, help="a trained LoopLM checkpoint to distill from")
    parser.add_argument("--teacher-steps", type=int, default=PipelineConfig().teacher_steps)
    parser.add_argument("--steps", type=int, default=None, help="steps of each distillation phase")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or PipelineConfig().phase1_steps // (2 if args.quick else 1)
    out = Path(args.out)
    started = time.perf_counter()
    teacher_dir = Path(args.teacher) if args.teacher else train_teacher(out / "teacher", args.teacher_steps)
    teacher = last_evaluation(teacher_dir.parent / "metrics.jsonl")
    results = {}
    for name, (settings, _) in VARIANTS.items():
        results[name] = []
        for seed in seeds:
            slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            run = run_variant(out / slug / f"s{seed}", teacher_dir, seed, settings, steps)
            print(f"{name}, seed {seed}: accuracy {run['accuracy']:.3f}, kd {run['kd']:.4f}, {run['seconds']:.0f} s")
            results[name].append(run)
    seconds = time.perf_counter() - started
    report = {"teacher": teacher, "seeds": seeds, "steps_per_phase": steps, "results": results, "seconds": seconds}
    (out / "ablations.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results, teacher))
    print(f"\n{len(seeds)} seed(s), {steps} + {steps} distillation steps, {seconds / 60:.1f} min in all")
    plot(results, teacher, Path(args.png) if args.png else out / "ablations.png")


if __name__ == "__main__":
    main()
