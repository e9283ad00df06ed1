"""The choices the model makes when a program is traced for a GPU, where data-dependent control flow
waits on the host (melt_jax.model.attention.control_flow_on_device): the slot arrays are read with
static shapes instead of up to their filled part, the cache's rows written without a loop or a
branch, MELT's gate computed at the first loop and not selected instead of branched around, and in
the inference layout the loops written out (all of them run, exited tokens frozen, where loops are
skipped elsewhere). Traced here on the CPU with the platform answered "gpu": the same numbers as the
CPU's choices, and a decode step with no control flow left in it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_sources import Q, _context, _empty_cache, _rows
from tiny_models import DEFAULT

import melt_jax.model.attention.implementation as implementation
from melt_jax.inference.decoding import run_prompt
from melt_jax.model import ExitPolicy, model_for, with_layer_layout
from melt_jax.model.attention import SlotCache, control_flow_on_device
from melt_jax.model.attention.dense import dense_history_and_own, few_queries_history_and_own, sum_parts
from melt_jax.model.attention.masks import history_and_own_mask
from melt_jax.model.layers import weight_einsum

TOL = 1e-5


@pytest.fixture
def traced_for_gpu(monkeypatch):
    monkeypatch.setattr(implementation, "target_platform", lambda: "gpu")
    assert not control_flow_on_device()


def _attend_rows(source, queries, positions):
    rows, cache = _rows(3), _empty_cache((3, 2))
    rows = type(rows)(k=rows.k[:, : queries.shape[1]], v=rows.v[:, : queries.shape[1]])
    carried = source.begin(cache, rows.k.shape)
    attended, carried = source.attend(queries, rows, None, carried, _context(positions), 1, 2)
    return attended, source.end(carried, positions)


@pytest.mark.parametrize("num_queries", [1, 6], ids=["decode", "chunk"])
def test_static_reading_of_the_slot_array_changes_nothing(traced_for_gpu, num_queries):
    """One query (products and sums over the slot array) and a chunk of six (dots), rows starting at
    different positions, against the whole slot array read on the CPU's path."""
    positions = jnp.stack([jnp.arange(3, 3 + num_queries), jnp.arange(1, 1 + num_queries)]).astype(jnp.int32)
    queries = Q[:, :num_queries]
    got, got_cache = _attend_rows(SlotCache(filled_only=True), queries, positions)
    want, want_cache = _attend_rows(SlotCache(filled_only=False), queries, positions)
    np.testing.assert_allclose(got, want, atol=TOL)
    np.testing.assert_array_equal(got_cache.k, want_cache.k)


def _decode(model, params, exit_policy, batch=2):
    """Logits of a 5-token prompt's prefill, then of three decode steps, from freshly traced programs,
    and the cache after them, for the first `batch` rows of two. The second row goes on at position
    10 of 12 (as if its prompt were longer): its third new token does not fit in the cache and is
    dropped."""
    cache = model.init_cache(batch, 12)
    tokens = jnp.array([[5, 9, 2, 7, 1], [3, 3, 8, 0, 4]], jnp.int32)[:batch]
    prefill = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, exit_policy=exit_policy))
    out = prefill(params, tokens, cache)
    logits, cache = [out.logits[:, -1]], out.cache.replace(end_index=jnp.array([5, 10], jnp.int32)[:batch])

    def decode_one(params, token, cache):
        out = model.apply({"params": params}, token[:, None], cache=cache, exit_policy=exit_policy)
        return out.logits[:, 0], out.cache

    step = jax.jit(decode_one)
    token = jnp.argmax(logits[-1], axis=-1)
    for _ in range(3):
        step_logits, cache = step(params, token, cache)
        logits.append(step_logits)
        token = jnp.argmax(step_logits, axis=-1)
    return np.stack(logits), cache, step


