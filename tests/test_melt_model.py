"""MELT in JAX: the gated shared cache against the independent PyTorch MELT reference, and its
invariants (decode equals chunk-1 prefill, z = 0 equals Ouro with last-loop cache sharing), on the tiny
models of each structure (tests/tiny_models.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DEFAULT, LOOPED, Structure

from melt_jax.convert import load_hf_checkpoint
from melt_jax.inference import decode_step, prefill
from melt_jax.model import (
    MeltConfig,
    MeltModel,
    OuroConfig,
    abstract_params,
    count_params,
    init_cache,
    mean_next_token_loss,
)
from melt_jax.testing.hf_checkpoints import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint
from melt_jax.testing.torch_melt import ouro_last_loop_sharing_decode

TOL = 1e-4  # JAX in fp32 against the reference in float64; logits are of magnitude ~10
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.fixture(scope="module")
def melt(melt_of):
    """The GQA, 3-loop tiny MELT model, for the checks that run on one structure."""
    return _setup(melt_of(DEFAULT))


def _setup(melt):
    tokens = np.random.default_rng(2).integers(0, melt.config.vocab_size, size=(2, 40))
    return melt.config, melt.params, melt.reference, tokens, (melt.ouro.hf_config, melt.ouro.state_dict)


def _prefill(config, params, tokens, chunk_size, max_length=48):
    cache = init_cache(config, tokens.shape[0], max_length)
    return prefill(MeltModel(config), params, jnp.asarray(tokens), cache, chunk_size=chunk_size)


# Every chunk size on one structure, one on each of the others: chunk 8 divides the 40 tokens, 12 leaves
# a shorter last chunk, and chunk 1 is what decoding does (checked on every structure below).
@pytest.mark.parametrize(
    "structure, chunk_size",
    [(DEFAULT, 1), (DEFAULT, 8), (DEFAULT, 12), (Structure(1, 3), 12), (Structure(4, 4), 8)],
    ids=lambda x: f"chunk{x}" if isinstance(x, int) else str(x),
)
def test_chunked_prefill_matches_reference(melt_of, structure, chunk_size):
    config, params, reference, tokens, _ = _setup(melt_of(structure))
    logits, cache = _prefill(config, params, tokens, chunk_size)
    expected = reference.forward_chunked(tokens, chunk_size)
    np.testing.assert_allclose(logits, expected["step_logits"][-1], atol=TOL, rtol=0)
    seq = tokens.shape[1]
    rows = lambda slots: np.swapaxes(slots[:, :, :, :seq], 2, 3)  # noqa: E731  [L, B, S, K, D]
    np.testing.assert_allclose(rows(cache.k), expected["final_k"], atol=TOL, rtol=0)
    np.testing.assert_allclose(rows(cache.v), expected["final_v"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(cache.end_index, [seq, seq])


@pytest.mark.parametrize("structure", LOOPED, ids=str)
def test_decode_equals_chunk_one_prefill(melt_of, structure):
    config, params, _, tokens, _ = _setup(melt_of(structure))
    model = MeltModel(config)
    prefilled, _ = _prefill(config, params, tokens, chunk_size=1)
    n = 16
    first, cache = _prefill(config, params, tokens[:, :n], chunk_size=1)
    steps = [first]
    for i in range(n, tokens.shape[1]):
        logits, cache = decode_step(model, params, jnp.asarray(tokens[:, i]), cache)
        steps.append(logits[:, None])
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), prefilled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("structure", LOOPED, ids=str)
def test_closed_gate_equals_ouro_with_last_loop_cache_sharing(melt_of, structure):
    config, params, _, tokens, (hf_config, state_dict) = _setup(melt_of(structure))
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
    # A checkpoint missing a tensor is bad input.
    assert main(["import", str(tmp_path / "melt-hf"), str(tmp_path / "broken")]) == 2
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

    grads = jax.jit(jax.grad(loss))(jax.tree.map(jnp.asarray, params))
    for name in ("w_z", "u_z", "b_z"):
        assert float(jnp.abs(grads["layers"]["kv_gate"][name]).max()) > 0, name


def test_gate_step_changes_the_output(melt):
    config, params, _, tokens, _ = melt
    model = MeltModel(config)
    params = jax.tree.map(jnp.asarray, params)
    tokens = jnp.asarray(tokens[:, :16])

    @jax.jit
    def loss(p):
        return mean_next_token_loss(model.apply({"params": p}, tokens).logits, tokens)

    grads = jax.jit(jax.grad(loss))(params)["layers"]["kv_gate"]
    stepped = dict(
        params,
        layers=dict(
            params["layers"], kv_gate=jax.tree.map(lambda p, g: p - 0.5 * g, params["layers"]["kv_gate"], grads)
        ),
    )
    assert float(loss(stepped)) < float(loss(params))  # training only the gate moves the loss
