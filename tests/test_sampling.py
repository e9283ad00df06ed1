"""Generation (melt_jax/inference/generation.py, sampling.py) against teacher-forced forwards and
token-by-token decoding, on the tiny random Ouro and MELT models of generation_fixtures.py.

Prompt lengths 7, 2, 5 and 13 cross MELT's chunk boundaries (chunk size 4) and all fall in the
16-token bucket, as does MAX_NEW, so every call with 3 or 4 prompts shares one compiled program per
setting, and every prompt-alone call another.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_fixtures import tiny_model

from melt_jax.errors import GenerationError
from melt_jax.inference import (
    LENGTH,
    STOP_TOKEN,
    STOPPED,
    SamplingConfig,
    decode_step,
    forward,
    generate,
    generation_run,
    loop_logits,
)
from melt_jax.inference.sampling import TokenRule, next_tokens, top_k_filter, top_p_filter
from melt_jax.model import ExitPolicy, init_cache

PROMPTS = [[11, 200, 3, 45, 6, 78, 9], [250, 8], [100, 101, 102, 103, 104], list(range(30, 43))]
MAX_NEW = 12
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW)
SAMPLED = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=MAX_NEW, seed=3)
# The event JAX records for every XLA compilation that it does not find in its in-memory caches.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
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
    run = generation_run(model, params, PROMPTS, GREEDY, segment_steps=5)
    for tokens in run:
        seen.append([len(t) for t in tokens])
        if len(seen) == 3:
            run.finish([len(t) >= 4 for t in tokens])  # stop every row after segment 2
    result = run.result()
    assert seen[:2] == [[1] * 4, [6] * 4]
    assert result.tokens == [t[:11] for t in _greedy("ouro").tokens]
    assert result.stop_reasons == [STOPPED] * 4

    streamed = generation_run(model, params, PROMPTS, GREEDY, segment_steps=5)
    segments = list(streamed)  # iterated to the end, no row finished early
    assert len(segments) > 2 and streamed.result().tokens == _greedy("ouro").tokens


def test_sampling_with_a_seed_is_reproducible():
    model, params = tiny_model("melt")
    first = generate(model, params, PROMPTS, SAMPLED)
    again = generate(model, params, PROMPTS, SAMPLED)
    other = generate(model, params, PROMPTS, dataclasses.replace(SAMPLED, seed=4))
    assert first.tokens == again.tokens
    assert all(a != b for a, b in zip(first.tokens, other.tokens))
    assert first.tokens != _greedy("melt").tokens


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_a_sampled_prompt_gets_the_same_tokens_alone_and_anywhere_in_a_batch(kind):
    model, params = tiny_model(kind)
    prompt, other = PROMPTS[0], PROMPTS[1:]
    alone = generate(model, params, [prompt], SAMPLED).tokens[0]
    batch = generate(model, params, [prompt, other[0], prompt, other[1]], SAMPLED).tokens
    assert batch[0] == batch[2] == alone
    assert batch[1] == generate(model, params, [other[0]], SAMPLED).tokens[0]
    # Per-prompt seeds: a prompt with seed 4 in a batch gets what it gets alone with seed 4.
    seeded = generate(model, params, [other[2], prompt, prompt], SAMPLED, seeds=[3, 3, 4]).tokens
    alone_4 = generate(model, params, [prompt], dataclasses.replace(SAMPLED, seed=4)).tokens[0]
    assert seeded[1] == alone and seeded[2] == alone_4 != alone


@contextlib.contextmanager
def _counting_compiles():
    """Yields a list that collects the name of every program XLA compiles inside the block.

    JAX records BACKEND_COMPILE_EVENT through jax.monitoring each time it compiles a program it has not
    compiled before in this process, whichever way it is reached (a jitted call, `lower().compile()`
    as `generate` does, or a small op such as `jnp.all` on the host side); a jitted function's
    `_cache_size()` is private and only counts its own calls. Should JAX rename the event, the
    test's check that a new bucket does compile fails instead of passing with nothing counted."""
    names = []

    def listener(event, seconds, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_other_batch_sizes_and_max_new_tokens_in_the_same_buckets_compile_nothing():
    # Batches of 3 and 4 share the batch bucket 4, max_new_tokens 5 and 7 the length bucket 16.
    model, params = tiny_model("ouro")
    sampling = SamplingConfig(temperature=0.9, top_k=40, max_new_tokens=5)  # compiled by no other test

    def streamed(prompts, sampling):
        run = generation_run(model, params, prompts, sampling, segment_steps=2)
        for rows in run:
            run.finish([len(row) > 5 for row in rows])
        return run.result()

    with _counting_compiles() as first:
        streamed(PROMPTS[:3], sampling)
    with _counting_compiles() as same_buckets:
        for prompts, max_new in [(PROMPTS, 7), (PROMPTS[:3], 7), (PROMPTS[1:], 5), (PROMPTS[:2][::-1] * 2, 6)]:
            streamed(prompts, dataclasses.replace(sampling, max_new_tokens=max_new, seed=1))
    with _counting_compiles() as next_bucket:
        streamed(PROMPTS + PROMPTS[:1], sampling)  # 5 prompts: bucket 8
    assert first and next_bucket  # the count sees compilations
    assert same_buckets == []


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_bucketed_sizes_give_the_tokens_of_exact_sizes(kind):
    # 3 prompts, the longest 7, max_new_tokens 7: 4 rows x 16 x 16 bucketed, 3 x 7 x 7 exact.
    model, params = tiny_model(kind)
    for sampling in (dataclasses.replace(GREEDY, max_new_tokens=7), dataclasses.replace(SAMPLED, max_new_tokens=7)):
        bucketed = generate(model, params, PROMPTS[:3], sampling)
        exact = generate(model, params, PROMPTS[:3], sampling, buckets=None, batch_buckets=None)
        assert bucketed.tokens == exact.tokens and all(len(t) == 7 for t in exact.tokens)
        assert bucketed.stop_reasons == exact.stop_reasons == [LENGTH] * 3


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
        ((ouro, ouro_params, [[1, 2], [3]]), {"seeds": [1]}, "one integer per prompt"),
        ((ouro, ouro_params, [[1, 2]]), {"seeds": [2**31]}, "32-bit integer"),
        ((ouro, ouro_params, [[1, 2]]), {"batch_buckets": [4, 0]}, "batch_buckets must be a positive integer"),
        ((ouro, ouro_params, [[1, 2]]), {"buckets": []}, "buckets must be a non-empty list"),
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
