"""Generation (melt_jax/inference/generation.py, sampling.py) against teacher-forced forwards and
token-by-token decoding, on the tiny random Ouro and MELT models of generation_fixtures.py.

Prompt lengths 7, 2, 5 and 13 cross MELT's chunk boundaries (chunk size 4) and all fall in the
16-token bucket, so every batch-of-4 call shares one compiled program per setting, and every
prompt-alone call another.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_fixtures import tiny_model

from melt_jax.errors import GenerationError
from melt_jax.inference.decoding import decode_step, forward
from melt_jax.inference.evaluation import loop_logits
from melt_jax.inference.generation import LENGTH, STOP_TOKEN, STOPPED, generate
from melt_jax.inference.sampling import SamplingConfig, TokenRule, next_tokens, top_k_filter, top_p_filter
from melt_jax.model.cache import init_cache
from melt_jax.model.exit import ExitPolicy

PROMPTS = [[11, 200, 3, 45, 6, 78, 9], [250, 8], [100, 101, 102, 103, 104], list(range(30, 43))]
MAX_NEW = 12
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW)
# Every prediction of a generated token: the argmax of the logits at the position before it.
_teacher_forced = jax.jit(loop_logits, static_argnames=("model", "chunk_size"))


def _padded(rows: list[list[int]]) -> jnp.ndarray:
    """rows right-padded with 0 to one [B, S] batch (causal: padding changes nothing before it)."""
    width = max(map(len, rows))
    return jnp.array([row + [0] * (width - len(row)) for row in rows])


def _argmax_continuations(logits, prompts, outputs) -> list[list[int]]:
    """Per row, the argmax of logits [B, S, V] at the positions that predict the generated tokens."""
    predicted = np.asarray(jnp.argmax(logits, axis=-1))
    return [predicted[b, len(p) - 1 : len(p) + len(o) - 1].tolist() for b, (p, o) in enumerate(zip(prompts, outputs))]


@functools.cache
def _greedy(kind: str, chunk_size=None, exit_policy=ExitPolicy()):
    model, params = tiny_model(kind)
    return generate(model, params, PROMPTS, GREEDY, chunk_size=chunk_size, exit_policy=exit_policy)


def test_ouro_greedy_equals_argmax_of_teacher_forced_forward():
    model, params = tiny_model("ouro")
    result = _greedy("ouro")
    assert result.stop_reasons == [LENGTH] * 4 and all(len(t) == MAX_NEW for t in result.tokens)
    logits = _teacher_forced(model, params, _padded([p + t for p, t in zip(PROMPTS, result.tokens)]))[-1]
    assert _argmax_continuations(logits, PROMPTS, result.tokens) == result.tokens


def test_melt_greedy_with_prefill_chunk_one_equals_teacher_forced_chunk_one_forward():
    model, params = tiny_model("melt")
    result = _greedy("melt", chunk_size=1)
    sequences = _padded([p + t for p, t in zip(PROMPTS, result.tokens)])
    logits = _teacher_forced(model, params, sequences, chunk_size=1)[-1]
    assert _argmax_continuations(logits, PROMPTS, result.tokens) == result.tokens


def test_melt_generation_with_prefill_chunk_one_equals_token_by_token_decoding():
    model, params = tiny_model("melt")
    result = _greedy("melt", chunk_size=1)
    for prompt, generated in zip(PROMPTS, result.tokens):
        cache = init_cache(model.config, 1, 32)
        for token in prompt:  # the prompt too, one token at a time
            logits, cache = decode_step(model, params, jnp.array([token]), cache)
        decoded = []
        for _ in range(MAX_NEW):
            decoded.append(int(jnp.argmax(logits[0])))
            logits, cache = decode_step(model, params, jnp.array(decoded[-1:]), cache)
        assert decoded == generated


def test_melt_prefill_chunk_size_changes_the_prompt_semantics():
    # Chunks of 4 see loop-t rows of their own chunk, chunks of 1 only final rows: different numbers.
    assert _greedy("melt").tokens != _greedy("melt", chunk_size=1).tokens


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_padded_batch_gives_each_prompt_what_it_gives_alone(kind):
    model, params = tiny_model(kind)
    batch = _greedy(kind)
    for prompt, tokens in zip(PROMPTS, batch.tokens):
        alone = generate(model, params, [prompt], GREEDY)
        assert alone.tokens[0] == tokens


def test_ouro_exit_choice_at_generation_time():
    model, params = tiny_model("ouro")
    at_first = _greedy("ouro", exit_policy=ExitPolicy.at_loop(0))
    sequences = _padded([p + t for p, t in zip(PROMPTS, at_first.tokens)])
    logits = _teacher_forced(model, params, sequences)[0]
    assert _argmax_continuations(logits, PROMPTS, at_first.tokens) == at_first.tokens
    assert at_first.tokens != _greedy("ouro").tokens

    policy = ExitPolicy.at_threshold(0.5)
    by_threshold = _greedy("ouro", exit_policy=policy)
    sequences = _padded([p + t for p, t in zip(PROMPTS, by_threshold.tokens)])
    out = forward(model, params, sequences, policy)
    assert len(np.unique(np.asarray(out.exit_loops))) > 1  # tokens do exit at different loops
    assert _argmax_continuations(out.logits, PROMPTS, by_threshold.tokens) == by_threshold.tokens


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_stop_tokens_end_generation(kind):
    model, params = tiny_model(kind)
    full = _greedy(kind).tokens
    first, second = full[0][3], full[2][5]  # stop on tokens produced mid-way by two rows
    result = generate(model, params, PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, stop_token_ids=(first, second)))
    for row, tokens, reason in zip(full, result.tokens, result.stop_reasons):
        hits = [i for i, t in enumerate(row) if t in (first, second)]
        if hits:
            assert (tokens, reason) == (row[: hits[0]], STOP_TOKEN)
        else:
            assert (tokens, reason) == (row, LENGTH)
    assert result.stop_reasons[0] == result.stop_reasons[2] == STOP_TOKEN


def test_segments_stream_the_same_tokens_and_can_stop_rows():
    model, params = tiny_model("ouro")
    seen = []

    def on_segment(tokens):
        seen.append([len(t) for t in tokens])
        return [len(t) >= 4 for t in tokens] if len(seen) == 3 else None  # stop every row after segment 2

    result = generate(model, params, PROMPTS, GREEDY, segment_steps=5, on_segment=on_segment)
    assert seen[:2] == [[1] * 4, [6] * 4]
    assert result.tokens == [t[:11] for t in _greedy("ouro").tokens]
    assert result.stop_reasons == [STOPPED] * 4

    streamed = generate(model, params, PROMPTS, GREEDY, segment_steps=5, on_segment=lambda tokens: None)
    assert streamed.tokens == _greedy("ouro").tokens


def test_sampling_with_a_seed_is_reproducible():
    model, params = tiny_model("melt")
    sampling = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=MAX_NEW, seed=3)
    first = generate(model, params, PROMPTS, sampling)
    again = generate(model, params, PROMPTS, sampling)
    other = generate(model, params, PROMPTS, SamplingConfig(**{**sampling.__dict__, "seed": 4}))
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens
    assert first.tokens != _greedy("melt").tokens


def test_token_filters():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    assert np.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True], [False, False, False, False]]
    # Row 0: p = (0.09, 0.67, 0.24, 0.03); 0.67 < 0.8 so the second most likely token is kept too.
    kept = ~np.isinf(top_p_filter(logits, 0.8))
    assert kept[0].tolist() == [False, True, True, False] and kept[1].tolist() == [False, False, True, False]
    keys = jax.random.split(jax.random.key(0), 2)
    assert next_tokens(logits, keys, TokenRule()).tolist() == [1, 2]
    draws = jax.vmap(lambda k: next_tokens(logits, jax.random.split(k, 2), TokenRule(1.0, top_k=2)))(
        jax.random.split(jax.random.key(1), 200)
    )
    assert set(np.unique(draws[:, 0]).tolist()) == {1, 2}  # only the two largest are ever drawn
    assert next_tokens(logits, keys, TokenRule(vocab_limit=2)).tolist() == [1, 0]


def test_bad_input_is_refused_before_compiling():
    ouro, ouro_params = tiny_model("ouro")
    melt, melt_params = tiny_model("melt")
    vocab, limit = ouro.config.vocab_size, ouro.config.max_position_embeddings
    cases = [
        ((object(), ouro_params, [[1, 2]]), {}, "expected a melt_jax model"),
        ((ouro, ouro_params, [[1, vocab]]), {}, "outside the vocabulary"),
        ((ouro, ouro_params, [[1, -3]]), {}, "outside the vocabulary"),
        ((ouro, ouro_params, [[1, 2], []]), {}, "prompt 1 is empty"),
        ((ouro, ouro_params, []), {}, "non-empty list of prompts"),
        ((ouro, ouro_params, [[1] * (limit - 4)]), {}, "max_position_embeddings"),
        ((ouro, melt_params, [[1, 2]]), {}, "params are a MELT checkpoint"),
        ((melt, ouro_params, [[1, 2]]), {}, "params are an Ouro checkpoint"),
        ((ouro, ouro_params, [[1, 2]]), {"exit_policy": ExitPolicy.at_loop(5)}, "exit loop 5 is out of range"),
        ((melt, melt_params, [[1, 2]]), {"chunk_size": 0}, "chunk_size must be a positive integer"),
        ((ouro, ouro_params, [[1, 2]]), {"sampling": SamplingConfig(stop_token_ids=(vocab,))}, "stop token ids"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(GenerationError, match=message):
            generate(*args, **kwargs)
    wrong_width = jax.tree.map(lambda x: x, ouro_params)
    wrong_width["lm_head"] = {"kernel": np.zeros((32, vocab + 1), np.float32)}
    with pytest.raises(GenerationError, match="lm_head.*kernel.*shape"):
        generate(ouro, wrong_width, [[1, 2]])
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(GenerationError):
            SamplingConfig(**bad)
