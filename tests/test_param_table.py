"""The parameter table (melt_jax/model/param_table.py) against the flax models, and what is derived from it:
sharding axes, optimizer groups and weight decay, MELT's new gates, the check of a checkpoint's model
type."""

import dataclasses

import jax
import numpy as np
import pytest

from melt_jax.errors import ShardingError
from melt_jax.model import (
    MeltConfig,
    MeltModel,
    OuroConfig,
    OuroModel,
    ParamSpec,
    abstract_params,
    init_params,
    melt_from_ouro,
    param_paths,
    param_shapes,
    param_table,
)
from melt_jax.model.param_table import PARAMS, model_type_of_params
from melt_jax.sharding import LOGICAL_RULES, logical_axes_of
from melt_jax.train.optimizer import _decay_mask, param_groups

MODELS = {"ouro": OuroModel, "melt": MeltModel}


def tiny_config(model_type: str, tied: bool, kv_heads: int, **fields) -> OuroConfig:
    """The tiny preset (4 query heads) with `kv_heads` key/value heads, as an Ouro or a MELT config."""
    config = OuroConfig.preset("tiny", tie_word_embeddings=tied, num_key_value_heads=kv_heads, **fields)
    return MeltConfig.from_ouro(config) if model_type == "melt" else config


@pytest.mark.parametrize("model_type", ["ouro", "melt"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_table_shapes_equal_the_model_params(model_type, tied, kv_heads):
    config = tiny_config(model_type, tied, kv_heads, param_dtype="bfloat16")
    abstract = param_paths(abstract_params(MODELS[model_type](config)))
    assert {k: tuple(v.shape) for k, v in abstract.items()} == param_shapes(config)
    assert {v.dtype for v in abstract.values()} == {np.dtype("bfloat16")}


@pytest.mark.parametrize("preset", ["ouro-1.4b", "ouro-2.6b"])
def test_table_shapes_of_the_real_models(preset):
    for config in (OuroConfig.preset(preset), MeltConfig.from_ouro(OuroConfig.preset(preset))):
        model = MODELS[config.model_type](config)
        abstract = param_paths(abstract_params(model))
        assert {k: tuple(v.shape) for k, v in abstract.items()} == param_shapes(config)


def test_rows_are_consistent():
    assert len({spec.path for spec in PARAMS}) == len(PARAMS)
    assert len({spec.hf for spec in PARAMS}) == len(PARAMS)
    for spec in PARAMS:
        assert spec.per_layer == spec.path.startswith("layers/"), spec.path  # the layer scan's params
        assert all(name is None or name in LOGICAL_RULES for name in spec.axes), spec.path
        if spec.when == param_table.MELT:  # melt_from_ouro adds them to an Ouro checkpoint
            assert spec.init is not None and spec.role == param_table.KV_GATE, spec.path


def test_rows_are_checked_when_built():
    row = PARAMS[1]  # layers/attn/q_proj/kernel
    with pytest.raises(ValueError, match="axis names"):
        dataclasses.replace(row, axes=("layers", "embed"))
    with pytest.raises(ValueError, match="per-layer"):
        dataclasses.replace(row, hf="model.q_proj.weight")
    with pytest.raises(ValueError, match="role"):
        dataclasses.replace(row, role="gate")
    with pytest.raises(ValueError, match="when"):
        dataclasses.replace(row, when="tied")
    with pytest.raises(ValueError, match="2-D"):
        ParamSpec("final_norm/scale", ("H",), ("norm",), "model.norm.weight", ("H",), transpose=True)


def test_logical_axes_come_from_the_table():
    assert logical_axes_of(("layers", "kv_gate", "w_z"), 3) == ("layers", "embed", "gate_out")
    assert logical_axes_of(("exit_gate", "kernel"), 2) == ("norm", None)
    with pytest.raises(ShardingError, match="no sharding rule for param layers/attn/bias"):
        logical_axes_of(("layers", "attn", "bias"), 2)
    with pytest.raises(ShardingError, match="has 2 axes, its sharding rule names 3"):
        logical_axes_of(("layers", "kv_gate", "w_z"), 2)


def test_optimizer_groups_and_decay_come_from_the_table():
    config = tiny_config("melt", tied=False, kv_heads=2)
    params = abstract_params(MeltModel(config))
    decay = param_paths(_decay_mask(params))
    no_decay = sorted(path for path, d in decay.items() if not d)
    assert no_decay == sorted([p for p in decay if p.endswith("/scale")] + ["exit_gate/bias", "layers/kv_gate/b_z"])
    groups = param_paths(param_groups(params))
    assert sorted(p for p, g in groups.items() if g == "gate") == [f"layers/kv_gate/{n}" for n in ("b_z", "u_z", "w_z")]
    assert {g for p, g in groups.items() if "kv_gate" not in p} == {"loop_lm"}
    stage2 = param_paths(param_groups(params, "exit_gate"))
    assert sorted(p for p, g in stage2.items() if g == "loop_lm") == ["exit_gate/bias", "exit_gate/kernel"]
    assert {g for p, g in stage2.items() if not p.startswith("exit_gate/")} == {"frozen"}
    with pytest.raises(ValueError, match="no row in the parameter table"):
        _decay_mask({"extra": {"kernel": np.zeros((2, 2))}})


def test_melt_gates_start_as_the_model_initialises_them():
    """melt_from_ouro fills MELT's new params from the table's inits; MeltModel's own initialisers
    give the same values, so a MELT model made from Ouro starts where a fresh one does."""
    ouro = tiny_config("ouro", tied=False, kv_heads=2)
    ouro_params = jax.tree.map(np.asarray, init_params(OuroModel(ouro), jax.random.key(0)))
    config, params = melt_from_ouro(ouro, ouro_params, gate_bias_init=-2.5)
    fresh = param_paths(init_params(MeltModel(config), jax.random.key(1)))
    added = param_paths(params)
    for spec in PARAMS:
        if spec.when == param_table.MELT:
            np.testing.assert_array_equal(added[spec.path], fresh[spec.path], err_msg=spec.path)
    assert model_type_of_params(added) == "melt" and model_type_of_params(param_paths(ouro_params)) == "ouro"


def test_param_paths_and_their_inverse():
    params = {"layers": {"mlp": {"up": 1, "down": 2}}, "embedder": {"embedding": 3}}
    flat = param_paths(params)
    assert flat == {"embedder/embedding": 3, "layers/mlp/down": 2, "layers/mlp/up": 1}
    assert param_table.params_from_paths(flat) == params
    by_names = param_paths(params, key=param_table.key_names)
    assert by_names[("layers", "mlp", "up")] == 1 and param_table.params_from_paths(by_names) == params
    assert param_paths(params, key=jax.tree_util.keystr)["['embedder']['embedding']"] == 3
    grown = param_table.params_from_paths({"layers/gate/b": 4}, base=params)
    assert grown["layers"]["gate"] == {"b": 4} and "gate" not in params["layers"]
    assert grown["embedder"] is params["embedder"]
