"""MELT in JAX: the gated shared cache against the independent PyTorch MELT reference, and its
invariants (decode equals chunk-1 prefill, z = 0 equals Ouro with last-loop cache sharing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint
from torch_melt_reference import MeltReference, gate_names, ouro_last_loop_sharing_decode, random_melt_gates

from melt_jax.cache import init_cache
from melt_jax.config import MeltConfig, OuroConfig
from melt_jax.convert import load_hf_checkpoint
from melt_jax.decoding import decode_step, prefill
from melt_jax.melt import MeltModel
from melt_jax.params import abstract_params, count_params

TOL = 1e-4  # JAX in fp32 against the reference in float64; logits are of magnitude ~10


def test_melt_parameter_count_of_the_real_config():
    config = MeltConfig.from_ouro(OuroConfig.preset("ouro-1.4b"))
    shapes = abstract_params(MeltModel(config))
    assert count_params(shapes) == 1_636_028_417  # Ouro-1.4B + 24 * (2 * 2048^2 + 2048)
    assert shapes["layers"]["kv_gate"]["w_z"].shape == (24, 2048, 2048)


def test_melt_cache_bytes_per_token():

    ouro = OuroConfig.preset("ouro-1.4b")
    config = MeltConfig.from_ouro(ouro)
    assert config.kv_bytes_per_token() == 196_608
    # The paper's table (32K = 32,000 tokens): 6.29 GB for MELT-1.6B, 25.17 GB for Ouro-1.4B, in bf16.
    assert config.kv_cache_bytes(1, 32_000) == 6_291_456_000
    assert ouro.kv_cache_bytes(1, 32_000) == 25_165_824_000
    for loops in (1, 2, 8):  # MELT's cache does not grow with the loops; Ouro's does
        assert config.replace(total_ut_steps=loops).kv_cache_bytes(2, 100) == 2 * 100 * 196_608
        assert ouro.replace(total_ut_steps=loops).kv_cache_bytes(2, 100) == 2 * 100 * loops * 196_608
    cache = jax.eval_shape(lambda: init_cache(config, 1, 32))
    assert cache.k.shape == (24, 1, 16, 32, 128)  # [L, B, K, S_max, D]


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
    cache = init_cache(config, tokens.shape[0], max_length)
    return prefill(MeltModel(config), params, jnp.asarray(tokens), cache, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 8, 12])
def test_chunked_prefill_matches_reference(melt, chunk_size):
    config, params, reference, tokens, _ = melt
    logits, cache = _prefill(config, params, tokens, chunk_size)
    expected = reference.forward_chunked(tokens, chunk_size)
    np.testing.assert_allclose(logits, expected["step_logits"][-1], atol=TOL, rtol=0)
    seq = tokens.shape[1]
    rows = lambda slots: np.swapaxes(slots[:, :, :, :seq], 2, 3)  # noqa: E731  [L, B, S, K, D]
    np.testing.assert_allclose(rows(cache.k), expected["final_k"], atol=TOL, rtol=0)
    np.testing.assert_allclose(rows(cache.v), expected["final_v"], atol=TOL, rtol=0)
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


def test_ouro_to_melt_export_and_import_round_trip(tmp_path):
    import json

    from melt_jax.checkpoint import load_params
    from melt_jax.convert.cli import main

    hf_config = tiny_hf_config()
    write_hf_checkpoint(tmp_path / "ouro-hf", hf_config, random_ouro_state_dict(hf_config, seed=1))
    assert main(["import", str(tmp_path / "ouro-hf"), str(tmp_path / "ouro")]) == 0
    assert (
        main(["to-melt", str(tmp_path / "ouro"), str(tmp_path / "melt"), "--gate-bias", "-3", "--chunk-size", "16"])
        == 0
    )
    config, params = load_params(tmp_path / "melt")
    assert isinstance(config, MeltConfig) and config.chunk_size == 16 and config.gate_bias_init == -3.0
    assert count_params(params) == count_params(abstract_params(MeltModel(config)))
    np.testing.assert_array_equal(params["layers"]["kv_gate"]["b_z"], -3.0)
    np.testing.assert_array_equal(params["layers"]["kv_gate"]["w_z"], 0.0)

    assert main(["export", str(tmp_path / "melt"), str(tmp_path / "melt-hf")]) == 0
    hf = json.loads((tmp_path / "melt-hf" / "config.json").read_text())
    assert hf["model_type"] == "melt" and hf["architectures"] == ["MeltForCausalLM"] and hf["chunk_size"] == 16
    config2, params2 = load_hf_checkpoint(tmp_path / "melt-hf")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    # A MELT checkpoint that lacks a gate tensor names it.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "melt-hf" / "model.safetensors")
    del tensors["model.layers.1.kv_gate.u_z.weight"]
    save_file(tensors, tmp_path / "melt-hf" / "model.safetensors")
    assert main(["import", str(tmp_path / "melt-hf"), str(tmp_path / "broken")]) == 1
    assert not (tmp_path / "broken").exists()
    from melt_jax.convert import ConversionError

    with pytest.raises(ConversionError, match="model.layers.1.kv_gate.u_z.weight"):
        load_hf_checkpoint(tmp_path / "melt-hf")


def test_untrained_melt_runs_and_gates_get_gradients(melt):
    """Gradients reach W_z, U_z and b_z, and changing the gate changes the output."""
    config, params, _, tokens, _ = melt
    model = MeltModel(config)
    tokens = jnp.asarray(tokens[:, :16])

    def loss(p):
        return model.apply({"params": p}, tokens).logits.astype(jnp.float32).std()

    grads = jax.grad(loss)(jax.tree.map(jnp.asarray, params))
    for name in ("w_z", "u_z", "b_z"):
        assert float(jnp.abs(grads["layers"]["kv_gate"][name]).max()) > 0, name


def test_gate_step_changes_the_output_and_prefill_equals_sequential_forward(melt):
    from melt_jax.melt_training import sequential_forward

    config, params, _, tokens, _ = melt
    model = MeltModel(config)
    params = jax.tree.map(jnp.asarray, params)
    tokens = jnp.asarray(tokens[:, :16])

    def loss(p):
        return mean_loss(model.apply({"params": p}, tokens).logits, tokens)

    from melt_jax.losses import mean_next_token_loss as mean_loss

    grads = jax.grad(loss)(params)["layers"]["kv_gate"]
    stepped = dict(
        params,
        layers=dict(
            params["layers"], kv_gate=jax.tree.map(lambda p, g: p - 0.5 * g, params["layers"]["kv_gate"], grads)
        ),
    )
    assert float(loss(stepped)) < float(loss(params))  # training only the gate moves the loss

    prefilled, _ = _prefill(config, params, np.asarray(tokens), chunk_size=4, max_length=16)
    out = sequential_forward(model, params, tokens, 4)
    logits = model.apply({"params": params}, out.hidden_steps[-1], method=MeltModel.logits)
    np.testing.assert_allclose(prefilled, logits, atol=1e-5, rtol=0)
