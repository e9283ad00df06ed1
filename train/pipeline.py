"""The whole pipeline on one config: train a LoopLM teacher from scratch (or take a trained one,
`teacher=`), (optionally) train its exit gate, distill it into MELT (phase 1, then phase 2), and compare
teacher and student.

Stages run in `output_dir`/{looplm, exit_gate, melt_phase1, melt_phase2}; each resumes from its own
checkpoints, so an interrupted pipeline picks up where it stopped. The settings are recorded in
`output_dir`/pipeline_config.json, with the teacher checkpoint's config when one is given; a rerun with
other settings (or another teacher model) stops before any stage runs, naming them (train/run_record.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from melt_jax.checkpoint import load_config
from melt_jax.errors import CheckpointError, ConfigError
from melt_jax.model.registry import require_model_type
from melt_jax.train.config import (
    DataConfig,
    RunConfigError,
    TrainConfig,
    apply_overrides,
    from_dict,
    read_config_file,
    to_dict,
)
from melt_jax.train.optimizer import OptimizerConfig
from melt_jax.train.run_record import check_rerun, describe_accepted, holds_training, write_record
from melt_jax.train.trainer import StageResult, evaluate_checkpoint, run_stage

# The embedded default: a one-layer version of the tiny preset (H=64, 4 loops) with a narrow MLP (32)
# on byte-level text of the synthetic task's default (one or two additions or multiplications modulo
# 5 in the chain form, "3*4=2", "3+4=*2=4"), loss on the answers only, each example attending only to
# itself (as when it is evaluated, one per row). The second operation needs the first one's result,
# which a pass must first compute at the first "=", so the first loop cannot answer those lines while
# the later loops learn them (docs/measured.md, "Embedded default: spread over seeds and thread counts").
DEFAULT_TRAIN = TrainConfig(
    vocab_size=258,
    num_layers=1,
    intermediate_size=32,
    batch_size=32,
    chunk_size=16,
    log_every=25,
    checkpoint_every=100,
    optimizer=OptimizerConfig(warmup_steps=10),
    data=DataConfig(seq_len=64, num_examples=20_000, eval_examples=512, isolate_documents=True),
)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Steps and learning rates of each stage; `train` holds the settings all stages share (its
    stage, output_dir, steps, init_from and teacher are set per stage; the teacher's stages warm up
    for teacher_warmup_steps, the student's for train.optimizer.warmup_steps). The teacher trains at
    a constant learning rate, is evaluated every teacher_eval_every steps, and from the first
    evaluation with held-out accuracy >= teacher_decay_at_accuracy its learning rate decays linearly
    to 0 over teacher_decay_steps steps, after which it stops; it takes at most teacher_steps steps,
    decay included (warmup-stable-decay keyed to the held-out accuracy: when the task is learned
    varies several-fold over seeds, and a teacher whose learning rate has come down is settled
    enough to distill). With `teacher` (a trained LoopLM checkpoint) no teacher is trained: the
    teacher_* settings are unused, except that an exit-gate stage trains at teacher_learning_rate
    and warms up for teacher_warmup_steps. Each MELT phase takes its *_steps steps at
    student_learning_rate (gate_learning_rate for the new gates) after train.optimizer.warmup_steps of
    warmup, on train.optimizer.schedule, and its last student_decay_steps steps (at most the phase's)
    scale the rate down linearly to 0. accuracy_margin (synthetic task): the largest drop from teacher
    to student accuracy that the pipeline reports as within margin; loss_margin (other data): the
    largest rise of the held-out loss of the last loop, in nats per token."""

    output_dir: str = "runs/pipeline"
    # A trained LoopLM (Ouro) checkpoint to distill instead of training a teacher: a directory written
    # by `melt-convert import` or a melt-train model dir (e.g. runs/x/looplm/model).
    teacher: str | None = None
    teacher_steps: int = 4000
    teacher_warmup_steps: int = 100
    teacher_eval_every: int = 250
    teacher_decay_at_accuracy: float = 0.95
    teacher_decay_steps: int = 500
    exit_gate_steps: int = 0
    phase1_steps: int = 100
    phase2_steps: int = 100
    teacher_learning_rate: float = 1e-2
    student_learning_rate: float = 5e-4
    gate_learning_rate: float = 3e-3
    # Each MELT phase's last N steps (at most the phase's) scale its learning rate linearly to 0.
    student_decay_steps: int = 0
    accuracy_margin: float = 0.05  # synthetic task: the largest accuracy drop, teacher to student
    loss_margin: float = 0.1  # other data: the largest rise of the last loop's held-out loss (nats per token)
    train: TrainConfig = DEFAULT_TRAIN

    def validate(self) -> PipelineConfig:
        for name in ("teacher_steps", "phase1_steps", "phase2_steps"):
            if getattr(self, name) < 1:
                raise RunConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "exit_gate_steps",
            "teacher_warmup_steps",
            "teacher_eval_every",
            "teacher_decay_steps",
            "student_decay_steps",
        ):
            if getattr(self, name) < 0:
                raise RunConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.teacher is not None and not str(self.teacher).strip():
            raise RunConfigError("teacher must name a checkpoint directory (or be left out to train one)")
        return self

    def stage_configs(self) -> list[TrainConfig]:
        """The TrainConfigs of the stages, in order."""
        root = Path(self.output_dir)
        opt = self.train.optimizer

        teacher_rate = dict(learning_rate=self.teacher_learning_rate, warmup_steps=self.teacher_warmup_steps)
        teacher = dict(teacher_rate, schedule="constant")  # the decay follows the held-out accuracy
        student = dict(learning_rate=self.student_learning_rate, warmup_steps=opt.warmup_steps)

        def stage(name, steps, schedule, **fields):
            optimizer = dataclasses.replace(opt, gate_learning_rate=self.gate_learning_rate, **schedule)
            return dataclasses.replace(
                self.train, stage=name, output_dir=str(root / name), steps=steps, optimizer=optimizer, **fields
            ).validate()

        configs = []
        if self.teacher:
            teacher_dir = str(self.teacher)
        else:
            teacher_dir = str(root / "looplm" / "model")
            decay = dict(
                eval_every=self.teacher_eval_every,
                decay_at_accuracy=self.teacher_decay_at_accuracy,
                decay_steps=min(self.teacher_decay_steps, self.teacher_steps),
            )
            configs.append(stage("looplm", self.teacher_steps, teacher, init_from=None, teacher=None, **decay))
        if self.exit_gate_steps:
            configs.append(stage("exit_gate", self.exit_gate_steps, teacher_rate, init_from=teacher_dir, teacher=None))
            teacher_dir = str(root / "exit_gate" / "model")
        phase1_decay = min(self.student_decay_steps, self.phase1_steps)
        phase2_decay = min(self.student_decay_steps, self.phase2_steps)
        configs.append(
            stage(
                "melt_phase1", self.phase1_steps, student, init_from=None, teacher=teacher_dir, decay_steps=phase1_decay
            )
        )
        configs.append(
            stage(
                "melt_phase2",
                self.phase2_steps,
                student,
                init_from=str(root / "melt_phase1" / "model"),
                teacher=teacher_dir,
                decay_steps=phase2_decay,
            )
        )
        return configs


