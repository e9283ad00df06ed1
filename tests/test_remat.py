"""Rematerialisation changes what the backward pass keeps, never the numbers: LoopLM Stage I, MELT
phase 1 (sequential forward) and phase 2 (two-pass forward) give the same loss and gradients under
every `remat` policy, and recomputing lets the compiled training step keep less."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DEFAULT

from melt_jax.model import REMAT_POLICIES, MeltModel, OuroModel
from melt_jax.train.objectives import Distillation, looplm_loss, phase1_loss, phase2_loss

POLICIES = [p for p in REMAT_POLICIES if p != "none"]


def _batch(vocab_size: int) -> dict:
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, vocab_size, size=(2, 16)), jnp.int32)
    return {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}


def _losses(melt, policy: str) -> dict:
    """name -> (loss, gradient tree) of each objective, with the trained model under `policy`."""
    ouro_config, ouro_params = melt.ouro.config, jax.tree.map(jnp.asarray, melt.ouro.params)
    params = jax.tree.map(jnp.asarray, melt.params)
    batch = _batch(ouro_config.vocab_size)
    ouro = OuroModel(ouro_config.replace(remat=policy))
    student = MeltModel(melt.config.replace(remat=policy, chunk_size=4))
    objectives = {
        "looplm": lambda p: looplm_loss(ouro, p, batch, 0.1)[0],
    }
    starts = {"looplm": ouro_params}
    # Phase 1 on the sequential forward (interpolated caches), phase 2 on the two-pass (earlier rows).
    for phase, forward in (("phase1", "sequential"), ("phase2", "two_pass")):
        distillation = Distillation(student, OuroModel(ouro_config), forward)
        if phase == "phase1":
            objectives[phase] = lambda p, d=distillation: phase1_loss(d, p, ouro_params, batch, jnp.float32(0.5))[0]
        else:
            objectives[phase] = lambda p, d=distillation: phase2_loss(d, p, ouro_params, batch, 0.1)[0]
        starts[phase] = params
    return {name: jax.jit(jax.value_and_grad(fn))(starts[name]) for name, fn in objectives.items()}


@pytest.fixture(scope="module")
def without_remat(melt_of):
    return _losses(melt_of(DEFAULT), "none")


@pytest.mark.parametrize("policy", POLICIES)
def test_remat_keeps_losses_and_gradients(melt_of, without_remat, policy):
    for name, (loss, grads) in _losses(melt_of(DEFAULT), policy).items():
        ref_loss, ref_grads = without_remat[name]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=name)
        flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
        assert len(flat_ref) == len(jax.tree.leaves(grads))
        for (path, ref), got in zip(flat_ref, jax.tree.leaves(grads)):
            scale = max(float(jnp.abs(ref).max()), 1e-6)
            np.testing.assert_allclose(got, ref, atol=1e-5 * scale, rtol=0, err_msg=f"{name} {path}")


def test_remat_keeps_fewer_activations():
    """The gradient of a 4-loop, 4-layer model compiled on CPU: recomputing the whole layer keeps less
    than keeping everything, and keeping the matmul outputs lies between."""
    from melt_jax.model import OuroConfig, abstract_params

    config = OuroConfig.preset("tiny", num_hidden_layers=4, vocab_size=64)
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    batch = {"tokens": tokens, "loss_mask": jax.ShapeDtypeStruct((4, 256), jnp.float32)}
    temp = {}
    for policy in REMAT_POLICIES:
        model = OuroModel(config.replace(remat=policy))
        grad = jax.jit(jax.grad(lambda p, b, m=model: looplm_loss(m, p, b, 0.1)[0]))
        temp[policy] = grad.lower(abstract_params(model), batch).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["matmuls"] < temp["none"], temp
    assert temp["full"] < 0.5 * temp["none"], temp
