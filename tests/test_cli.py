"""The command lines melt-generate and melt-eval, run in-process through main(argv) on tiny
checkpoint saved with melt_jax.checkpoint.save_params (and once as a real console script)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from generation_fixtures import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers

from melt_jax.checkpoint import save_params
from melt_jax.data import ByteTokenizer, load_tokenizer
from melt_jax.errors import ConfigError
from melt_jax.inference import SamplingConfig, cli_eval, cli_generate, generate, load_model, text_generation

TOKENIZER = ByteTokenizer()
PROMPTS = ["k=3,q=k+4;q?", "hello", "abc", "x=1;x?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Ouro model as a melt_jax checkpoint (MELT's evaluation is tested in test_evaluation)."""
    path = tmp_path_factory.mktemp("cli") / "ouro"
    model, params = tiny_model("ouro")
    save_params(path, model.config, params)
    return path


def _greedy_texts(prompts, max_new=12):
    model, params = tiny_model("ouro")
    rows = generate(model, params, [list(p.encode()) for p in prompts], SamplingConfig(max_new_tokens=max_new)).tokens
    return [TOKENIZER.decode(row, skip_special_tokens=False) for row in rows]


def _generate(capsys, checkpoint, *args):
    code = cli_generate.main(["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--max-new-tokens", "12", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_prompt_is_streamed_and_timed(checkpoint, capsys):
    code, out, err = _generate(capsys, checkpoint, "--prompt", PROMPTS[0])
    assert code == 0
    assert out == _greedy_texts(PROMPTS[:1])[0] + "\n"
    assert "tokens/s" in err and "stop: length" in err


def test_a_batch_of_prompts_with_a_stop_string(checkpoint, capsys):
    expected = _greedy_texts(PROMPTS)
    stop = expected[0][3:5]  # two characters the first prompt produces
    code, out, _ = _generate(capsys, checkpoint, *sum((["--prompt", p] for p in PROMPTS), []), "--stop", stop)
    assert code == 0
    blocks = out.split("=== ")[1:]
    assert [b.split("\n", 1)[1][:-1] for b in blocks] == [t.split(stop, 1)[0] for t in expected]


def test_attention_is_chosen_at_load(checkpoint, capsys):
    """--attention sets how attention is computed (the checkpoint's config says dense "xla"):
    blockwise gives the same greedy text here; a name that is no implementation is refused."""
    code, out, _ = _generate(capsys, checkpoint, "--prompt", PROMPTS[0], "--attention", "blockwise")
    assert code == 0 and out == _greedy_texts(PROMPTS[:1])[0] + "\n"
    assert load_model(checkpoint, attention="auto")[0].config.attention == "auto"
    assert load_model(checkpoint)[0].config.attention == "xla"
    with pytest.raises(ConfigError, match="attention"):
        load_model(checkpoint, attention="flash")
    with pytest.raises(SystemExit):
        _generate(capsys, checkpoint, "--prompt", "a", "--attention", "flash")
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_text_stream_holds_back_what_may_still_change():
    stream = text_generation.TextStream(["STOP"])
    assert stream.update("abcdef") == ("abc", False)  # "def" may begin "STOP"
    assert stream.update("abcdefST\ufffd") == ("de", False)  # a partial character is held too
    assert stream.update("abcdefSTOPxyz") == ("f", True)
    assert stream.update("abcdefSTOPxyz", final=True) == ("", True)


def test_text_generator_streams_the_text_it_returns():
    model, params = tiny_model("ouro")
    expected = _greedy_texts(PROMPTS[:2])
    stop = expected[0][3:5]
    generator = text_generation.TextGenerator(
        model, params, TOKENIZER, SamplingConfig(max_new_tokens=12), stops=(stop,), segment_steps=3
    )
    run = generator.start(PROMPTS[:2], stream=True)
    streamed = ["", ""]
    for pieces in run:
        assert len(pieces) == 2
        streamed = [text + piece for text, piece in zip(streamed, pieces)]
    texts = [t.split(stop, 1)[0] for t in expected]
    assert streamed == run.result().texts == generator.generate(PROMPTS[:2]).texts == texts


def _chat_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json with Ouro's special tokens at Ouro's ids (0, 1, 2)."""
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "user", "assistant", "hi", "\n"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_chat_template_and_its_stop_token(checkpoint, tmp_path, capsys):
    tokenizer = load_tokenizer(str(_chat_tokenizer(tmp_path)))
    assert text_generation.stop_token_ids(tokenizer, ["<|im_end|>"], chat=True) == (0, 2)
    assert tokenizer.encode(text_generation.chat_prompt("hi")) == [1, 4, 7, 6, 2, 7, 1, 5, 7]
    code, _, err = _generate(capsys, checkpoint, "--chat", "--prompt", "hi")
    assert code == 2 and "needs a tokenizer with the <|im_end|> token" in err
    code = cli_generate.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--tokenizer",
            str(tmp_path),
            "--chat",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "12",
        ]
    )
    assert code == 0 and "tokens/s" in capsys.readouterr().err


def test_bad_input_exits_with_status_2_and_a_message(checkpoint, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    cases = [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "a", "--exit", "loop:7"], "bad exit policy"),
        (["--prompt", "a", "--max-new-tokens", "500"], "max_position_embeddings"),
        (["--prompt", "a", "--temperature", "-1"], "temperature"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "cannot read --prompt-file"),
        (["--prompt", "a", "--tokenizer", str(tmp_path / "nope.json")], "tokenizer not found"),
    ]
    for args, message in cases:
        code, _, err = _generate(capsys, checkpoint, *args)
        assert code == 2 and message in err, (args, err)
    for path, message in [(tmp_path / "hf", "not a melt_jax checkpoint"), (tmp_path / "none", "not found")]:
        code = cli_generate.main(["--checkpoint", str(path), "--tokenizer", "byte", "--prompt", "a"])
        assert code == 2 and message in capsys.readouterr().err


def test_console_script_reports_without_a_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "melt_jax.inference.cli_generate",
            "--checkpoint",
            str(tmp_path),
            "--tokenizer",
            "byte",
            "--prompt",
            "a",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "melt-generate: error: not a melt_jax checkpoint" in done.stderr and "Traceback" not in done.stderr


def test_melt_eval_on_the_synthetic_task(checkpoint, capsys, monkeypatch):
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--data", "synthetic:10"]
    code = cli_eval.main([*args, "--seq-len", "48", "--batch-size", "4", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert code == 0
    loss, answers = results["loss"], results["answers"]
    assert len(loss["loss_per_loop"]) == 3 and all(np.isfinite(loss["loss_per_loop"]))
    # The synthetic task: perplexity over no token set (its prompts are random digits, its answers one
    # or two tokens); the answer loss and accuracy per loop, loop 0 first, as the held-out evaluation.
    assert "perplexity" not in loss and "perplexity" not in answers
    assert (loss["tokens_scored"], answers["tokens_scored"]) == ("all", "answer")
    assert answers["num_examples"] == 10 and 0 <= answers["accuracy"] <= 1
    assert len(answers["accuracy_per_loop"]) == 3 and answers["accuracy_per_loop"][-1] == answers["accuracy"]
    code = cli_eval.main([*args, "--seq-len", "48", "--batch-size", "4", "--max-batches", "1"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("loop  answer loss  answer accuracy\n0 ") and "perplexity" not in out
    # Blockwise attention chosen at load: the model evaluated computes blockwise, the same losses to
    # float rounding.
    loaded = []
    monkeypatch.setattr(cli_eval, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
    code = cli_eval.main([*args, "--seq-len", "48", "--batch-size", "4", "--json", "--attention", "blockwise"])
    blockwise = json.loads(capsys.readouterr().out)
    assert code == 0 and blockwise["loss"]["loss_per_loop"] == pytest.approx(loss["loss_per_loop"], rel=1e-5)
    assert [model.config.attention for model, _ in loaded] == ["blockwise"]
    monkeypatch.undo()
    # Each document attending only to itself: the same tokens scored, other losses, the same answers.
    code = cli_eval.main([*args, "--seq-len", "48", "--batch-size", "4", "--json", "--isolate-documents"])
    isolated = json.loads(capsys.readouterr().out)
    assert code == 0 and isolated["loss"]["num_tokens"] == loss["num_tokens"]
    assert isolated["loss"]["loss_per_loop"] != pytest.approx(loss["loss_per_loop"], rel=1e-4)
    assert isolated["answers"] == answers
    code = cli_eval.main([*args, "--seq-len", "6"])  # "3*4=" and its answer are 5 tokens, "3+4=*2=4" 8
    assert code == 2 and "more than seq_len 6" in capsys.readouterr().err
    # The assignments form with two operations and a distractor: longer lines than the default's.
    task = ["--form", "assignments", "--hops", "2", "--distractors", "1", "--ops", "+-"]
    code = cli_eval.main([*args, "--seq-len", "48", "--batch-size", "4", *task, "--json"])
    chains = json.loads(capsys.readouterr().out)
    assert code == 0 and chains["loss"]["num_tokens"] > loss["num_tokens"]
    code = cli_eval.main([*args, "--distractors", "2"])
    assert code == 2 and "the chain form has no distractors" in capsys.readouterr().err
    code = cli_eval.main([*args, "--hops", "-1"])
    assert code == 2 and "min_hops must be an integer >= 0" in capsys.readouterr().err
    code = cli_eval.main([*args, "--modulus", "12"])
    assert code == 2 and "modulus must be at most 10" in capsys.readouterr().err
    code = cli_eval.main(["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--data", "notes.txt", "--hops", "1"])
    assert (
        code == 2
        and "--form / --hops / --distractors / --ops / --modulus apply to the synthetic task" in capsys.readouterr().err
    )
