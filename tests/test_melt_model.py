"""MELT in JAX: the gated shared cache against the independent PyTorch MELT reference, and its
invariants (decode equals chunk-1 prefill, z = 0 equals Ouro with last-loop cache sharing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint
from melt_jax.config import MeltConfig, OuroConfig
from melt_jax.convert import load_hf_checkpoint
from melt_jax.decoding import decode_step
from melt_jax.melt import MeltModel, chunked_prefill, init_melt_cache, melt_cache_bytes_per_token
from melt_jax.params import abstract_params, count_params
from torch_melt_reference import MeltReference, gate_names, ouro_last_loop_sharing_decode, random_melt_gates

TOL = 1e-4  # JAX in fp32 against the reference in float64; logits are of magnitude ~10


def test_melt_parameter_count_of_the_real_config():
    config = MeltConfig.from_ouro(OuroConfig.preset("ouro-1.4b"))
    shapes = abstract_params(MeltModel(config))
    assert count_params(shapes) == 1_636_028_417  # Ouro-1.4B + 24 * (2 * 2048^2 + 2048)
    assert shapes["layers"]["kv_gate"]["w_z"].shape == (24, 2048, 2048)


def test_melt_cache_bytes_per_token():
    config = MeltConfig.from_ouro(OuroConfig.preset("ouro-1.4b"))
    assert melt_cache_bytes_per_token(config) == 196_608
    cache = jax.eval_shape(lambda: init_melt_cache(config, 1, 32))
    assert cache.k.shape == (24, 1, 32, 16, 128)


def _with_gates(params, hf_config, gates):
    """Ouro params plus MELT gates given under their HF names."""
    layers = range(hf_config["num_hidden_layers"])
    stacked = [np.stack([gates[gate_names(i)[j]] for i in layers]) for j in range(3)]
    params = dict(params)
    params["layers"] = dict(params["layers"], kv_gate=dict(zip(("w_z", "u_z", "b_z"), stacked)))
    return params


@pytest.fixture(scope="module")
def melt(tmp_path_factory):
    hf_config = tiny_hf_config(total_ut_steps=3, rope_theta=50.0)  # GQA: 4 heads, 2 kv heads
    state_dict = random_ouro_state_dict(hf_config, seed=5)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("melt"), hf_config, state_dict)
    ouro_config, ouro_params = load_hf_checkpoint(path)
    gates = random_melt_gates(hf_config, seed=6, scale=0.1, bias=-1.0)
    config = MeltConfig.from_ouro(ouro_config, chunk_size=8)
    params = _with_gates(ouro_params, hf_config, gates)
    reference = MeltReference(hf_config, state_dict, gates, dtype=torch.float64)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 40))
    return config, params, reference, tokens, (hf_config, state_dict)


def _prefill(config, params, tokens, chunk_size, max_length=48):
    cache = init_melt_cache(config, tokens.shape[0], max_length)
    return chunked_prefill(MeltModel(config), params, jnp.asarray(tokens), cache, chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 8, 12])
def test_chunked_prefill_matches_reference(melt, chunk_size):
    config, params, reference, tokens, _ = melt
    logits, cache = _prefill(config, params, tokens, chunk_size)
    expected = reference.forward_chunked(tokens, chunk_size)
    np.testing.assert_allclose(logits, expected["step_logits"][-1], atol=TOL, rtol=0)
    seq = tokens.shape[1]
    np.testing.assert_allclose(cache.k[:, :, :seq], expected["final_k"], atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.v[:, :, :seq], expected["final_v"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(cache.end_index, [seq, seq])


def test_decode_equals_chunk_one_prefill(melt):
    config, params, _, tokens, _ = melt
    model = MeltModel(config)
    prefilled, _ = _prefill(config, params, tokens, chunk_size=1)
    n = 16
    first, cache = _prefill(config, params, tokens[:, :n], chunk_size=1)
    steps = [first]
    for i in range(n, tokens.shape[1]):
        logits, cache = decode_step(model, params, jnp.asarray(tokens[:, i]), cache)
        steps.append(logits[:, None])
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), prefilled, atol=1e-5, rtol=0)


def test_closed_gate_equals_ouro_with_last_loop_cache_sharing(melt):
    config, params, _, tokens, (hf_config, state_dict) = melt
    closed = jax.tree.map(lambda x: x, params)
    kv_gate = closed["layers"]["kv_gate"]
    closed["layers"] = dict(
        closed["layers"],
        kv_gate=dict(w_z=0 * kv_gate["w_z"], u_z=0 * kv_gate["u_z"], b_z=jnp.full_like(kv_gate["b_z"], -1e4)),
    )
    logits, _ = _prefill(config, closed, tokens, chunk_size=1)
    expected = ouro_last_loop_sharing_decode(hf_config, state_dict, tokens)
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


def test_bad_chunk_size_and_long_prompt(melt):
    config, params, _, tokens, _ = melt
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        _prefill(config, params, tokens, chunk_size=0)
    with pytest.raises(ValueError, match="longer than the cache"):
        _prefill(config, params, tokens, chunk_size=4, max_length=20)
