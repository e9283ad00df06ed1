"""The lm-evaluation-harness adapter (melt_jax/inference/lm_eval_adapter.py): its log-likelihoods against a direct
forward, generate_until against the sampler, and tasks defined in local YAML files run end to end
through `lm_eval.simple_evaluate`, offline."""

import json
import pathlib
import shlex
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_fixtures import tiny_model
from lm_eval.api.instance import Instance

from melt_jax.checkpoint import save_params
from melt_jax.data import ByteTokenizer
from melt_jax.errors import GenerationError
from melt_jax.inference import SamplingConfig, forward, generate, lm_eval_adapter, prefill
from melt_jax.inference.lm_eval_adapter import MeltJaxLM
from melt_jax.model import init_cache

BATCH = 4
TOKENIZER = ByteTokenizer()
# (context, continuation): an empty context, a trailing space that moves to the continuation, a
# context longer than the adapter's max_length (24) that is cut from the left.
PAIRS = [("", "hello"), ("The cat ", "sat"), ("x=3;y=x+1;", " y?4"), ("a" * 30 + "b", "cd"), ("q", " r s t")]


def _requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def _direct_scores(kind, rows):
    """(sum log p, all greedy) of the last `n` tokens of each (ids, n), from one padded forward of the
    model (Ouro: full forward; MELT: chunked prefill with the config's chunk size)."""
    model, params = tiny_model(kind)
    width = max(len(ids) for ids, _ in rows)
    tokens = jnp.array([ids + [0] * (width - len(ids)) for ids, _ in rows])
    if kind == "ouro":
        logits = forward(model, params, tokens).logits
    else:
        cache = init_cache(model.config, len(rows), width)
        logits, _ = prefill(model, params, tokens, cache, chunk_size=model.config.chunk_size)
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    scores = []
    for b, (ids, n) in enumerate(rows):
        positions = range(len(ids) - n - 1, len(ids) - 1)
        total = sum(log_probs[b, p, ids[p + 1]] for p in positions)
        greedy = all(log_probs[b, p].argmax() == ids[p + 1] for p in positions)
        scores.append((float(total), bool(greedy)))
    return scores


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_loglikelihood_equals_a_direct_forward(kind):
    model, params = tiny_model(kind)
    lm = MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=BATCH, max_length=24)
    results = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    rows = []
    for context, continuation in PAIRS:
        stripped = context.rstrip(" ")
        ids = (list(stripped.encode()) or [TOKENIZER.eos_id]) + list((context[len(stripped) :] + continuation).encode())
        rows.append((ids[-25:], len((context[len(stripped) :] + continuation).encode())))
    expected = _direct_scores(kind, rows)
    np.testing.assert_allclose([r[0] for r in results], [e[0] for e in expected], rtol=1e-5)
    assert [r[1] for r in results] == [e[1] for e in expected]


def test_greedy_flag_of_the_sampler_own_continuation():
    # Ouro only: MELT scores a continuation in chunks, which its one-token decode does not do.
    model, params = tiny_model("ouro")
    lm = MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=BATCH)
    context = list(b"x=3;y=x+1;")
    greedy = generate(model, params, [context], SamplingConfig(max_new_tokens=12)).tokens[0][:3]
    other = greedy[:2] + [(greedy[2] + 1) % 256]
    assert [flag for _, flag in lm._score_pairs([(context, greedy), (context, other)])] == [True, False]


def test_loglikelihood_rolling_of_a_short_text_is_one_forward_after_eos():
    model, params = tiny_model("ouro")
    lm = MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=BATCH)
    text = "rolling windows"
    (total,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    ids = [TOKENIZER.eos_id] + list(text.encode())
    np.testing.assert_allclose(total, _direct_scores("ouro", [(ids, len(ids) - 1)])[0][0], rtol=1e-5)
    # Longer than max_length: windows still predict every token exactly once.
    short = MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=BATCH, max_length=6)
    (windowed,) = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert np.isfinite(windowed) and windowed != pytest.approx(total)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string():
    model, params = tiny_model("ouro")
    lm = MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=BATCH)
    contexts = ["k=3,q=k+4;q?", "hello", "abc", "x=1;x?"]
    full = generate(model, params, [list(c.encode()) for c in contexts], SamplingConfig(max_new_tokens=12)).tokens
    texts = [TOKENIZER.decode(t, skip_special_tokens=False) for t in full]
    stop = texts[0][4]  # a character the first row produces mid-way
    outputs = lm.generate_until(
        _requests("generate_until", [(c, {"until": [stop], "max_gen_toks": 12}) for c in contexts])
    )
    assert outputs == [t.split(stop, 1)[0] for t in texts]
    assert len(outputs[0]) == 4


