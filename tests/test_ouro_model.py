"""Ouro model invariants that need no reference implementation: parameter counts of the real configs,
cached decoding against the full forward, and a compiled program that does not grow with L or T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melt_jax.cache import init_cache
from melt_jax.config import OuroConfig
from melt_jax.decoding import decode_step, forward, prefill
from melt_jax.exit import ExitPolicy
from melt_jax.ouro import OuroModel
from melt_jax.params import abstract_params, count_params, init_params


def _random_params(model, seed=0, scale=0.3):
    """Initialised params plus noise, so norms, gate and every projection are far from their init."""
    params = init_params(model, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("name, expected", [("ouro-1.4b", 1_434_652_673), ("ouro-2.6b", 2_667_974_657)])
def test_real_config_parameter_counts(name, expected):
    shapes = abstract_params(OuroModel(OuroConfig.preset(name)))
    assert count_params(shapes) == expected
    assert shapes["layers"]["attn"]["q_proj"]["kernel"].shape[0] == OuroConfig.preset(name).num_layers
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(shapes))


def test_cache_bytes_per_token_matches_spec():
    assert OuroConfig.preset("ouro-1.4b").kv_bytes_per_token() == 786_432


def _decode_against_full_forward(config, policies, seq=64, scale=0.3):
    """Max |cached decode - full forward| over `policies`, relative to the largest logit.

    The prompt's first half is prefilled in one call, the rest fed one token at a time.
    """
    model = OuroModel(config)
    params = _random_params(model, scale=scale)
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


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_decode_equals_full_forward(kv_heads):
    # Threshold policies are left out here: a token whose exit mass sits at the threshold may flip
    # loops under float32 rounding noise. They are covered in float64 below.
    config = OuroConfig.preset("tiny", num_key_value_heads=kv_heads, rope_theta=100.0)
    # The cached path sums softmax over S_max keys (masked ones included) instead of S; the float32
    # rounding differences this makes grow through 2 layers x 4 loops of these perturbed weights to
    # ~1e-5 of the logit scale (the float64 test shows they are rounding, not a bug).
    policies = [ExitPolicy.last(), ExitPolicy.at_step(1)]
    assert _decode_against_full_forward(config, policies, scale=0.2) < 1e-4


def test_cached_decode_equals_full_forward_float64():
    with jax.enable_x64(True):
        config = OuroConfig.preset(
            "tiny", num_key_value_heads=2, rope_theta=100.0, dtype="float64", param_dtype="float64"
        )
        policies = [ExitPolicy.last(), ExitPolicy.upstream_default(config), ExitPolicy.weighted()]
        assert _decode_against_full_forward(config, policies) < 1e-11


def test_step_logits_only_when_asked():
    config = OuroConfig.preset("tiny")
    model = OuroModel(config)
    params = init_params(model, jax.random.key(0))
    tokens = jnp.ones((1, 5), jnp.int32)
    out = forward(model, params, tokens)
    assert out.step_logits is None and out.logits.shape == (1, 5, config.vocab_size)
    steps = forward(model, params, tokens, exit_policy=None, return_step_logits=True)
    assert steps.logits is None and steps.step_logits.shape == (4, 1, 5, config.vocab_size)
    np.testing.assert_allclose(steps.step_logits[-1], out.logits, atol=1e-6)


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


def test_bfloat16_policy_tracks_float32():
    config = OuroConfig.preset("tiny")
    model32 = OuroModel(config)
    params = _random_params(model32, scale=0.1)
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, config.vocab_size)
    ref = forward(model32, params, tokens).logits
    config16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = forward(OuroModel(config16), params16, tokens)
    assert out.logits.dtype == jnp.bfloat16 and out.hidden_steps.dtype == jnp.bfloat16
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
