"""Early exit that skips loops (ExitPolicy skip_loops; OuroModel.run_loops_skipping): a token stops at
the loop its policy picks, the loops after it are not computed, and what later tokens see in place of
the skipped loops is the exit loop's rows. Checked against direct computations:

- the returned logits and exit loops are those of the same policy computed with all loops;
- Ouro: the cache's slots of the loops after a token's exit hold copies of its exit loop's rows (the
  slots up to the exit equal the all-loops step's);
- MELT: the shared row is the exit loop's, i.e. the step equals the same model with e + 1 loops;
- generation equals a reference loop that decodes with all loops and then rewrites the cache that way.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melt_jax.errors import ConfigError, GenerationError
from melt_jax.inference import SamplingConfig, generate, prefill
from melt_jax.model import INTERMEDIATES, ExitPolicy, MeltConfig, OuroConfig, init_params, model_for

OURO = OuroConfig(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, total_ut_steps=4, rope_theta=50.0,
)  # fmt: skip
POLICIES = [ExitPolicy.at_threshold(0.5), ExitPolicy.at_threshold(0.9), ExitPolicy.at_loop(1)]


def skipping(policy: ExitPolicy) -> ExitPolicy:
    return ExitPolicy(policy.kind, policy.loop, policy.threshold, skip_loops=True)


@pytest.fixture(scope="module", params=["ouro", "melt"])
def model_and_params(request):
    """A random model whose exit gate is scaled up so that tokens exit at different loops."""
    config = OURO if request.param == "ouro" else MeltConfig.from_ouro(OURO, chunk_size=4)
    model = model_for(config)
    params = init_params(model, jax.random.key(0))
    params["exit_gate"] = jax.tree.map(lambda x: 60.0 * x, params["exit_gate"])
    if request.param == "melt":  # open gates: the shared row differs from any one loop's
        gates = params["layers"]["kv_gate"]
        gates["w_z"] = 0.3 * jax.random.normal(jax.random.key(1), gates["w_z"].shape)
        gates["b_z"] = jnp.full_like(gates["b_z"], -0.5)
    return model, params


def _prompt(batch: int, length: int = 7) -> jax.Array:
    return jnp.asarray(np.random.default_rng(batch).integers(1, OURO.vocab_size, (batch, length)), jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "policy"))
def _step(model, params, token, cache, policy):
    """One decode step, token [B]: its output (the cache is not donated: the caller's stays valid)."""
    return model.apply({"params": params}, token[:, None], cache=cache, exit_policy=policy)


def _exits(model, params, token, cache, policy) -> np.ndarray:
    """[B] each row's exit loop under `policy` computed with all loops."""
    out = _step(model, params, token, cache, policy)
    if out.exit_loops is not None:
        return np.asarray(out.exit_loops[:, 0])
    return np.full(token.shape, policy.fixed_loop(model.config.num_loops))


def _with_loops(model, num_loops: int):
    return model_for(model.config.replace(total_ut_steps=int(num_loops)))


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_one_decode_step_computes_the_exit_loop_and_keeps_its_rows(model_and_params, policy):
    model, params = model_and_params
    batch = 6
    _, cache = prefill(model, params, _prompt(batch), model.init_cache(batch, 12))
    token = _prompt(batch + 1, 1)[:batch, 0]
    every_loop = _step(model, params, token, cache, policy)
    skipped = _step(model, params, token, cache, skipping(policy))
    exits = _exits(model, params, token, cache, policy)
    if policy.kind == "threshold":
        assert len(set(exits.tolist())) > 1, "the test model should exit at several loops"
        np.testing.assert_array_equal(skipped.exit_loops[:, 0], exits)
    assert int(skipped.loops_computed) == exits.max() + 1 < model.config.num_loops + (policy.kind == "threshold")
    np.testing.assert_allclose(skipped.logits, every_loop.logits, rtol=1e-6, atol=1e-6)

    position = 7
    for b, e in enumerate(exits):
        got_k = skipped.cache.k[..., b, :, position, :]  # [*slots, K, D]
        got_v = skipped.cache.v[..., b, :, position, :]
        if model.config.model_type == "ouro":  # [T, L, ...]: slots after the exit copy the exit loop's
            np.testing.assert_allclose(got_k[: e + 1], every_loop.cache.k[: e + 1, :, b, :, position], atol=1e-6)
            np.testing.assert_array_equal(got_k[e + 1 :], jnp.broadcast_to(got_k[e], got_k[e + 1 :].shape))
            np.testing.assert_array_equal(got_v[e + 1 :], jnp.broadcast_to(got_v[e], got_v[e + 1 :].shape))
        else:  # [L, ...]: the row of loop e, as a model with e + 1 loops leaves it
            shorter = _step(_with_loops(model, e + 1), params, token, cache, ExitPolicy.last())
            np.testing.assert_allclose(got_k, shorter.cache.k[:, b, :, position], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got_v, shorter.cache.v[:, b, :, position], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(skipped.logits[b], shorter.logits[b], rtol=1e-6, atol=1e-6)
    # Earlier positions are untouched.
    np.testing.assert_array_equal(skipped.cache.k[..., :position, :], cache.k[..., :position, :])


def _reference_generation(model, params, prompt: list[int], policy: ExitPolicy, max_new: int) -> list[int]:
    """Greedy decoding of one prompt where every step computes all loops and the cache is then
    rewritten to what skipping leaves: Ouro's slots after the exit copy the exit loop's rows, MELT's
    row is the one a model with e + 1 loops writes."""
    tokens = jnp.asarray([prompt], jnp.int32)
    prompt_logits, cache = prefill(model, params, tokens, model.init_cache(1, len(prompt) + max_new), policy)
    new = [int(jnp.argmax(prompt_logits[0, -1]))]
    for _ in range(max_new - 1):
        token = jnp.asarray(new[-1:], jnp.int32)
        position = int(cache.end_index[0])
        e = int(_exits(model, params, token, cache, policy)[0])
        out = _step(model, params, token, cache, policy)
        if model.config.model_type == "ouro":
            k = out.cache.k.at[e + 1 :, :, 0, :, position].set(out.cache.k[e, :, 0, :, position])
            v = out.cache.v.at[e + 1 :, :, 0, :, position].set(out.cache.v[e, :, 0, :, position])
            next_cache = out.cache.replace(k=k, v=v)
        else:
            next_cache = _step(_with_loops(model, e + 1), params, token, cache, ExitPolicy.last()).cache
        new.append(int(jnp.argmax(out.logits[0, 0])))
        cache = next_cache
    return new


@pytest.mark.parametrize("policy", POLICIES[1:], ids=str)
def test_generation_with_skipping_equals_the_reference(model_and_params, policy):
    """A padded batch of three prompts; rows never see each other, so each is checked alone."""
    model, params = model_and_params
    prompts = [[5, 9, 2, 7, 1, 3], [3, 8], [11, 4, 4, 9]]
    max_new = 8
    result = generate(model, params, prompts, SamplingConfig(max_new_tokens=max_new), exit_policy=skipping(policy))
    for prompt, got in zip(prompts, result.tokens):
        assert got == _reference_generation(model, params, prompt, policy, max_new)
    assert 1 <= result.timing.loops_per_step <= model.config.num_loops


def test_loops_per_decode_step_are_counted(model_and_params):
    model, params = model_and_params
    prompts, sampling = [[5, 9, 2]], SamplingConfig(max_new_tokens=6)
    every_loop = generate(model, params, prompts, sampling, exit_policy=ExitPolicy.at_loop(0))
    first_only = generate(model, params, prompts, sampling, exit_policy=ExitPolicy.at_loop(0, skip_loops=True))
    assert every_loop.tokens == first_only.tokens
    assert every_loop.timing.decode_steps == first_only.timing.decode_steps == 5
    assert every_loop.timing.loops_per_step == model.config.num_loops
    assert first_only.timing.loops_per_step == 1


def test_policies_that_choose_no_single_loop_cannot_skip():
    for kind in ("last", "weighted"):
        with pytest.raises(ValueError, match="cannot skip loops"):
            ExitPolicy(kind, skip_loops=True)
    with pytest.raises(GenerationError, match="cannot skip loops"):
        ExitPolicy.parse("weighted", OURO, skip_loops=True)
    assert ExitPolicy.parse("threshold:0.7", OURO, skip_loops=True) == ExitPolicy.at_threshold(0.7, skip_loops=True)


def test_skipping_needs_a_cache_and_collects_no_intermediates(model_and_params):
    model, params = model_and_params
    tokens = _prompt(2)
    with pytest.raises(ConfigError, match="OwnTokens cannot skip loops"):
        model.apply({"params": params}, tokens, exit_policy=ExitPolicy.at_loop(1, skip_loops=True))
    with pytest.raises(ConfigError, match="intermediates"):
        model.clone(collect=INTERMEDIATES).apply(
            {"params": params}, tokens, cache=model.init_cache(2, 8), exit_policy=ExitPolicy.at_loop(1, skip_loops=True)
        )