def load_pipeline_config(path: str | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """A validated PipelineConfig: defaults, then a JSON/YAML file (its `train` section merged into
    the default one), then `field=value` overrides (e.g. teacher_steps=300, train.batch_size=32)."""
    values = to_dict(PipelineConfig())
    if path is not None:
        file_values = read_config_file(path)
        train = dict(values["train"], **file_values.pop("train", {}))
        values.update(file_values, train=train)
    return from_dict(PipelineConfig, apply_overrides(values, list(overrides))).validate()


def summarize(config: PipelineConfig, teacher: StageResult, student: StageResult) -> dict:
    """Teacher against student: per-loop loss, accuracy (synthetic task) or perplexity (other data),
    KV cache bytes per token and per sequence; the verdict compares accuracy where both models have
    one, else the last loop's held-out loss."""
    seq_len = config.train.data.seq_len
    rows = {}
    for name, result in (("teacher (Ouro)", teacher), ("student (MELT)", student)):
        model_config = load_config(result.model_dir)
        ev = result.evaluation
        rows[name] = {
            "accuracy": ev.get("accuracy"),
            "accuracy_per_loop": ev.get("accuracy_per_loop"),
            "loss_per_loop": ev.get("loss_per_loop", []),
            "perplexity": ev.get("perplexity"),
            "steps": result.steps,
            "kv_bytes_per_token": model_config.kv_bytes_per_token(),
            "kv_bytes_per_sequence": model_config.kv_cache_bytes(1, seq_len),
            "model_dir": str(result.model_dir),
        }
    t, s = rows["teacher (Ouro)"], rows["student (MELT)"]
    summary = {"models": rows, "kv_ratio": s["kv_bytes_per_token"] / t["kv_bytes_per_token"]}
    if t["accuracy"] is not None and s["accuracy"] is not None:
        drop = t["accuracy"] - s["accuracy"]
        summary.update(accuracy_drop=drop, accuracy_margin=config.accuracy_margin)
        summary["within_margin"] = drop <= config.accuracy_margin
    elif t["loss_per_loop"] and s["loss_per_loop"]:
        rise = s["loss_per_loop"][-1] - t["loss_per_loop"][-1]
        summary.update(loss_rise=rise, loss_margin=config.loss_margin, within_margin=rise <= config.loss_margin)
    else:  # no held-out evaluation (train.eval_batches=0): nothing to compare
        summary["within_margin"] = True
    return summary


def _verdict(summary: dict) -> str:
    """The summary's comparison in words."""
    verdict = "within" if summary["within_margin"] else "NOT within"
    if "accuracy_drop" in summary:
        return (
            f"student accuracy is {summary['accuracy_drop']:+.3f} below the teacher's ({verdict} the margin "
            f"{summary['accuracy_margin']})"
        )
    if "loss_rise" in summary:
        return (
            f"student held-out loss (last loop) minus the teacher's: {summary['loss_rise']:+.4f} ({verdict} the "
            f"margin {summary['loss_margin']})"
        )
    return "no held-out evaluation to compare"


def format_summary(summary: dict, seconds: float) -> str:
    """The table the pipeline ends with: per model accuracy and per-loop accuracy (synthetic task) or
    perplexity (other data), per-loop loss and KV cache bytes per token; then the verdict."""
    rows = summary["models"].values()
    synthetic = all(row["accuracy"] is not None for row in rows)
    scores = "accuracy | per-loop accuracy" if synthetic else "perplexity"
    lines = ["", f"| model | {scores} | per-loop loss | KV cache bytes / token |"]
    lines.append("|---|---:|" + ("---|" if synthetic else "") + "---|---:|")
    for name, row in summary["models"].items():
        if synthetic:
            score = f"{row['accuracy']:.3f} | " + " ".join(f"{x:.2f}" for x in row["accuracy_per_loop"])
        else:
            score = "-" if row["perplexity"] is None else f"{row['perplexity']:.2f}"
        loss = " ".join(f"{x:.3f}" for x in row["loss_per_loop"])
        lines.append(f"| {name} | {score} | {loss} | {row['kv_bytes_per_token']:,} |")
    kv = f"MELT's KV cache is {summary['kv_ratio']:.2f}x the teacher's"
    lines.append(f"\n{_verdict(summary)}; {kv}; pipeline time {seconds:.0f} s")
    return "\n".join(lines)


def check_teacher(path: str) -> dict:
    """The teacher checkpoint's config.json as a dict, after checking that `path` holds a LoopLM
    (Ouro) checkpoint in melt_jax's layout; RunConfigError naming what is wrong otherwise (before any
    stage runs)."""
    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / "params").exists():
        raise RunConfigError(
            f"teacher={path} is not a melt_jax checkpoint (no params/): a Hugging Face folder is converted "
            f"first, `melt-convert import {path} OUT_DIR`, and OUT_DIR is the teacher"
        )
    try:
        require_model_type(load_config(folder), "ouro", f"teacher={path}")
    except (CheckpointError, ConfigError) as e:
        raise RunConfigError(f"teacher={path}: {e}") from None
    return json.loads((folder / "config.json").read_text())


