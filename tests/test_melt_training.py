"""MELT's chunk-wise training forwards: sequential and two-pass against the PyTorch MELT reference,
against each other (values and, for one chunk, gradients) and against the chunked prefill, and the
interpolation end points; on the tiny models of each structure (tests/tiny_models.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DEFAULT, Structure

from melt_jax.inference import forward, prefill
from melt_jax.model import MeltModel, OuroModel, init_cache, mean_next_token_loss, sequential_forward, two_pass_forward

TOL = 1e-4  # JAX in fp32 against the reference in float64; logits of magnitude ~10
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORWARDS = {"sequential": sequential_forward, "two_pass": two_pass_forward}


def _setup(melt):
    """(model, params, reference, tokens, (ouro config, ouro params)) of a TinyMelt."""
    model = MeltModel(melt.config, collect=("attention_output",))
    params = jax.tree.map(jnp.asarray, melt.params)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, melt.config.vocab_size, size=(2, 24)))
    return model, params, melt.reference, tokens, (melt.ouro.config, melt.ouro.params)


@pytest.fixture(scope="module")
def setup(melt_of):
    """The GQA, 3-loop tiny MELT model, for the checks that run on one structure."""
    return _setup(melt_of(DEFAULT))


_jitted = {name: jax.jit(f, static_argnums=(0, 3)) for name, f in FORWARDS.items()}


def _step_logits(model, params, out):
    return model.apply({"params": params}, out.loop_hidden, method=MeltModel.logits)


# Every (chunk size, alpha) on one structure; on the others a chunk size whose forwards the loss test
# below compiles anyway (each (structure, chunk size, alpha given or not) is a program per forward).
@pytest.mark.parametrize(
    "structure, chunk_size, alpha",
    [(DEFAULT, 8, None), (DEFAULT, 4, 0.4), (DEFAULT, 8, 0.4), (Structure(1, 3), 12, None), (Structure(4, 4), 3, None)],
    ids=lambda x: str(x) if isinstance(x, Structure) else None,
)
@pytest.mark.parametrize("name", ["sequential", "two_pass"])
def test_training_forward_matches_reference(melt_of, structure, name, chunk_size, alpha):
    model, params, reference, tokens, _ = _setup(melt_of(structure))
    out = _jitted[name](model, params, tokens, chunk_size, alpha)
    expected = reference.forward_chunked(np.asarray(tokens), chunk_size, alpha=1.0 if alpha is None else alpha)
    np.testing.assert_allclose(_step_logits(model, params, out), expected["step_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.gate_logits, expected["gate_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.intermediates["attention_output"], expected["attn_outputs"], atol=TOL, rtol=0)


# Each chunk size is a compiled program per forward: three on one structure, the two that show
# whether chunking matters on the others.
@pytest.mark.parametrize(
    "structure, chunk_sizes",
    [(DEFAULT, (3, 6, 12)), (Structure(1, 3), (3, 12)), (Structure(4, 4), (3, 12))],
    ids=lambda x: str(x) if isinstance(x, Structure) else "chunks" + "-".join(map(str, x)),
)
def test_two_pass_loss_equals_sequential_for_several_chunk_sizes(melt_of, structure, chunk_sizes):
    model, params, _, tokens, _ = _setup(melt_of(structure))
    losses = {}
    for chunk_size in chunk_sizes:
        for name in FORWARDS:
            out = _jitted[name](model, params, tokens, chunk_size, None)
            losses[name, chunk_size] = float(mean_next_token_loss(_step_logits(model, params, out)[-1], tokens))
        np.testing.assert_allclose(losses["two_pass", chunk_size], losses["sequential", chunk_size], rtol=1e-5)
    if structure.loops > 1:
        assert abs(losses["sequential", 3] - losses["sequential", 12]) > 1e-4  # chunking matters
    else:  # one loop: the rows a chunk reads from its own tokens are already their final ones
        np.testing.assert_allclose(losses["sequential", 3], losses["sequential", 12], rtol=1e-5)


# A chunk size per structure whose sequential forward the tests above compile already.
@pytest.mark.parametrize(
    "structure, chunk_size",
    [(DEFAULT, 8), (Structure(1, 3), 12), (Structure(4, 4), 3)],
    ids=lambda x: str(x) if isinstance(x, Structure) else f"chunk{x}",
)
def test_chunked_prefill_equals_sequential_forward(melt_of, structure, chunk_size):
    model, params, _, tokens, _ = _setup(melt_of(structure))
    cache = init_cache(model.config, *tokens.shape)
    prefilled, _ = prefill(MeltModel(model.config), params, tokens, cache, chunk_size=chunk_size)
    out = _jitted["sequential"](model, params, tokens, chunk_size, None)
    logits = model.apply({"params": params}, out.loop_hidden[-1], method=MeltModel.logits)
    np.testing.assert_allclose(prefilled, logits, atol=1e-5, rtol=0)


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
    ouro = forward(OuroModel(ouro_config), ouro_params, tokens, exit_policy=None, return_loop_logits=True)
    for name in FORWARDS:
        out = _jitted[name](model, params, tokens, 8, 0.0)
        np.testing.assert_allclose(_step_logits(model, params, out), ouro.loop_logits, atol=1e-5, rtol=0)
        melt = _jitted[name](model, params, tokens, 8, None)
        at_one = _jitted[name](model, params, tokens, 8, 1.0)
        # The plain slot cache reads its history and the new rows as two key sets, the interpolated one a
        # single written slot array: the same softmax summed in another order (float32 rounding).
        np.testing.assert_allclose(at_one.loop_hidden, melt.loop_hidden, atol=1e-5, rtol=0)

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