@pytest.mark.parametrize("kind", ["ouro", "melt"])
@pytest.mark.parametrize("policy", ["last", "threshold:0.5"], ids=["last", "skipping-threshold"])
def test_decoding_traced_for_a_gpu_gives_the_same_logits(kind, policy, ouro_of, melt_of, monkeypatch):
    tiny = ouro_of(DEFAULT) if kind == "ouro" else melt_of(DEFAULT)
    model, params = with_layer_layout(model_for(tiny.config), tiny.params, scan_layers=False)
    exit_policy = ExitPolicy.parse(policy, model.config, skip_loops=policy != "last")
    want, want_cache, _ = _decode(model, params, exit_policy)
    monkeypatch.setattr(implementation, "target_platform", lambda: "gpu")
    got, got_cache, step = _decode(model, params, exit_policy)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got_cache.k, want_cache.k, atol=TOL)
    np.testing.assert_allclose(got_cache.v, want_cache.v, atol=TOL)
    np.testing.assert_array_equal(got_cache.end_index, want_cache.end_index)
    # Straight code: the loops written out, no while loop and no conditional left in the program.
    cache = model.init_cache(2, 12)
    text = step.lower(params, jnp.zeros((2,), jnp.int32), cache).as_text()
    assert "stablehlo.while" not in text and "stablehlo.case" not in text and "stablehlo.if" not in text


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_chunked_prefill_through_the_pallas_kernel_traced_for_a_gpu_gives_the_same_logits(
    kind, ouro_of, melt_of, monkeypatch
):
    """A 20-token prompt prefilled in chunks of 8, 8 and 4 through the Pallas GPU kernel (interpreted
    here), the layers and loops written out, so that each chunk's kernel reads its slot array in place
    in the cache (whose 26 slots are no whole number of key blocks): the CPU's dense logits and cache."""
    tiny = ouro_of(DEFAULT) if kind == "ouro" else melt_of(DEFAULT)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, tiny.config.vocab_size, size=(2, 20)))

    def prefill(config):
        model, params = with_layer_layout(model_for(config), tiny.params, scan_layers=False)
        run = lambda p: run_prompt(model, p, tokens, model.init_cache(2, 26), ExitPolicy.last(), 8)  # noqa: E731
        return jax.jit(run)(params), run, params

    (want, want_cache), _, _ = prefill(tiny.config)
    monkeypatch.setattr(implementation, "target_platform", lambda: "gpu")
    (got, got_cache), run, params = prefill(tiny.config.replace(attention="pallas_gpu"))
    assert "pallas_call" in str(jax.make_jaxpr(run)(params))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_cache.k, want_cache.k, atol=1e-5)
    np.testing.assert_allclose(got_cache.v, want_cache.v, atol=1e-5)


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_decoding_one_row_traced_for_a_gpu_gives_the_same_logits(kind, ouro_of, melt_of, monkeypatch):
    """Batch 1, where a GPU program multiplies the layers' weights by one row of activations as two
    (`weight_einsum`) and splits the attention's weighted sum over the slot array in parts."""
    tiny = ouro_of(DEFAULT) if kind == "ouro" else melt_of(DEFAULT)
    model, params = with_layer_layout(model_for(tiny.config), tiny.params, scan_layers=False)
    want, want_cache, _ = _decode(model, params, ExitPolicy.last(), batch=1)
    monkeypatch.setattr(implementation, "target_platform", lambda: "gpu")
    got, got_cache, step = _decode(model, params, ExitPolicy.last(), batch=1)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got_cache.v, want_cache.v, atol=TOL)
    # The step's projections are dots of two rows: q/k/v, o, gate, up, down (and MELT's gate) per layer.
    jaxpr = str(jax.make_jaxpr(step)(params, jnp.zeros((1,), jnp.int32), model.init_cache(1, 12)))
    two_row_dots = re.findall(r":f32\[2,1,[0-9,]+\] = dot_general", jaxpr)
    assert len(two_row_dots) >= 7 * model.config.num_layers * model.config.num_loops


def test_one_row_multiplied_as_two_is_the_same_product():
    rng = np.random.default_rng(0)
    weight = jnp.asarray(rng.normal(size=(16, 3, 4)), jnp.float32)  # [H, N, D]
    for shape in [(1, 1, 16), (2, 1, 16), (1, 3, 16)]:  # one row; two rows and three (no padding)
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        want = jnp.einsum("BSH,HND->BSND", x, weight)
        got = weight_einsum("BSH,HND->BSND", x, weight, jnp.float32, gpu_matmuls=True)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    program = str(jax.make_jaxpr(lambda x: weight_einsum("BSH,HND->BSND", x, weight, jnp.float32, True))(x[:1, :1]))
    assert "pad[" in program and "dot_general" in program


def test_a_sum_with_few_outputs_is_split_in_parts_of_the_keys():
    assert sum_parts(4096, 2048) == 8  # Ouro-1.4B at batch 1: 16 heads x 128
    assert sum_parts(4096, 4 * 2048) == 2 and sum_parts(4096, 16 * 2048) == 1
    assert sum_parts(4001, 2048) == 1  # no power of two divides the keys: one part
    assert sum_parts(12, 64) == 4
    # Split in parts or not, the same attention as dense (one query per row over 10 slots: 2 parts).
    history, rows = _empty_cache((1,)), _rows(1)
    mask = history_and_own_mask(_context(jnp.array([[7], [3]], jnp.int32)), history.k.shape[-2], None)
    k, v = rows.k[:, :1], rows.v[:, :1]
    got = few_queries_history_and_own(Q[:, :1], history.k[0], history.v[0], k, v, mask)
    want = dense_history_and_own(Q[:, :1], history.k[0], history.v[0], k, v, mask)
    np.testing.assert_allclose(got, want, atol=TOL)
