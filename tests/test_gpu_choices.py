"""The choices the model makes when a program is traced for a GPU, where data-dependent control flow
waits on the host (melt_jax.model.attention.control_flow_on_device): the slot arrays are read with
static shapes instead of up to their filled part, the cache's rows written without a loop or a
branch, MELT's gate computed at the first loop and not selected instead of branched around, and in
the inference layout the loops written out (all of them run, exited tokens frozen, where loops are
skipped elsewhere). Traced here on the CPU with the platform answered "gpu": the same numbers as the
CPU's choices, and a decode step with no control flow left in it."""

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


def _decode(model, params, exit_policy):
    """Logits of a 5-token prompt's prefill, then of three decode steps, from freshly traced programs,
    and the cache after them. The second row goes on at position 10 of 12 (as if its prompt were
    longer): its third new token does not fit in the cache and is dropped."""
    cache = model.init_cache(2, 12)
    tokens = jnp.array([[5, 9, 2, 7, 1], [3, 3, 8, 0, 4]], jnp.int32)
    prefill = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, exit_policy=exit_policy))
    out = prefill(params, tokens, cache)
    logits, cache = [out.logits[:, -1]], out.cache.replace(end_index=jnp.array([5, 10], jnp.int32))

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