def test_sampled_generate_until_gives_a_request_its_own_seed_and_repeats_the_next_ones():
    """A request's text does not depend on its batch; the k-th copy of a request draws with seed + k."""
    model, params = tiny_model("ouro")
    lm = MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=BATCH)
    gen_kwargs = {"until": ["never"], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0, "seed": 5}
    contexts = ["hello", "abc", "hello", "x=1;x?", "hello"]  # two batches of BATCH, "hello" three times
    outputs = lm.generate_until(_requests("generate_until", [(c, gen_kwargs) for c in contexts]))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, stop_token_ids=(TOKENIZER.eos_id,))
    alone = generate(model, params, [list(b"hello")] * 3, sampling, seeds=[5, 6, 7]).tokens
    texts = [TOKENIZER.decode(t, skip_special_tokens=False) for t in alone]
    assert [outputs[0], outputs[2], outputs[4]] == texts
    assert len(set(texts)) == 3


def test_bad_model_arguments(tmp_path):
    model, params = tiny_model("ouro")
    with pytest.raises(GenerationError, match="batch_size"):
        MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=0)
    with pytest.raises(GenerationError, match="bad exit policy"):
        MeltJaxLM(checkpoint=str(_checkpoint(tmp_path)), exit="loop:9")


def _checkpoint(path):
    model, params = tiny_model("ouro")
    save_params(path / "ckpt", model.config, params)
    return path / "ckpt"


TASKS = """
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
---
task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/generate.jsonl
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
---
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/rolling.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
"""


def test_local_file_tasks_run_through_lm_eval(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, params = tiny_model("ouro")
    checkpoint = _checkpoint(tmp_path)

    questions = ["1+1=", "k=2;k?", "abc", "xyz"]
    choices = [["2", "3", "11"], ["2", "0", "k"], ["d", "e", "f"], ["w", "a", "z"]]
    rows = [
        (list(q.encode()) + list((" " + c).encode()), len((" " + c).encode()))
        for q, cs in zip(questions, choices)
        for c in cs
    ]
    scores = np.array([s for s, _ in _direct_scores("ouro", rows)]).reshape(4, 3)
    labels = [0, 1, 2, 0]
    expected_acc = np.mean(scores.argmax(axis=1) == labels)

    generated = generate(model, params, [list(q.encode()) for q in questions], SamplingConfig(max_new_tokens=12)).tokens
    answers = [TOKENIZER.decode(t, skip_special_tokens=False).split("\n", 1)[0] for t in generated]
    answers[1] = answers[3] = "not what the model says"

    data = tmp_path / "data"
    data.mkdir()
    records = {
        "choice": [{"question": q, "choices": c, "label": l} for q, c, l in zip(questions, choices, labels)],
        "generate": [{"question": q, "answer": a} for q, a in zip(questions, answers)],
        "rolling": [{"text": "a small text to score"}, {"text": "and another one"}],
    }
    for name, docs in records.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i, task in enumerate(TASKS.format(data=data).split("---")):
        (tasks / f"task_{i}.yaml").write_text(textwrap.dedent(task).strip() + "\n")

    results = lm_eval.simple_evaluate(
        model="melt_jax",
        model_args=f"checkpoint={checkpoint},tokenizer=byte",
        tasks=["tiny_choice", "tiny_generate", "tiny_rolling"],
        batch_size=BATCH,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    assert results["tiny_choice"]["acc,none"] == pytest.approx(expected_acc)
    assert results["tiny_generate"]["exact_match,none"] == pytest.approx(0.5)
    assert (
        np.isfinite(results["tiny_rolling"]["word_perplexity,none"])
        and results["tiny_rolling"]["word_perplexity,none"] > 1
    )


def test_generation_arguments_follow_lm_eval():
    model, params = tiny_model("ouro")
    lm = MeltJaxLM.from_model(model, params, TOKENIZER, batch_size=BATCH, max_gen_toks=7)
    sampling, until = lm._sampling({"until": "\n\n", "do_sample": True, "temperature": 0.7, "top_k": 5.0})
    assert (sampling.temperature, sampling.top_k, sampling.max_new_tokens) == (0.7, 5, 7)
    assert until == ["\n\n", "<|endoftext|>"] and sampling.stop_token_ids == (TOKENIZER.eos_id,)
    greedy, _ = lm._sampling({"until": ["\n"], "temperature": 0.7, "do_sample": False, "max_gen_toks": 3})
    assert (greedy.temperature, greedy.max_new_tokens, greedy.stop_token_ids) == (0.0, 3, (10, TOKENIZER.eos_id))


def test_the_docs_local_task_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/inference.md's `melt-lm-eval` command with the local task the repository ships
    (examples/lm_eval_tasks), CKPT a tiny checkpoint, run from the checkout's root."""
    root = pathlib.Path(__file__).resolve().parent.parent
    docs = (root / "docs" / "inference.md").read_text()
    (command,) = [line for line in docs.splitlines() if "--include_path examples/lm_eval_tasks" in line]
    checkpoint = tmp_path / "ckpt"
    model, params = tiny_model("ouro")
    save_params(checkpoint, model.config, jax.tree.map(np.asarray, params))
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", shlex.split(command.replace("CKPT", str(checkpoint))))
    assert lm_eval_adapter.main() == 0
    table = capsys.readouterr().out
    assert "|melt_example|" in table and "acc" in table
