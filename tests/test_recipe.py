"""docs/recipes.md at toy scale, through the command lines' main functions: a Hugging Face Ouro folder
(tiny, random weights, a word-level tokenizer.json) -> melt-convert import -> melt-train tokenize (a
jsonl corpus, the teacher's tokenizer) -> melt-train pipeline teacher=... on the shards (phase 1 and
phase 2, held-out loss and perplexity per loop, an early stop on the held-out loss) -> melt-eval with
the tokenizer the student carries -> melt-convert export, whose weights read back equal to the
trained ones."""

import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from melt_jax.checkpoint import load_params
from melt_jax.convert import load_hf_checkpoint
from melt_jax.convert.cli import main as convert_main
from melt_jax.inference.cli_eval import main as eval_main
from melt_jax.testing.hf_checkpoints import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint
from melt_jax.train.cli import main as train_main
from melt_jax.train.config import RunConfigError, load_train_config
from melt_jax.train.pipeline import load_pipeline_config

LOOPS = 3
SEQ_LEN = 32
WORDS = "the cat sat on a mat while two dogs ran past one red door and a blue cup fell".split()


def write_corpus(path, num_documents: int = 120) -> None:
    """A jsonl corpus of short documents of words drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(num_documents):
        words = rng.choice(WORDS, size=rng.integers(4, 12))
        lines.append(json.dumps({"text": " ".join(words) + "."}))
    path.write_text("\n".join(lines) + "\n")


def write_hf_ouro(path) -> None:
    """A tiny Ouro in Hugging Face layout with a word-level tokenizer.json of the corpus's words."""
    vocabulary = ["<|endoftext|>", "[UNK]", ".", *WORDS]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    hf_config = tiny_hf_config(vocab_size=32, num_hidden_layers=1, total_ut_steps=LOOPS, max_position_embeddings=64)
    write_hf_checkpoint(path, hf_config, random_ouro_state_dict(hf_config, seed=3))
    tokenizer.save(str(path / "tokenizer.json"))


def pipeline_overrides(teacher, out, corpus) -> list[str]:
    return [
        f"teacher={teacher}",
        f"output_dir={out}",
        "phase1_steps=4",
        "phase2_steps=4",
        "student_decay_steps=2",
        "loss_margin=100",  # random weights: the verdict is not what this test checks
        f"train.data.source={corpus}",
        f"train.data.tokenizer={teacher}/tokenizer.json",
        f"train.data.seq_len={SEQ_LEN}",
        "train.chunk_size=8",
        "train.batch_size=4",
        "train.eval_every=2",
        "train.eval_batches=2",
        "train.stop_at_loss=1000",  # reached at the first evaluation: each phase stops at step 2
        "train.progress=false",
        "train.tensorboard=false",
        "train.async_checkpoints=false",
        "train.mesh.data=1",
        "train.mesh.num_devices=1",
    ]


def eval_records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval" in r]


