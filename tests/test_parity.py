"""The JAX model through the converter against the independent PyTorch reference and the upstream
golden outputs: every loop's logits, the gate, the exit distribution, each logit selection and the
training loss."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import DIAGONAL

from melt_jax.convert import load_hf_checkpoint
from melt_jax.inference import forward
from melt_jax.model import ExitPolicy, OuroModel, mean_next_token_loss, next_token_cross_entropy, select_hidden
from melt_jax.testing.torch_ouro import OuroReference

GOLDEN = Path(__file__).parent / "data" / "ouro-tiny"
TOL = 1e-4  # fp32 on both sides; observed differences are ~1e-6 of logits of magnitude ~10.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _policies(num_loops):
    """Every logit selection with the reference's name for it."""
    yield ExitPolicy.last(), dict(mode="last")
    yield ExitPolicy.weighted(), dict(mode="weighted")
    for t in range(num_loops):
        yield ExitPolicy.at_loop(t), dict(mode="step", step=t)
    for q in (0.3, 0.6, 0.9, 1.0):
        yield ExitPolicy.at_threshold(q), dict(mode="threshold", threshold=q)


def _select(model, params, out, policy):
    """Logits and exit steps under `policy` from a forward's per-loop hidden states: the same
    selection the model's __call__ makes, without compiling a forward per policy."""
    chosen, steps = select_hidden(out.loop_hidden, out.exit_pdf, policy)
    return model.apply({"params": params}, chosen, method=OuroModel.logits), steps


@pytest.fixture(scope="module", params=DIAGONAL, ids=str)
def checkpoint(request, ouro_of):
    """A tiny random Ouro checkpoint in HF layout, its reference model, its JAX params."""
    ouro = ouro_of(request.param)
    reference = OuroReference(ouro.hf_config, ouro.state_dict, dtype=torch.float32)
    tokens = np.random.default_rng(1).integers(0, ouro.config.vocab_size, size=(2, 160))
    return ouro.config, ouro.params, reference, tokens


def test_every_loop_gate_and_exit_distribution(checkpoint):
    config, params, reference, tokens = checkpoint
    expected = reference.forward(tokens)
    out = forward(OuroModel(config), params, jnp.asarray(tokens), exit_policy=None, return_loop_logits=True)
    np.testing.assert_allclose(out.loop_logits, expected["step_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.loop_hidden, expected["hidden_steps"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.gate_logits, expected["gate_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.exit_pdf, expected["exit_pdf"], atol=TOL, rtol=0)


def test_every_logit_selection(checkpoint):
    config, params, reference, tokens = checkpoint
    expected_out = reference.forward(tokens)
    model = OuroModel(config)
    out = forward(model, params, jnp.asarray(tokens), exit_policy=ExitPolicy.upstream_default(config))
    logits, _ = reference.select_logits(expected_out, mode="default")
    np.testing.assert_allclose(out.logits, logits, atol=TOL, rtol=0)
    for policy, ref_args in _policies(config.num_loops):
        chosen, exit_steps = _select(model, params, out, policy)
        logits, steps = reference.select_logits(expected_out, **ref_args)
        np.testing.assert_allclose(chosen, logits, atol=TOL, rtol=0, err_msg=str(policy))
        if policy.kind == "threshold":
            np.testing.assert_array_equal(exit_steps, steps, err_msg=str(policy))


def test_training_loss_and_per_loop_cross_entropy(checkpoint):
    config, params, reference, tokens = checkpoint
    model = OuroModel(config)
    labels = tokens.copy()
    labels[:, :7] = -100  # ignored positions must not count
    out = forward(model, params, jnp.asarray(tokens), exit_policy=ExitPolicy.weighted(), return_loop_logits=True)
    loss = mean_next_token_loss(out.logits, jnp.asarray(labels))
    np.testing.assert_allclose(loss, reference.loss(tokens, labels), atol=TOL, rtol=0)
    per_loop = [next_token_cross_entropy(out.loop_logits[t], jnp.asarray(tokens)) for t in range(config.num_loops)]
    np.testing.assert_allclose(np.stack(per_loop), reference.per_step_ce(tokens), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def golden():
    config, params = load_hf_checkpoint(GOLDEN, dtype="float32")
    return config, params, dict(np.load(GOLDEN / "reference.npz"))


def test_golden_upstream_outputs(golden):
    """Every output the upstream code recorded on its tiny checkpoint (short prompt, so this checks
    names, norms and the exit logic; RoPE is checked by the long prompts above)."""
    config, params, ref = golden
    model = OuroModel(config, collect=("layer_output",))
    tokens = jnp.asarray(ref["input_ids"])
    out = model.apply(
        {"params": params}, tokens, exit_policy=ExitPolicy.upstream_default(config), return_loop_logits=True
    )
    T, L = config.num_loops, config.num_layers
    np.testing.assert_allclose(
        out.intermediates["layer_output"].reshape(T * L, *tokens.shape, -1), ref["layer_outputs"], atol=TOL
    )
    np.testing.assert_allclose(out.loop_hidden, ref["hidden_steps"], atol=TOL)
    np.testing.assert_allclose(out.gate_logits, ref["gate_logits"], atol=TOL)
    np.testing.assert_allclose(out.exit_pdf, ref["exit_pdf"], atol=TOL)
    np.testing.assert_allclose(out.loop_logits, ref["step_logits"], atol=TOL)
    np.testing.assert_allclose(out.logits, ref["logits_default"], atol=TOL)
    for t in range(T):
        logits, _ = _select(model, params, out, ExitPolicy.at_loop(t))
        np.testing.assert_allclose(logits, ref["logits_exit_at"][t], atol=TOL)
    for q, expected, expected_steps in zip(ref["thresholds"], ref["logits_thr"], ref["exit_steps_thr"]):
        logits, steps = _select(model, params, out, ExitPolicy.at_threshold(float(q)))
        np.testing.assert_allclose(logits, expected, atol=TOL)
        np.testing.assert_array_equal(steps, expected_steps)
    weighted, _ = _select(model, params, out, ExitPolicy.weighted())
    np.testing.assert_allclose(weighted, ref["logits_weighted"], atol=TOL)
    last, _ = _select(model, params, out, ExitPolicy.last())
    np.testing.assert_allclose(last, ref["logits_last_nothr"], atol=TOL)
    np.testing.assert_allclose(mean_next_token_loss(weighted, tokens), ref["loss_hf"], atol=TOL)
    per_loop = np.stack([next_token_cross_entropy(s, tokens) for s in out.loop_logits])
    np.testing.assert_allclose(per_loop, ref["per_step_ce"], atol=TOL)


def test_golden_cached_decode(golden):
    from melt_jax.inference import decode_step, prefill
    from melt_jax.model import init_cache

    config, params, ref = golden
    model = OuroModel(config)
    tokens = jnp.asarray(ref["input_ids"], jnp.int32)
    n = int(ref["n_prefill"])
    cache = init_cache(config, tokens.shape[0], tokens.shape[1])
    logits, cache = prefill(model, params, tokens[:, :n], cache)
    steps = [logits[:, -1]]
    for i in range(n, tokens.shape[1] - 1):
        logits, cache = decode_step(model, params, tokens[:, i], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.stack(steps, axis=1), ref["logits_decode"], atol=TOL)
