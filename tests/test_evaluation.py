"""Evaluation (melt_jax/inference/evaluation.py): per-loop losses and step logits against the models' own
forwards, MELT's chunked semantics with padding, and teacher-forced accuracy against greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_fixtures import tiny_model

from melt_jax.inference import (
    SamplingConfig,
    answer_accuracy,
    evaluate_dataset,
    forward,
    generate,
    loop_answer_matches,
    loop_logits,
    loss_sums,
    per_loop_losses,
    prefill,
)
from melt_jax.model import ExitPolicy, init_cache, next_token_cross_entropy

TOKENS = np.random.default_rng(0).integers(0, 258, size=(4, 14)).astype(np.int32)  # 14: not a multiple of 4
MASK = (np.random.default_rng(1).random((4, 14)) < 0.7).astype(np.float32)

_step_logits = jax.jit(loop_logits, static_argnames=("model", "chunk_size"))
_loss_sums = jax.jit(loss_sums, static_argnames=("model", "exit_policy", "chunk_size"))
_per_loop = jax.jit(per_loop_losses, static_argnames=("model", "chunk_size"))


def _masked_mean_ce(logits, tokens, mask):
    """Mean CE of each token's prediction weighted by mask (column 0 has no prediction)."""
    per_token = np.asarray(next_token_cross_entropy(logits, jnp.asarray(tokens)))  # [B, S-1]
    return (per_token * mask[:, 1:]).sum() / mask[:, 1:].sum()


