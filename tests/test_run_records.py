"""A run's record: a rerun with other settings stops naming them, a damaged checkpoint is set aside,
SIGINT and SIGTERM save the step reached, and after a resume the logs hold each step once (tiny
one-layer LoopLM runs)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from melt_jax.errors import TrainingError
from melt_jax.train import trainer
from melt_jax.train.checkpointing import RunCheckpoints
from melt_jax.train.cli import main as train_main
from melt_jax.train.config import RunConfigError, load_train_config
from melt_jax.train.trainer import run_stage

TINY = [
    "model=tiny",
    "vocab_size=258",
    "num_layers=1",
    "intermediate_size=32",
    "data.seq_len=32",
    "data.num_examples=400",
    "batch_size=8",
    "eval_batches=0",
    "progress=false",
    "async_checkpoints=false",
    "log_every=1",
    "mesh.data=1",
    "mesh.num_devices=1",
]
TINY_PIPELINE = [
    "teacher_steps=2",
    "teacher_warmup_steps=0",
    "teacher_eval_every=0",
    "teacher_decay_at_accuracy=0",
    "teacher_decay_steps=0",
    "phase1_steps=1",
    "phase2_steps=1",
    "train.batch_size=8",
    "train.chunk_size=8",
    "train.data.seq_len=32",
    "train.data.num_examples=400",
    "train.data.eval_examples=8",
    "train.eval_batches=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.async_checkpoints=false",
    "train.mesh.data=1",
    "train.mesh.num_devices=1",
]


def stage_fields(out, *extra):
    return [f"output_dir={out}", *TINY, *extra]


def logged_steps(run_dir) -> list[int]:
    """The steps of metrics.jsonl's training records, in order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def tensorboard_steps(run_dir, tag: str) -> list[int]:
    """The steps of `tag`'s events as TensorBoard shows them: the event files in the order they were
    written, a SessionLog.START at step s dropping the earlier events at steps >= s (`purge_step`)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    steps: list[int] = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("melt-train: "), err
    return lines[0]


def test_pipeline_rerun_with_other_settings_stops_naming_them(tmp_path, capsys):
    """A pipeline run again into its output_dir with other settings exits 2 before any stage runs,
    naming each changed field (old -> new) and what to do, and leaves the records as they were; a
    changed seed gets the same message; the same settings resume."""
    out = tmp_path / "pipeline"
    assert train_main(["pipeline", f"output_dir={out}", *TINY_PIPELINE]) in (0, 1)
    records = {p: p.read_bytes() for p in [out / "pipeline_config.json", *out.glob("*/run_config.json")]}
    assert len(records) == 4
    capsys.readouterr()

    other = ["teacher_learning_rate=0.003", "phase2_steps=50"]
    assert train_main(["pipeline", f"output_dir={out}", *TINY_PIPELINE, *other]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "teacher_learning_rate 0.01 -> 0.003" in line and "phase2_steps 1 -> 50" in line, line
    assert "another output_dir" in line and "--accept-changes" in line, line
    assert "== stage" not in captured.out  # nothing ran
    assert {p: p.read_bytes() for p in records} == records

    assert train_main(["pipeline", f"output_dir={out}", *TINY_PIPELINE, "train.seed=1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "train.seed 0 -> 1" in line and "train.seed cannot change within a run" in line, line
    assert "--accept-changes" not in line

    assert train_main(["pipeline", f"output_dir={out}", *TINY_PIPELINE]) in (0, 1)
    assert "resumed from step 2" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in records} == records


def test_stage_rerun_with_other_settings_and_accept_changes(tmp_path, capsys):
    """`melt-train stage` into a trained output_dir: other settings stop it (exit 2, the fields named);
    with accept_changes a step count changes and the change is recorded, a seed does not."""
    out = tmp_path / "stage"
    run_stage(load_train_config(None, stage_fields(out, "steps=2")), log=lambda _: None)
    record = (out / "run_config.json").read_bytes()

    assert train_main(["stage", *stage_fields(out, "steps=3", "beta=0.2")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "steps 2 -> 3" in line and "beta 0.1 -> 0.2" in line and "--accept-changes" in line, line
    assert (out / "run_config.json").read_bytes() == record

    with pytest.raises(RunConfigError, match=r"seed 0 -> 1.*seed cannot change within a run"):
        run_stage(load_train_config(None, stage_fields(out, "steps=3", "seed=1")), accept_changes=True)

    messages = []
    more = load_train_config(None, stage_fields(out, "steps=3", "progress=true"))
    result = run_stage(more, accept_changes=True, log=messages.append)
    assert result.steps == 3 and any("resumed from step 2" in m for m in messages)
    assert any("continuing with changed settings: steps 2 -> 3" in m for m in messages), messages
    assert json.loads((out / "run_config.json").read_text())["steps"] == 3
    changes = [json.loads(line) for line in (out / "settings_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 2, "changes": {"steps": {"old": 2, "new": 3}}}]
    assert logged_steps(out) == [1, 2, 3]


def _truncate_largest_file(checkpoint_dir):
    files = [p for p in checkpoint_dir.rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)


# orbax's reads still in flight when one fails end later, reported as "Exception ignored" at collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path):
    """A truncated file in the newest checkpoint: one warning naming the step and where it went, the
    run resumes from the checkpoint before and logs each step once; none intact: a clear error."""
    out = tmp_path / "damaged"
    cfg = load_train_config(None, stage_fields(out, "steps=4", "checkpoint_every=2"))
    run_stage(cfg, log=lambda _: None)
    _truncate_largest_file(out / "checkpoints" / "4" / "state")

    messages = []
    result = run_stage(cfg, log=messages.append)
    warnings = [m for m in messages if "warning" in m]
    assert len(warnings) == 1 and "\n" not in warnings[0], messages
    assert "checkpoint at step 4 is damaged" in warnings[0] and "damaged_checkpoints/4" in warnings[0]
    assert any("resumed from step 2" in m for m in messages)
    assert result.steps == 4 and (out / "damaged_checkpoints" / "4" / "state").is_dir()
    assert RunCheckpoints(out / "checkpoints").latest_step() == 4
    assert logged_steps(out) == [1, 2, 3, 4]
    assert tensorboard_steps(out, "loss") == [1, 2, 3, 4]

    for step in ("2", "4"):
        _truncate_largest_file(out / "checkpoints" / step / "state")
    with pytest.raises(TrainingError, match=r"no intact checkpoint in .*step 4: .*step 2: .*new output_dir"):
        run_stage(cfg, log=lambda _: None)


def test_sigint_saves_the_step_reached_and_exits_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a stage: the step under way ends, a checkpoint is saved there, one line, exit 130."""
    take_step = trainer._take_step

    def take_step_then_interrupt(run, stage):
        take_step(run, stage)
        if run.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer, "_take_step", take_step_then_interrupt)
    out = tmp_path / "sigint"
    try:
        status = train_main(["stage", *stage_fields(out, "steps=10", "checkpoint_every=100")])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped melt-train")
    assert status == 130
    line = one_error_line(capsys.readouterr().err)
    assert "stopped by SIGINT at step 3" in line and "rerun the same command to resume" in line, line
    assert RunCheckpoints(out / "checkpoints").latest_step() == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (out / "model").exists()


def test_sigterm_saves_a_checkpoint_and_the_resumed_logs_hold_each_step_once(tmp_path):
    """SIGTERM to a real `melt-train stage` process: it saves the step reached and exits 143 with one
    line; the rerun resumes from that step and metrics.jsonl holds every step once."""
    out = tmp_path / "sigterm"
    fields = stage_fields(out, "steps=100000", "checkpoint_every=100000", "optimizer.schedule=constant")
    proc = subprocess.Popen(
        [sys.executable, "-m", "melt_jax.train", "stage", *fields],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no third metrics record within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    stopped = RunCheckpoints(out / "checkpoints").latest_step()
    assert stopped is not None and stopped >= 3
    assert f"stopped by SIGTERM at step {stopped}" in one_error_line(err)
    assert logged_steps(out) == list(range(1, stopped + 1))

    messages = []
    resumed = run_stage(load_train_config(None, fields), stop_after=2, log=messages.append)
    assert any(f"resumed from step {stopped}" in m for m in messages)
    assert resumed.steps == stopped + 2
    assert logged_steps(out) == list(range(1, stopped + 3))
