"""Checks of the independent PyTorch MELT reference (tests/torch_melt_reference.py), all float64.

Invariants (docs/melt.md): decode == chunk-1 prefill; chunked decode == the forward with the
same chunks; two-pass == sequential; alpha 0 == Ouro; z == 0 == Ouro with last-loop cache sharing; the
stored rows are the last loop's keys; one chunk differs from chunk 1. Each on the shared tiny models of
every structure (tests/tiny_models.py); the checks that need a second loop on those with more than one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import DIAGONAL, LOOPED

from melt_jax.testing.torch_melt import MeltReference, gate_names, ouro_last_loop_sharing_decode
from melt_jax.testing.torch_ouro import OuroReference, apply_rope, rms_norm, rope_cos_sin

TOL = 1e-10
S = 12
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=DIAGONAL, ids=str)
def model(request, checkpoint_of):
    """(HF config, state dict, gates, float64 MeltReference) of the shared tiny checkpoint."""
    checkpoint = checkpoint_of(request.param)
    return checkpoint.hf_config, checkpoint.state_dict, checkpoint.gates, checkpoint.melt_reference


# For checks that need a second loop, one that reads rows another loop wrote.
needs_loops = pytest.mark.parametrize("model", LOOPED, ids=str, indirect=True)


@pytest.fixture(scope="module")
def ids(model):
    return np.random.default_rng(0).integers(0, model[0]["vocab_size"], size=(2, S))


def _close(a, b, atol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.max(np.abs(a - b)))
    assert err <= atol, f"max abs err {err:.3e}"


def _zero_gates(cfg):
    """W_z = U_z = 0, b_z = -1e4: z = sigmoid(-1e4) = 0 exactly in float64, so s_t = u_t."""
    H = cfg["hidden_size"]
    g = {}
    for i in range(cfg["num_hidden_layers"]):
        w, u, b = gate_names(i)
        g[w], g[u], g[b] = np.zeros((H, H)), np.zeros((H, H)), np.full((H,), -1e4)
    return g


def test_shapes_and_gate_convention(model, ids):
    cfg, sd, gates, m = model
    H, T, L, V = cfg["hidden_size"], cfg["total_ut_steps"], cfg["num_hidden_layers"], cfg["vocab_size"]
    assert gates[gate_names(0)[0]].shape == (H, H) and gates[gate_names(0)[2]].shape == (H,)
    o = m.forward_chunked(ids, 4)
    B, K, D = 2, cfg["num_key_value_heads"], cfg["head_dim"]
    assert o["step_logits"].shape == (T, B, S, V) and o["step_logits"].dtype == np.float64
    assert o["hidden_steps"].shape == (T, B, S, H)
    assert o["gate_logits"].shape == (T, B, S) and o["exit_pdf"].shape == (B, S, T)
    np.testing.assert_allclose(o["exit_pdf"].sum(-1), 1.0, atol=1e-12)
    assert o["attn_outputs"].shape == (T, L, B, S, H)
    assert o["final_k"].shape == o["final_v"].shape == (L, B, S, K, D)
    assert o["k_steps"].shape == (T, L, B, S, K, D)


@pytest.mark.parametrize("chunk", [1, 3, 5, [2, 7, 3]], ids=["chunk1", "chunk3", "chunk5", "chunks2-7-3"])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_two_pass_equals_sequential(model, ids, chunk, alpha):
    m = model[3]
    two, seq = m.forward_chunked(ids, chunk, alpha), m.forward_sequential(ids, chunk, alpha)
    assert two.keys() == seq.keys()
    for k in two:
        _close(two[k], seq[k])


def test_decode_equals_chunk1(model, ids):
    m = model[3]
    last = m.forward_chunked(ids, 1)["step_logits"][-1]
    for n in (1, 6, S - 1):
        dec = m.decode(ids, n, prefill_chunk=1)
        assert dec.shape == (2, S - n, model[0]["vocab_size"])
        _close(dec, last[:, n - 1 : S - 1])


@needs_loops
@pytest.mark.parametrize("C,n", [(3, 6), (4, 7), (8, 8)])
def test_chunked_prefill_then_decode(model, ids, C, n):
    m = model[3]
    dec = m.decode(ids, n, prefill_chunk=C)
    # the prefill part: forward_chunked with chunk C on the prompt alone
    _close(dec[:, 0], m.forward_chunked(ids[:, :n], C)["step_logits"][-1][:, n - 1])
    # everything: chunks of C over the prompt, then chunks of 1
    lengths = [min(C, n - a) for a in range(0, n, C)] + [1] * (S - n)
    _close(dec, m.forward_chunked(ids, lengths)["step_logits"][-1][:, n - 1 : S - 1])
    # chunked prefill is not chunk-1 prefill (the model reads the rows)
    assert np.max(np.abs(dec - m.decode(ids, n, prefill_chunk=1))) > 1e-3


@pytest.mark.parametrize("chunk", [1, 4, S])
def test_alpha0_is_ouro(model, ids, chunk):
    cfg, sd, gates, m = model
    ouro = OuroReference(cfg, sd, dtype=torch.float64).forward(ids)
    o = m.forward_chunked(ids, chunk, alpha=0.0)
    for k in ("step_logits", "hidden_steps", "gate_logits", "exit_pdf"):
        _close(o[k], ouro[k])


@needs_loops
def test_zero_gate_is_last_loop_sharing(model, ids):
    cfg, sd, _, _ = model
    m0 = MeltReference(cfg, sd, _zero_gates(cfg))
    ref = ouro_last_loop_sharing_decode(cfg, sd, ids)
    _close(m0.forward_chunked(ids, 1)["step_logits"][-1], ref)
    _close(m0.decode(ids, 1, prefill_chunk=1), ref[:, : S - 1])
    # and it is not plain Ouro (T > 1 loops read other loops' rows)
    ouro_last = OuroReference(cfg, sd, dtype=torch.float64).forward(ids)["step_logits"][-1]
    assert np.max(np.abs(ref - ouro_last)) > 1e-3
    # the first token sees only itself: identical to Ouro
    _close(ref[:, 0], ouro_last[:, 0])


@needs_loops
def test_alpha_changes_and_one_chunk_differs(model, ids):
    m = model[3]
    one = m.forward_chunked(ids, S)["step_logits"]
    c1 = m.forward_chunked(ids, 1)["step_logits"]
    assert np.max(np.abs(one[-1] - c1[-1])) > 1e-3
    # token 0 is alone in its chunk either way
    _close(one[:, :, 0], c1[:, :, 0])
    # alpha matters
    assert (
        np.max(np.abs(m.forward_chunked(ids, 3, alpha=0.5)["step_logits"] - m.forward_chunked(ids, 3)["step_logits"]))
        > 1e-3
    )


@needs_loops
@pytest.mark.parametrize("chunk", [1, 5])
def test_final_rows_are_last_loop_keys(model, ids, chunk):
    cfg, sd, gates, m = model
    o = m.forward_chunked(ids, chunk, alpha=0.7)
    _close(o["final_k"], o["k_steps"][-1])
    _close(o["final_v"], o["v_steps"][-1])
    assert np.max(np.abs(o["k_steps"][-1] - o["k_steps"][-2])) > 1e-3
    # layer 0 recomputed by hand from the outputs: its input at loop t is embed (t=0) or hidden_steps[t-1]
    K, D = cfg["num_key_value_heads"], cfg["head_dim"]
    f = lambda n: torch.from_numpy(np.asarray(sd[n], dtype=np.float64))  # noqa: E731
    g = lambda n: torch.from_numpy(np.asarray(gates[n], dtype=np.float64))  # noqa: E731
    wz, uz, bz = (g(n) for n in gate_names(0))
    ins = [f("model.embed_tokens.weight")[torch.from_numpy(ids)]] + [
        torch.from_numpy(h) for h in o["hidden_steps"][:-1]
    ]
    s = None
    for h in ins:
        u = rms_norm(h, f("model.layers.0.input_layernorm.weight"), cfg["rms_norm_eps"])
        if s is None:
            s = u
        else:
            z = torch.sigmoid(u @ wz + s @ uz + bz)
            s = z * s + (1 - z) * u
    cos, sin = rope_cos_sin(torch.arange(S), D, cfg["rope_theta"], torch.float64)
    k = (s @ f("model.layers.0.self_attn.k_proj.weight").T).view(2, S, K, D).transpose(1, 2)
    k = apply_rope(k, cos, sin).transpose(1, 2)
    v = (s @ f("model.layers.0.self_attn.v_proj.weight").T).view(2, S, K, D)
    _close(o["final_k"][0], k.numpy())
    _close(o["final_v"][0], v.numpy())


def test_attn_outputs_at_alpha0_match_ouro_layer(model, ids):
    """o(l, t) at alpha 0 is Ouro's attention sublayer output: check layer 0, loop 0 via Ouro's layer
    output h1 = embed + N2(a) + N4(mlp(...)) (recomputing the MLP part from a)."""
    cfg, sd, _, m = model
    o = m.forward_chunked(ids, 4, alpha=0.0)
    r = OuroReference(cfg, sd, dtype=torch.float64)
    out = r.forward(ids)
    p = r.layers[0]
    a = torch.from_numpy(o["attn_outputs"][0, 0])
    h = r.embed[torch.from_numpy(ids)] + rms_norm(a, p["n2"], r.eps)
    h = h + rms_norm(r._mlp(p, rms_norm(h, p["n3"], r.eps)), p["n4"], r.eps)
    _close(h.numpy(), out["layer_outputs"][0])