def test_ouro_step_logits_and_per_loop_losses_match_the_forward():
    model, params = tiny_model("ouro")
    expected = forward(model, params, jnp.asarray(TOKENS), exit_policy=None, return_loop_logits=True).loop_logits
    np.testing.assert_allclose(_step_logits(model, params, TOKENS), expected, atol=1e-5, rtol=0)
    losses = _per_loop(model, params, TOKENS, MASK)
    assert losses.shape == (model.config.num_loops,)
    np.testing.assert_allclose(losses, [_masked_mean_ce(x, TOKENS, MASK) for x in expected], rtol=1e-5)

    # A per-token policy (projected separately) and a fixed-loop one (read from the per-loop sums).
    for policy in (ExitPolicy.at_threshold(0.5), ExitPolicy.at_loop(1)):
        sums = _loss_sums(model, params, TOKENS, MASK, policy)
        chosen = forward(model, params, jnp.asarray(TOKENS), exit_policy=policy).logits
        np.testing.assert_allclose(sums.policy / sums.weight, _masked_mean_ce(chosen, TOKENS, MASK), rtol=1e-5)
        assert float(sums.weight) == MASK[:, 1:].sum()
    with pytest.raises(ValueError, match="exit loop 9 is out of range"):
        _loss_sums(model, params, TOKENS, MASK, ExitPolicy.at_loop(9))


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_melt_step_logits_are_the_chunked_inference_values(chunk_size):
    model, params = tiny_model("melt")
    chunk = chunk_size or model.config.chunk_size  # 4: the 14 tokens are padded to 16 inside
    cache = init_cache(model.config, TOKENS.shape[0], TOKENS.shape[1])
    expected, _ = prefill(model, params, jnp.asarray(TOKENS), cache, chunk_size=chunk)  # last chunk shorter
    logits = _step_logits(model, params, TOKENS, chunk_size=chunk_size)
    assert logits.shape == (model.config.num_loops, *TOKENS.shape, model.config.vocab_size)
    # Logits up to ~8: the padded and the shorter last chunk differ by reduction order (~2e-6 seen).
    np.testing.assert_allclose(logits[-1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_answer_accuracy_is_greedy_exact_match(kind):
    model, params = tiny_model(kind)
    prompts = [list(p) for p in TOKENS[:, :9]]
    greedy = generate(model, params, prompts, SamplingConfig(max_new_tokens=12)).tokens
    # MELT decodes answer tokens one at a time but scores them in chunks: its answers are one token
    # long (as on the synthetic task), predicted from the prompt alone under both.
    length = 4 if kind == "ouro" else 1
    answers = [g[:length] for g in greedy]
    answers[1] = [(answers[1][0] + 1) % 258] + answers[1][1:]  # wrong first token
    answers[3] = answers[3][:-1] + [(answers[3][-1] + 1) % 258]  # wrong last token
    tokens = np.array([p + a for p, a in zip(prompts, answers)], np.int32)
    answer_mask = np.zeros_like(tokens, np.float32)
    answer_mask[:, 9:] = 1
    correct = jax.jit(answer_accuracy, static_argnames=("model",))(model, params, tokens, answer_mask)
    assert correct.tolist() == [True, False, True, False]
    # Every loop's matches (what the trainer reports); the last loop is the default policy's.
    per_loop = jax.jit(loop_answer_matches, static_argnames=("model",))(model, params, tokens, answer_mask)
    assert per_loop.shape == (model.config.num_loops, 4) and per_loop[-1].tolist() == correct.tolist()
    for t in range(model.config.num_loops):
        at_t = jax.jit(answer_accuracy, static_argnames=("model", "exit_policy"))
        assert per_loop[t].tolist() == at_t(model, params, tokens, answer_mask, ExitPolicy.at_loop(t)).tolist()


def test_evaluate_dataset_combines_batches():
    model, params = tiny_model("ouro")
    answer_mask = np.zeros_like(MASK)
    answer_mask[:, -1] = 1
    first = {"tokens": TOKENS, "loss_mask": MASK, "answer_mask": answer_mask}
    second = {"tokens": TOKENS[::-1], "answer_mask": answer_mask, "row_mask": np.array([1, 1, 0, 0], bool)}
    result = evaluate_dataset(model, params, [first, second])
    full_mask = np.ones_like(MASK)
    losses = [
        (
            _per_loop(model, params, TOKENS, MASK) * MASK[:, 1:].sum()
            + _per_loop(model, params, TOKENS[::-1], full_mask) * 4 * 13
        )
        / (MASK[:, 1:].sum() + 4 * 13)
    ]
    np.testing.assert_allclose(result["loss_per_loop"], losses[0], rtol=1e-5)
    assert result["loss"] == pytest.approx(result["loss_per_loop"][-1])  # the default policy: last loop
    assert result["perplexity_per_loop"] == pytest.approx(np.exp(result["loss_per_loop"]))
    assert result["num_tokens"] == MASK[:, 1:].sum() + 4 * 13 and result["num_examples"] == 6
    correct = jax.jit(answer_accuracy, static_argnames=("model",))
    hits = (
        correct(model, params, TOKENS, answer_mask).sum() + correct(model, params, TOKENS[::-1], answer_mask)[:2].sum()
    )
    assert result["accuracy"] == pytest.approx(float(hits) / 6)

    with pytest.raises(ValueError, match="outside the vocabulary"):
        evaluate_dataset(model, params, [{"tokens": TOKENS + 300}])
    with pytest.raises(ValueError, match="no batches"):
        evaluate_dataset(model, params, [])


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_evaluate_dataset_with_segment_ids_scores_each_document_alone(kind):
    """Packed documents with their segment ids score as the same documents each in a row of its own;
    without the ids the second document sees the first, and its losses change."""
    model, params = tiny_model(kind)
    first, second = TOKENS[0, :6], TOKENS[1, :8]
    packed = np.concatenate([first, second])[None]  # [1, 14]
    segment_ids = np.array([[1] * 6 + [2] * 8], np.int32)
    packed_mask = np.ones((1, 14), np.float32)
    packed_mask[0, 6] = 0  # the first token of a document has no prediction within it
    alone = np.zeros((2, 14), np.int32)  # each document at the start of its own row, padded
    alone[0, :6], alone[1, :8] = first, second
    alone_mask = np.zeros((2, 14), np.float32)
    alone_mask[0, :6], alone_mask[1, :8] = 1, 1

    isolated = evaluate_dataset(
        model, params, [{"tokens": packed, "loss_mask": packed_mask, "segment_ids": segment_ids}], chunk_size=2
    )
    separate = evaluate_dataset(model, params, [{"tokens": alone, "loss_mask": alone_mask}], chunk_size=2)
    np.testing.assert_allclose(isolated["loss_per_loop"], separate["loss_per_loop"], rtol=1e-5)
    assert isolated["num_tokens"] == separate["num_tokens"] == 12
    together = evaluate_dataset(model, params, [{"tokens": packed, "loss_mask": packed_mask}], chunk_size=2)
    assert np.max(np.abs(np.subtract(together["loss_per_loop"], separate["loss_per_loop"]))) > 1e-3
