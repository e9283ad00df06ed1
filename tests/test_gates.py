"""MELT's gate variants (MeltConfig.gate): each recurrence against numpy, the limits where two variants
compute the same thing, their parameters against the parameter table, and bad settings refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melt_jax.errors import ConfigError
from melt_jax.inference import prefill
from melt_jax.model import (
    GATES,
    MeltConfig,
    MeltModel,
    OuroConfig,
    OuroModel,
    abstract_params,
    init_params,
    melt_from_ouro,
    param_shapes,
)
from melt_jax.model.melt import make_gate
from melt_jax.train.config import RunConfigError, TrainConfig

OURO = OuroConfig.preset("tiny", total_ut_steps=3, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, OURO.vocab_size)


@pytest.fixture(scope="module")
def ouro_params():
    return init_params(OuroModel(OURO), jax.random.key(0))


def _melt(ouro_params, **fields):
    config, params = melt_from_ouro(OURO, ouro_params, chunk_size=4, **fields)
    return MeltModel(config), params


def _run_gate(config, variables, us):
    """s_t for t = 0..T-1 from the gate of `config` applied to us [T, B, S, H]."""
    gate = make_gate(config)
    s = jnp.zeros_like(us[0])
    out = []
    for t, u in enumerate(us):
        s = gate.apply(variables, u, s, jnp.int32(t))
        out.append(s)
    return np.stack(out)


def test_each_recurrence_against_numpy():
    us = np.asarray(jax.random.normal(jax.random.key(2), (4, 2, 3, OURO.hidden_size)))
    H = OURO.hidden_size
    rng = np.random.default_rng(0)
    w, u_mat, b = rng.normal(size=(H, H)) * 0.2, rng.normal(size=(H, H)) * 0.2, rng.normal(size=H)
    base = MeltConfig.from_ouro(OURO)
    cases = {
        "elementwise": ({"params": {"w_z": w, "u_z": u_mat, "b_z": b}}, None),
        "scalar": ({"params": {"z_logit": np.array([0.7])}}, lambda t, u, s: 1 / (1 + np.exp(-0.7))),
        "mean": ({}, lambda t, u, s: t / (t + 1)),
        "ema": ({}, lambda t, u, s: 0.3),
        "last": ({}, lambda t, u, s: 0.0),
    }
    assert set(cases) == set(GATES)
    for gate, (variables, z_of) in cases.items():
        config = base.replace(gate=gate, gate_ema_decay=0.3)
        got = _run_gate(config, variables, jnp.asarray(us, jnp.float32))
        s = np.zeros_like(us[0])
        for t, u in enumerate(us):
            if t == 0:
                s = u  # every variant writes the first loop's row as is
            elif gate == "elementwise":
                z = 1 / (1 + np.exp(-(u @ w + s @ u_mat + b)))
                s = z * s + (1 - z) * u
            else:
                z = z_of(t, u, s)
                s = z * s + (1 - z) * u
            np.testing.assert_allclose(got[t], s, atol=1e-5, err_msg=f"{gate} loop {t}")


def test_last_gate_without_cache_is_ouro(ouro_params):
    """With one chunk and s_t = u_t, MELT's keys and values are Ouro's at every loop."""
    model, params = _melt(ouro_params, gate="last")
    melt = model.apply({"params": params}, TOKENS, exit_policy=None).loop_hidden
    ouro = OuroModel(OURO).apply({"params": ouro_params}, TOKENS, exit_policy=None).loop_hidden
    np.testing.assert_allclose(melt, ouro, atol=1e-6, rtol=0)


def test_saturated_learned_gates_and_zero_decay_equal_the_last_loop_gate(ouro_params):
    """z -> 0 makes every variant keep the last loop's row: the chunked prefill with a cache agrees."""

    def chunked(model, params):
        cache = model.init_cache(TOKENS.shape[0], TOKENS.shape[1])
        return np.asarray(prefill(model, params, TOKENS, cache, chunk_size=3)[0])

    expected = chunked(*_melt(ouro_params, gate="last"))
    for fields in (
        dict(gate="elementwise", gate_bias_init=-1e4),
        dict(gate="scalar", gate_bias_init=-1e4),
        dict(gate="ema", gate_ema_decay=0.0),
    ):
        np.testing.assert_allclose(chunked(*_melt(ouro_params, **fields)), expected, atol=1e-5, err_msg=str(fields))
    # and a gate that keeps part of the earlier loops computes something else
    assert np.abs(chunked(*_melt(ouro_params, gate="mean")) - expected).max() > 1e-3


@pytest.mark.parametrize("gate", GATES)
def test_params_of_every_gate_match_the_table(ouro_params, gate):
    model, params = _melt(ouro_params, gate=gate, gate_bias_init=-2.5)
    flat = {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
    abstract = jax.tree_util.tree_leaves_with_path(abstract_params(model))
    assert {"/".join(str(k.key) for k in path): tuple(x.shape) for path, x in abstract} == param_shapes(model.config)
    assert {k: tuple(v.shape) for k, v in flat.items()} == param_shapes(model.config)
    own_init = init_params(model, jax.random.key(3))["layers"].get("kv_gate", {})
    for name, value in own_init.items():  # melt_from_ouro starts the gate where the module would
        np.testing.assert_array_equal(params["layers"]["kv_gate"][name], value)


def test_bad_gate_settings_are_refused():
    with pytest.raises(ConfigError, match="config field gate must be one of"):
        MeltConfig.from_ouro(OURO, gate="median")
    with pytest.raises(ConfigError, match="gate_ema_decay"):
        MeltConfig.from_ouro(OURO, gate="ema", gate_ema_decay=1.0)
    with pytest.raises(RunConfigError, match="gate must be one of"):
        TrainConfig(gate="median").validate()