def test_the_recipe_end_to_end(tmp_path, capsys):
    hf_teacher, teacher, out, corpus = (tmp_path / name for name in ("hf-ouro", "ouro", "run", "corpus.jsonl"))
    write_hf_ouro(hf_teacher)
    write_corpus(corpus)

    # A Hugging Face folder is converted first: as the teacher it is bad input, and nothing is written.
    assert train_main(["pipeline", *pipeline_overrides(hf_teacher, out, corpus)]) == 2
    assert "melt-convert import" in capsys.readouterr().err and not out.exists()

    assert convert_main(["import", str(hf_teacher), str(teacher)]) == 0
    # The corpus tokenized once with the teacher's tokenizer; the phases read the shards.
    tokenized = tmp_path / "corpus-tokens"
    tokenizer = str(teacher / "tokenizer.json")
    assert train_main(["tokenize", str(corpus), str(tokenized), "--tokenizer", tokenizer, "--workers", "1"]) == 0
    assert (tokenized / "manifest.json").is_file()

    status = train_main(["pipeline", *pipeline_overrides(teacher, out, tokenized)])
    summary = json.loads((out / "summary.json").read_text())
    assert status == (0 if summary["within_margin"] else 1)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["melt_phase1", "melt_phase2"]  # no teacher stage
    models = summary["models"]
    assert models["teacher (Ouro)"]["model_dir"] == str(teacher)
    for row in models.values():
        assert len(row["loss_per_loop"]) == LOOPS and all(math.isfinite(x) for x in row["loss_per_loop"])
        assert row["accuracy"] is None and math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert summary["kv_ratio"] == pytest.approx(1 / LOOPS)
    assert summary["loss_rise"] == pytest.approx(
        models["student (MELT)"]["loss_per_loop"][-1] - models["teacher (Ouro)"]["loss_per_loop"][-1]
    )
    record = json.loads((out / "pipeline_config.json").read_text())
    assert record["teacher"] == str(teacher) and len(record["teacher_checkpoint"]["config_sha256"]) == 64
    # A rerun into the same output_dir with another teacher stops before training, naming it.
    other = tmp_path / "other-ouro"
    shutil.copytree(teacher, other)
    capsys.readouterr()
    assert train_main(["pipeline", *pipeline_overrides(other, out, tokenized)]) == 2
    assert f"teacher {json.dumps(str(teacher))} -> {json.dumps(str(other))}" in capsys.readouterr().err

    # Held-out evaluation on text: per-loop loss and perplexity; the early stop at the first one.
    for phase in ("melt_phase1", "melt_phase2"):
        (evaluation,) = eval_records(out / phase)
        assert evaluation["step"] == 2 and evaluation["eval"]["tokens_scored"] == "all"
        assert len(evaluation["eval"]["perplexity_per_loop"]) == LOOPS and "accuracy" not in evaluation["eval"]
    student = out / "melt_phase2" / "model"
    assert json.loads((student / "config.json").read_text())["chunk_size"] == 8
    assert (student / "tokenizer.json").read_bytes() == (hf_teacher / "tokenizer.json").read_bytes()

    capsys.readouterr()
    assert eval_main(["--checkpoint", str(student), "--data", str(corpus), "--seq-len", str(SEQ_LEN), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["loss"]
    assert len(scores["loss_per_loop"]) == LOOPS and math.isfinite(scores["perplexity"])

    exported = tmp_path / "hf-melt"
    assert convert_main(["export", str(student), str(exported)]) == 0
    config, params = load_params(student)
    back_config, back = load_hf_checkpoint(exported)
    assert back_config.model_type == "melt" and back_config.chunk_size == 8 and (exported / "tokenizer.json").is_file()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_phase_schedules_of_a_given_teacher(tmp_path):
    config = load_pipeline_config(
        None,
        [
            "teacher=ckpt/ouro",
            f"output_dir={tmp_path}",
            "exit_gate_steps=5",
            "phase1_steps=30",
            "phase2_steps=6",
            "student_decay_steps=10",
        ],
    )
    stages = config.stage_configs()
    assert [c.stage for c in stages] == ["exit_gate", "melt_phase1", "melt_phase2"]
    assert stages[0].init_from == "ckpt/ouro"
    assert stages[1].teacher == stages[2].teacher == str(tmp_path / "exit_gate" / "model")
    assert [c.decay_steps for c in stages] == [0, 10, 6]  # a decay never longer than its phase


def test_the_shipped_recipe_settings_make_valid_stages(tmp_path):
    """examples/recipes/distill_ouro_1.4b.yaml with what the command line of docs/recipes.md adds."""
    recipe = pathlib.Path(__file__).resolve().parent.parent / "examples" / "recipes" / "distill_ouro_1.4b.yaml"
    overrides = ["teacher=ckpt/ouro-1.4b", f"output_dir={tmp_path}", "train.data.source=corpus.jsonl"]
    config = load_pipeline_config(recipe, [*overrides, "train.data.tokenizer=ckpt/ouro-1.4b/tokenizer.json"])
    phase1, phase2 = config.stage_configs()
    assert (phase1.chunk_size, phase1.data.seq_len, phase1.dtype) == (512, 4096, "bfloat16")
    assert (phase1.optimizer.learning_rate, phase1.optimizer.gate_learning_rate) == (8e-6, 5e-4)
    assert phase1.decay_steps == phase2.decay_steps == 400 and phase2.init_from == str(
        tmp_path / "melt_phase1" / "model"
    )
    assert phase1.teacher == phase2.teacher == "ckpt/ouro-1.4b"


def test_stop_at_loss_needs_a_held_out_evaluation():
    with pytest.raises(RunConfigError, match="stop_at_loss needs eval_every > 0 and eval_batches > 0"):
        load_pipeline_config(None, ["teacher=ckpt/ouro", "train.stop_at_loss=2.5"]).stage_configs()
    with pytest.raises(RunConfigError, match="stop_at_loss must be >= 0"):
        load_train_config(None, ["stop_at_loss=-1", "eval_every=5"])
    with pytest.raises(RunConfigError, match="student_decay_steps must be >= 0"):
        load_pipeline_config(None, ["student_decay_steps=-1"])
