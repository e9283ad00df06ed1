"""The two layer layouts (`config.scan_layers`, melt_jax/model/ouro.py) compute the same model: the
scanned stack of training and checkpoints, and the unrolled layers of inference, which read their
weights in place. Converting params between them is exact, checkpoints always hold the scanned
layout, and `load_model` gives the unrolled one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DEFAULT

from melt_jax.checkpoint import load_params, save_params
from melt_jax.errors import ConfigError, GenerationError
from melt_jax.inference import SamplingConfig, check_params, decode_step, generate, load_model, prefill
from melt_jax.model import (
    INTERMEDIATES,
    MeltConfig,
    OuroConfig,
    abstract_params,
    model_for,
    stack_layers,
    unstack_layers,
    with_layer_layout,
)
from melt_jax.sharding import MeshConfig, make_mesh, param_shardings


@pytest.fixture(scope="module", params=["ouro", "melt"])
def scanned(request, melt_of):
    """(model, params) in the scanned layout; MELT with its random gates, chunks of 4."""
    melt = melt_of(DEFAULT)
    if request.param == "ouro":
        return model_for(melt.ouro.config), jax.tree.map(jnp.asarray, melt.ouro.params)
    return model_for(melt.config.replace(chunk_size=4)), jax.tree.map(jnp.asarray, melt.params)


def _tokens(vocab_size: int, shape=(2, 11)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(3).integers(1, vocab_size, shape), jnp.int32)


def test_unstacking_gives_one_subtree_per_layer_and_stacking_inverts_it(scanned):
    model, params = scanned
    unrolled = unstack_layers(params)
    num_layers = model.config.num_layers
    assert "layers" not in unrolled and [f"layers_{i}" in unrolled for i in range(num_layers)] == [True] * num_layers
    for i in range(num_layers):
        layer = jax.tree.map(lambda x, i=i: x[i], params["layers"])
        assert jax.tree.all(jax.tree.map(np.array_equal, unrolled[f"layers_{i}"], layer))
    assert jax.tree.all(jax.tree.map(np.array_equal, stack_layers(unrolled), params))
    unrolled_model, _ = with_layer_layout(model, params, scan_layers=False)
    shapes = jax.tree.map(lambda x: x.shape, abstract_params(unrolled_model))
    assert shapes == jax.tree.map(lambda x: x.shape, unrolled)


def test_stacking_names_what_is_missing():
    with pytest.raises(ValueError, match="layers_0"):
        stack_layers({"embedder": {}, "layers_1": {}})


def test_forward_is_the_same_in_both_layouts(scanned):
    """Every loop's logits, exit distribution and per-layer intermediates."""
    model, params = scanned
    unrolled, unrolled_params = with_layer_layout(model.clone(collect=INTERMEDIATES), params, scan_layers=False)
    tokens = _tokens(model.config.vocab_size)
    want = model.clone(collect=INTERMEDIATES).apply({"params": params}, tokens, return_loop_logits=True)
    got = unrolled.apply({"params": unrolled_params}, tokens, return_loop_logits=True)
    for name in ("loop_logits", "exit_pdf", "logits"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6, err_msg=name)
    for name in INTERMEDIATES:
        assert got.intermediates[name].shape == want.intermediates[name].shape
        np.testing.assert_allclose(got.intermediates[name], want.intermediates[name], rtol=1e-6, atol=1e-6)


def test_gradients_are_the_same_in_both_layouts(scanned):
    model, params = scanned
    unrolled, unrolled_params = with_layer_layout(model, params, scan_layers=False)
    tokens = _tokens(model.config.vocab_size)

    def loss(model, params):
        return jnp.mean(model.apply({"params": params}, tokens, return_loop_logits=True).loop_logits ** 2)

    want = jax.grad(lambda p: loss(model, p))(params)
    got = stack_layers(jax.grad(lambda p: loss(unrolled, p))(unrolled_params))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


