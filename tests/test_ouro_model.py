"""Ouro model invariants that need no reference implementation: parameter counts of the real configs,
cached decoding against the full forward (on the tiny models of each structure, tests/tiny_models.py),
and a compiled program that does not grow with L or T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DEFAULT, DIAGONAL, Structure

from melt_jax.inference import decode_step, forward, prefill
from melt_jax.model import ExitPolicy, OuroConfig, OuroModel, abstract_params, count_params, init_cache


@pytest.mark.parametrize("name, expected", [("ouro-1.4b", 1_434_652_673), ("ouro-2.6b", 2_667_974_657)])
def test_real_config_parameter_counts(name, expected):
    shapes = abstract_params(OuroModel(OuroConfig.preset(name)))
    assert count_params(shapes) == expected
    assert shapes["layers"]["attn"]["q_proj"]["kernel"].shape[0] == OuroConfig.preset(name).num_layers
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(shapes))


def test_cache_bytes_per_token_matches_spec():
    assert OuroConfig.preset("ouro-1.4b").kv_bytes_per_token() == 786_432


def _decode_against_full_forward(config, params, policies, seq=64):
    """Max |cached decode - full forward| over `policies`, relative to the largest logit.

    The prompt's first half is prefilled in one call, the rest fed one token at a time.
    """
    model = OuroModel(config)
    batch = 2
    tokens = jax.random.randint(jax.random.key(7), (batch, seq), 0, config.vocab_size)
    worst = 0.0
    for policy in policies:
        full = forward(model, params, tokens, policy).logits
        cache = init_cache(config, batch, max_length=seq + 16)
        first, cache = prefill(model, params, tokens[:, : seq // 2], cache, policy)
        steps = [first]
        for i in range(seq // 2, seq):
            logits, cache = decode_step(model, params, tokens[:, i], cache, policy)
            steps.append(logits[:, None])
        decoded = jnp.concatenate(steps, axis=1)
        np.testing.assert_array_equal(cache.end_index, [seq, seq])
        worst = max(worst, float(jnp.abs(decoded - full).max() / jnp.abs(full).max()))
    return worst


@pytest.mark.parametrize("structure", DIAGONAL, ids=str)
def test_cached_decode_equals_full_forward(ouro_of, structure):
    # Threshold policies are left out here: a token whose exit mass sits at the threshold may flip
    # loops under float32 rounding noise. They are covered in float64 below.
    ouro = ouro_of(structure)
    # The cached path sums softmax over S_max keys (masked ones included) instead of S; the float32
    # rounding differences this makes grow through 2 layers and up to 4 loops to ~1e-5 of the logit
    # scale (the float64 test shows they are rounding, not a bug). An early exit is a second program;
    # with one loop it would be the last loop's again.
    policies = [ExitPolicy.last()] + [ExitPolicy.at_loop(1)] * (structure.loops > 1)
    assert _decode_against_full_forward(ouro.config, ouro.params, policies) < 1e-4


def test_cached_decode_equals_full_forward_float64(ouro_of):
    ouro = ouro_of(DEFAULT)
    with jax.enable_x64(True):
        config = ouro.config.replace(dtype="float64", param_dtype="float64")
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), ouro.params)
        policies = [ExitPolicy.last(), ExitPolicy.upstream_default(config), ExitPolicy.weighted()]
        assert _decode_against_full_forward(config, params, policies) < 1e-11


def test_step_logits_only_when_asked(ouro_of):
    ouro = ouro_of(Structure(4, 4))
    config, params = ouro.config, ouro.params
    model = OuroModel(config)
    tokens = jnp.ones((1, 5), jnp.int32)
    out = forward(model, params, tokens)
    assert out.loop_logits is None and out.logits.shape == (1, 5, config.vocab_size)
    steps = forward(model, params, tokens, exit_policy=None, return_loop_logits=True)
    assert steps.logits is None and steps.loop_logits.shape == (4, 1, 5, config.vocab_size)
    np.testing.assert_allclose(steps.loop_logits[-1], out.logits, atol=1e-6)


def _program_size(num_layers, num_loops):
    config = OuroConfig.preset("tiny", num_hidden_layers=num_layers, total_ut_steps=num_loops)
    model = OuroModel(config)
    params = abstract_params(model)
    cache = jax.eval_shape(lambda: init_cache(config, 1, 16))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    forward = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c).logits)
    return len(forward.lower(params, tokens, cache).as_text())


def test_compiled_program_does_not_grow_with_layers_or_loops():
    base = _program_size(1, 1)
    # Only constants such as loop trip counts and shapes may differ, not the number of operations.
    for layers, loops in [(4, 1), (1, 8), (6, 8)]:
        assert abs(_program_size(layers, loops) - base) < 0.02 * base


def test_bfloat16_policy_tracks_float32(ouro_of):
    ouro = ouro_of(Structure(4, 4))
    config, params = ouro.config, ouro.params
    model32 = OuroModel(config)
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, config.vocab_size)
    ref = forward(model32, params, tokens).logits
    config16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = forward(OuroModel(config16), params16, tokens)
    assert out.logits.dtype == jnp.bfloat16 and out.loop_hidden.dtype == jnp.bfloat16
    err = float(jnp.abs(out.logits.astype(jnp.float32) - ref).max())
    assert err < 0.05 * float(jnp.abs(ref).max())


def test_prefill_rejects_a_prompt_longer_than_the_cache():
    config = OuroConfig.preset("tiny")
    model = OuroModel(config)
    params = abstract_params(model)
    with pytest.raises(ValueError, match="longer than the cache"):
        prefill(model, params, jnp.ones((1, 9), jnp.int32), init_cache(config, 1, 8))
    with pytest.raises(ValueError, match="batch 2"):
        prefill(model, params, jnp.ones((2, 4), jnp.int32), init_cache(config, 1, 8))