def _settings_record(config: PipelineConfig) -> dict:
    """What pipeline_config.json holds: the settings and, with a given teacher, a fingerprint of its
    model (its config.json's SHA-256), so that a rerun against another model at the same path stops."""
    values = to_dict(config)
    if config.teacher:
        text = json.dumps(check_teacher(config.teacher), sort_keys=True)
        values["teacher_checkpoint"] = {"config_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return values


def _record_settings(config: PipelineConfig, accept_changes: bool, log: Callable[[str], None]) -> None:
    """Checks a rerun's settings against output_dir/pipeline_config.json (when a stage has trained)
    and records them there."""
    root = Path(config.output_dir)
    record = root / "pipeline_config.json"
    values = _settings_record(config)
    trained = root.is_dir() and any(holds_training(d) for d in root.iterdir() if d.is_dir())
    changes = check_rerun(record, values, trained, accept_changes)
    if changes:
        log(f"== {describe_accepted(changes)}")
    root.mkdir(parents=True, exist_ok=True)
    write_record(record, values, changes)


def _teacher_result(
    config: PipelineConfig, stage_configs: list[TrainConfig], results: list[StageResult]
) -> StageResult:
    """The teacher the student was distilled from, with its held-out evaluation: the result of the
    stage that made it, or for a given teacher (no stage of its own) an evaluation of the checkpoint on
    the student's held-out data."""
    if len(results) > 2:
        return results[-3]
    student = stage_configs[-1]
    evaluation = evaluate_checkpoint(student, config.teacher)
    return StageResult(Path(config.teacher), Path(config.teacher), 0, {}, evaluation, 0, "", 0.0)


def _log_stage_result(result: StageResult, log: Callable[[str], None]) -> None:
    ev = result.evaluation
    if not ev:
        log(f"   done in {result.seconds:.0f} s")
        return
    acc = f", accuracy {ev['accuracy']:.3f}" if "accuracy" in ev else ""
    ppl = f", perplexity {ev['perplexity']:.2f}" if "perplexity" in ev else ""
    log(f"   done in {result.seconds:.0f} s: per-loop loss {[round(x, 3) for x in ev['loss_per_loop']]}{acc}{ppl}")


def run_pipeline(config: PipelineConfig, log: Callable[[str], None] = print, accept_changes: bool = False) -> dict:
    """Runs every stage and returns (and writes to output_dir/summary.json) the comparison. A rerun
    into an output_dir trained with other settings raises RunConfigError naming them, unless they
    may change within a run and `accept_changes` is set (then every stage continues with them)."""
    stage_configs = config.validate().stage_configs()
    _record_settings(config, accept_changes, log)
    if config.teacher:
        log(f"== teacher {config.teacher} (given: no teacher stage)")
    results = []
    for stage_config in stage_configs:
        log(f"== stage {stage_config.stage}: {stage_config.steps} steps -> {stage_config.output_dir}")
        result = run_stage(stage_config, accept_changes=accept_changes, log=log)
        _log_stage_result(result, log)
        results.append(result)
    teacher = _teacher_result(config, stage_configs, results)
    summary = summarize(config, teacher, results[-1])
    summary["seconds"] = sum(r.seconds for r in results)
    Path(config.output_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(format_summary(summary, summary["seconds"]))
    return summary
