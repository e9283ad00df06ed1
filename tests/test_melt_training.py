"""MELT's chunk-wise training forwards: sequential and two-pass against the PyTorch MELT reference,
against each other (values and, for one chunk, gradients), and the interpolation end points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint
from test_melt_model import _with_gates
from torch_melt_reference import MeltReference, random_melt_gates

from melt_jax.config import MeltConfig
from melt_jax.convert import load_hf_checkpoint
from melt_jax.decoding import forward
from melt_jax.losses import mean_next_token_loss
from melt_jax.melt import MeltModel
from melt_jax.melt_training import sequential_forward, two_pass_forward
from melt_jax.ouro import OuroModel

TOL = 1e-4  # JAX in fp32 against the reference in float64; logits of magnitude ~10

FORWARDS = {"sequential": sequential_forward, "two_pass": two_pass_forward}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf_config = tiny_hf_config(total_ut_steps=3, rope_theta=50.0)  # GQA
    state_dict = random_ouro_state_dict(hf_config, seed=5)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("melt"), hf_config, state_dict)
    ouro_config, ouro_params = load_hf_checkpoint(path)
    gates = random_melt_gates(hf_config, seed=6, scale=0.1, bias=-1.0)
    config = MeltConfig.from_ouro(ouro_config)
    params = jax.tree.map(jnp.asarray, _with_gates(ouro_params, hf_config, gates))
    reference = MeltReference(hf_config, state_dict, gates, dtype=torch.float64)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 24)))
    model = MeltModel(config, collect=("attention_output",))
    return model, params, reference, tokens, (ouro_config, ouro_params)


_jitted = {name: jax.jit(f, static_argnums=(0, 3)) for name, f in FORWARDS.items()}


def _step_logits(model, params, out):
    return model.apply({"params": params}, out.hidden_steps, method=MeltModel.logits)


@pytest.mark.parametrize("chunk_size, alpha", [(8, None), (4, 0.4), (8, 0.4)])
@pytest.mark.parametrize("name", ["sequential", "two_pass"])
def test_training_forward_matches_reference(setup, name, chunk_size, alpha):
    model, params, reference, tokens, _ = setup
    out = _jitted[name](model, params, tokens, chunk_size, alpha)
    expected = reference.forward_chunked(np.asarray(tokens), chunk_size, alpha=1.0 if alpha is None else alpha)
    np.testing.assert_allclose(_step_logits(model, params, out), expected["step_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.gate_logits, expected["gate_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.intermediates["attention_output"], expected["attn_outputs"], atol=TOL, rtol=0)


def test_two_pass_loss_equals_sequential_for_several_chunk_sizes(setup):
    model, params, _, tokens, _ = setup
    losses = {}
    for chunk_size in (3, 6, 12):
        for name in FORWARDS:
            out = _jitted[name](model, params, tokens, chunk_size, None)
            losses[name, chunk_size] = float(mean_next_token_loss(_step_logits(model, params, out)[-1], tokens))
        np.testing.assert_allclose(losses["two_pass", chunk_size], losses["sequential", chunk_size], rtol=1e-5)
    assert abs(losses["sequential", 3] - losses["sequential", 12]) > 1e-4  # chunking matters


def test_single_chunk_gradients_agree(setup):
    model, params, _, tokens, _ = setup

    def loss(params, forward_fn):
        out = forward_fn(model, params, tokens, tokens.shape[1], None)
        return mean_next_token_loss(_step_logits(model, params, out)[-1], tokens)

    seq_grads = jax.jit(jax.grad(loss), static_argnums=1)(params, sequential_forward)
    two_grads = jax.jit(jax.grad(loss), static_argnums=1)(params, two_pass_forward)
    for a, b in zip(jax.tree.leaves(seq_grads), jax.tree.leaves(two_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(a).max())), rtol=0)
    assert float(jnp.abs(seq_grads["layers"]["kv_gate"]["w_z"]).max()) > 0


def test_alpha_zero_is_ouro_and_alpha_one_is_melt(setup):
    model, params, _, tokens, (ouro_config, ouro_params) = setup
    ouro = forward(OuroModel(ouro_config), ouro_params, tokens, exit_policy=None, return_step_logits=True)
    for name in FORWARDS:
        out = _jitted[name](model, params, tokens, 8, 0.0)
        np.testing.assert_allclose(_step_logits(model, params, out), ouro.step_logits, atol=1e-5, rtol=0)
        melt = _jitted[name](model, params, tokens, 8, None)
        at_one = _jitted[name](model, params, tokens, 8, 1.0)
        np.testing.assert_allclose(at_one.hidden_steps, melt.hidden_steps, atol=1e-6, rtol=0)

    def loss(params):
        out = two_pass_forward(model, params, tokens, 8, 0.0)
        return mean_next_token_loss(_step_logits(model, params, out)[-1], tokens)

    gate_grads = jax.jit(jax.grad(loss))(params)["layers"]["kv_gate"]
    for name, grad in gate_grads.items():
        assert float(jnp.abs(grad).max()) == 0.0, name


def test_chunk_size_must_divide_the_sequence(setup):
    model, params, _, tokens, _ = setup
    for forward_fn in FORWARDS.values():
        with pytest.raises(ValueError, match="does not divide the sequence length 24"):
            forward_fn(model, params, tokens, 5)
        with pytest.raises(ValueError, match="positive integer"):
            forward_fn(model, params, tokens, 0)