def test_prefill_and_decode_are_the_same_in_both_layouts(scanned):
    model, params = scanned
    unrolled, unrolled_params = with_layer_layout(model, params, scan_layers=False)
    tokens = _tokens(model.config.vocab_size)
    logits = {}
    for name, (m, p) in {"scanned": (model, params), "unrolled": (unrolled, unrolled_params)}.items():
        prompt_logits, cache = prefill(m, p, tokens[:, :9], m.init_cache(2, 16))
        steps = []
        for position in (9, 10):
            step_logits, cache = decode_step(m, p, tokens[:, position], cache)
            steps.append(step_logits)
        logits[name] = (prompt_logits, *steps)
    for got, want in zip(logits["unrolled"], logits["scanned"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_generation_is_the_same_in_both_layouts(scanned):
    model, params = scanned
    prompts = [[5, 9, 2, 7, 1], [3, 8]]
    sampling = SamplingConfig(max_new_tokens=6)
    want = generate(model, params, prompts, sampling)
    got = generate(*with_layer_layout(model, params, scan_layers=False), prompts, sampling)
    assert got.tokens == want.tokens


def test_checkpoints_hold_the_scanned_layout_and_load_model_unrolls(scanned, tmp_path):
    model, params = scanned
    unrolled, unrolled_params = with_layer_layout(model, params, scan_layers=False)
    save_params(tmp_path / "ckpt", unrolled.config, unrolled_params)
    config, loaded = load_params(tmp_path / "ckpt")
    assert config.scan_layers and config == model.config
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
    inference_model, inference_params = load_model(tmp_path / "ckpt")
    assert not inference_model.config.scan_layers
    assert jax.tree.all(jax.tree.map(np.array_equal, inference_params, unrolled_params))
    check_params(inference_model, inference_params)


def test_params_of_the_other_layout_are_refused_by_name(scanned):
    model, params = scanned
    unrolled, unrolled_params = with_layer_layout(model, params, scan_layers=False)
    with pytest.raises(GenerationError, match="missing .*layers_0"):
        check_params(unrolled, params)
    with pytest.raises(GenerationError, match="unexpected .*layers_0"):
        check_params(model, unrolled_params)


def test_a_melt_checkpoint_is_named_as_such_in_the_unrolled_layout(melt_of):
    melt = melt_of(DEFAULT)
    ouro, _ = with_layer_layout(model_for(melt.ouro.config), melt.ouro.params, scan_layers=False)
    _, melt_params = with_layer_layout(model_for(melt.config), melt.params, scan_layers=False)
    with pytest.raises(GenerationError, match="MELT checkpoint"):
        check_params(ouro, melt_params)


def test_unrolled_layers_are_sharded_like_one_slice_of_the_stack(scanned):
    model, params = scanned
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, num_devices=4))
    stacked = param_shardings(params, mesh)
    unrolled = param_shardings(unstack_layers(params), mesh)
    want = jax.tree.map(lambda s: tuple(s.spec)[1:], stacked["layers"])
    assert any("tensor" in spec for spec in jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, tuple)))
    for i in range(model.config.num_layers):
        assert jax.tree.map(lambda s: tuple(s.spec), unrolled[f"layers_{i}"]) == want


def test_scan_layers_must_be_a_boolean():
    with pytest.raises(ConfigError, match="scan_layers"):
        OuroConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                   scan_layers="no")  # fmt: skip


def _decode_step_temporaries(model, params) -> int:
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    cache = jax.eval_shape(lambda: model.init_cache(1, 32))
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    return decode_step.lower(model, params, token, cache).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_unrolled_decoding_reads_the_weights_in_place(kind):
    """A decode step's temporaries: the scanned stack materialises each layer's weights (at least one
    MLP matrix at a time), the unrolled layers copy no weight at all, so their temporaries stay below
    one MLP matrix; H = 256 and I = 1024 make one matrix (1 MiB) larger than everything else the
    step computes."""
    ouro = OuroConfig(
        vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        total_ut_steps=4,
    )  # fmt: skip
    model = model_for(ouro if kind == "ouro" else MeltConfig.from_ouro(ouro, chunk_size=4))
    unrolled_model = model.clone(config=model.config.replace(scan_layers=False))
    matrix_bytes = 256 * 1024 * 4
    scanned = _decode_step_temporaries(model, abstract_params(model))
    unrolled = _decode_step_temporaries(unrolled_model, abstract_params(unrolled_model))
    assert scanned >= matrix_bytes
    assert unrolled < matrix_bytes, (unrolled, matrix_bytes)
