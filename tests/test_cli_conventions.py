"""The command lines side by side: one error convention (`melt-x: error: ...` on stderr, exit status 2
for bad input, 1 for a failure at run time), melt-train's hints, summary table, show-config and clean
failed starts, and the training progress bar. In-process through main(argv), but for one console script."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from melt_jax.convert import cli as convert_cli
from melt_jax.errors import GenerationError, TrainingError, exit_status
from melt_jax.inference import cli_eval, cli_generate
from melt_jax.train import cli as train_cli
from melt_jax.train.config import RunConfigError, TrainConfig, load_train_config
from melt_jax.train.hooks import ProgressBar, StageRun, stop_rule
from melt_jax.train.pipeline import PipelineConfig, load_pipeline_config
from melt_jax.train.trainer import StageResult


def _error(capsys, main, argv, prog):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"{prog}: error: "), err
    return code, err[-1]


def test_every_command_line_reports_bad_input_alike(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "missing")
    cases = [
        (convert_cli.main, ["import", missing, str(tmp_path / "out")], "melt-convert"),
        (convert_cli.main, ["export", missing, str(tmp_path / "hf")], "melt-convert"),
        (train_cli.main, ["stage", "setps=3"], "melt-train"),
        (cli_generate.main, ["--checkpoint", missing, "--tokenizer", "byte", "--prompt", "a"], "melt-generate"),
        (cli_eval.main, ["--checkpoint", missing, "--tokenizer", "byte", "--data", "synthetic:4"], "melt-eval"),
    ]
    for main, argv, prog in cases:
        assert _error(capsys, main, argv, prog)[0] == 2, argv
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()

    pytest.importorskip("lm_eval")
    import lm_eval.__main__

    from melt_jax.inference import lm_eval_adapter

    def bad_checkpoint():
        raise GenerationError("not a melt_jax checkpoint: x")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", bad_checkpoint)
    assert _error(capsys, lambda _: lm_eval_adapter.main(), None, "melt-lm-eval")[0] == 2


def test_failures_at_run_time_exit_with_status_1(capsys, monkeypatch):
    assert exit_status("melt-x", TrainingError("loss is nan")) == 1
    assert exit_status("melt-x", OSError(28, "No space left on device")) == 1
    assert exit_status("melt-x", FileNotFoundError(2, "No such file")) == 2
    assert "melt-x: error: loss is nan" in capsys.readouterr().err

    def nan_loss(config, accept_changes=False):
        raise TrainingError("[looplm] loss is nan at step 3: stopping")

    monkeypatch.setattr(train_cli, "run_stage", nan_loss)
    code, line = _error(capsys, train_cli.main, ["stage", "progress=false"], "melt-train")
    assert code == 1 and "loss is nan" in line


def test_the_converter_console_script_follows_the_convention(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "melt_jax.convert", "import", str(tmp_path / "none"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("melt-convert: error: ")


def test_unknown_fields_name_the_ones_meant():
    with pytest.raises(RunConfigError, match=r"unknown config field\(s\) data \(did you mean train\.data\?\)"):
        load_pipeline_config(None, ["data.seq_len=64"])
    with pytest.raises(RunConfigError, match=r"batch_size \(did you mean train\.batch_size\?\)"):
        load_pipeline_config(None, ["batch_size=8"])
    with pytest.raises(RunConfigError, match=r"setps \(did you mean steps\?\).*show-config"):
        load_train_config(None, ["setps=3"])
    with pytest.raises(
        RunConfigError, match=r"optimizer\.learning_rat \(did you mean optimizer\.learning_rate( or [^)]*)?\?\)"
    ):
        load_train_config(None, ["optimizer.learning_rat=1e-3"])
    with pytest.raises(RunConfigError, match="optimizer.schedule must be 'cosine' or 'constant'"):
        load_train_config(None, ["optimizer.schedule=linear"])


def _leaf_fields(config, prefix=""):
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{field.name}.")
        else:
            yield prefix + field.name, value


def test_show_config_lists_every_field_with_its_default_and_meaning(capsys):
    assert train_cli.main(["show-config"]) == 0
    out = capsys.readouterr().out
    for name, _value in _leaf_fields(TrainConfig()):
        assert f"\n  {name} = " in out, name
    assert "\n  steps = 100\n" in out and "\n  data.seq_len = 64\n" in out
    assert "weight of the exit entropy" in out  # the comment of `beta`
    assert "Model presets (model=): " in out and "tiny" in out
    assert train_cli.main(["show-config", "pipeline"]) == 0
    out = capsys.readouterr().out
    for name, _value in _leaf_fields(PipelineConfig()):
        assert f"\n  {name} = " in out, name
    assert "\n  teacher_steps = 4000\n" in out and "\n  train.batch_size = 32\n" in out
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    assert "show-config" in capsys.readouterr().out
    assert train_cli.main(["show-config", "stages"]) == 2


def test_a_failed_start_leaves_no_output_dir(tmp_path, capsys):
    out = tmp_path / "runs" / "student"
    argv = ["stage", "stage=melt_phase1", f"teacher={tmp_path / 'no-teacher'}", f"output_dir={out}"]
    code, line = _error(capsys, train_cli.main, argv, "melt-train")
    assert code == 2 and "no-teacher" in line
    assert not (tmp_path / "runs").exists()


def test_melt_train_stage_ends_with_a_table(tmp_path, capsys, monkeypatch):
    evaluation = {
        "loss_per_loop": [1.5, 0.25],
        "loss": 0.25,
        "tokens_scored": "answer",
        "num_tokens": 300.0,
        "num_batches": 2,
        "accuracy_per_loop": [0.125, 0.875],
        "accuracy": 0.875,
        "num_examples": 64,
    }
    result = StageResult(tmp_path, tmp_path / "model", 10, {"loss": 0.2}, evaluation, 1000, "", 3.0)
    monkeypatch.setattr(train_cli, "run_stage", lambda config, accept_changes=False: result)
    assert train_cli.main(["stage", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out
    assert "| 0 | 1.5000 | 0.125 |" in out and "| 1 | 0.2500 | 0.875 |" in out
    assert "300 answer tokens, accuracy on 64 examples; loops numbered from 0" in out


def _run(step, end, evaluation=None, stopped=False):
    return StageRun(
        stage="looplm",
        state=None,
        meta={"stopped_early": stopped},
        step=step,
        decay_start=end,
        decay_steps=0,
        checkpoint_dir=Path("."),
        log=print,
        evaluation=evaluation,
        evaluation_step=step if evaluation else None,
    )


def test_progress_bar_shows_accuracy_the_loss_terms_and_what_stops_the_stage():
    assert stop_rule(4000, stop_at_accuracy=0.95) == "stops at acc >= 0.95 or step 4000"
    assert stop_rule(100) == "stops at step 100"
    assert stop_rule(4000, decay_at_accuracy=0.95, decay_steps=500).startswith("decays at acc >= 0.95")
    bar = ProgressBar("looplm", 4000, 0, stop_rule(4000, stop_at_accuracy=0.95))
    try:
        bar.show(-0.05, 1000.0, {"expected_ce": 0.08, "exit_entropy": 1.3})
        bar.advance(_run(1, 4000, {"accuracy": 0.5}))
        text = str(bar.bar)
        assert "loss=-0.0500" in text and "ce=0.0800" in text and "H=1.300" in text
        assert "acc=0.500" in text and "stops at acc >= 0.95 or step 4000" in text
        bar.advance(_run(2, 1000))  # a decay started early: the stage now ends at step 1000
        assert bar.bar.total == 1000
        bar.advance(_run(3, 1000, {"accuracy": 0.96}, stopped=True))
        assert bar.bar.total == 3 and "acc=0.960" in str(bar.bar)
    finally:
        bar.close()
