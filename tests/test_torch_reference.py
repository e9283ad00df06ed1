"""Checks of the independent PyTorch reference (tests/torch_reference.py).

1. Against the golden outputs of the upstream code on the tiny checkpoint (tests/data/ouro-tiny).
2. Self-consistency that the golden cannot see: cached decoding == full forward over longer prompts
   with a small rope_theta, on the shared tiny models of each structure (MQA, GQA, MHA; 1, 3 and 4
   loops), RoPE against a complex-number formulation, float64 vs float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import DIAGONAL, GROUPED

from melt_jax.testing.hf_checkpoints import random_ouro
from melt_jax.testing.torch_ouro import (
    OuroReference,
    apply_rope,
    exit_pdf_from_gate_logits,
    rope_cos_sin,
    threshold_exit_loops,
)

GOLDEN = Path(__file__).resolve().parent / "data" / "ouro-tiny"
ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "reference.npz"))


@pytest.fixture(scope="module")
def tiny_parts():
    with open(GOLDEN / "config.json") as f:
        cfg = json.load(f)
    return cfg, load_file(str(GOLDEN / "model.safetensors"))


@pytest.fixture(scope="module")
def ref(tiny_parts):
    cfg, sd = tiny_parts
    return OuroReference(cfg, sd, dtype=torch.float32)


@pytest.fixture(scope="module")
def out(ref, golden):
    return ref.forward(golden["input_ids"])


def _close(a, b, atol=ATOL, rtol=0.0):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    assert err <= atol + rtol * scale, f"max abs err {err:.3e} (scale {scale:.3e})"
    return err


# ------------------------------------------------------------------------------------------------
# golden
# ------------------------------------------------------------------------------------------------


def test_from_pretrained_matches(golden, out):
    r = OuroReference.from_pretrained(str(GOLDEN))
    o = r.forward(golden["input_ids"])
    np.testing.assert_array_equal(o["step_logits"], out["step_logits"])


@pytest.mark.parametrize(
    "key", ["embeddings", "layer_outputs", "hidden_steps", "gate_logits", "exit_pdf", "step_logits"]
)
def test_forward_intermediates(golden, out, key):
    assert out[key].dtype == np.float32
    _close(out[key], golden[key])


def test_logits_default(ref, golden, out):
    logits, steps = ref.select_logits(out, "default")
    _close(logits, golden["logits_default"])
    # threshold 1.0 is the config default; same thing spelled explicitly
    logits2, steps2 = ref.select_logits(out, "threshold", threshold=1.0)
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_array_equal(steps, steps2)


def test_logits_exit_at(ref, golden, out):
    for t in range(ref.T):
        logits, steps = ref.select_logits(out, "step", step=t)
        _close(logits, golden["logits_exit_at"][t])
        assert (steps == t).all()


@pytest.mark.parametrize("cumsum", ["sequential", "torch"])
def test_logits_threshold(ref, golden, out, cumsum):
    thresholds = golden["thresholds"]
    assert len(thresholds) == 5
    for q, thr in enumerate(thresholds):
        logits, steps = ref.select_logits(out, "threshold", threshold=float(thr), cumsum=cumsum)
        np.testing.assert_array_equal(steps, golden["exit_steps_thr"][q], err_msg=f"threshold {thr}")
        _close(logits, golden["logits_thr"][q])


def test_logits_weighted(ref, golden, out):
    logits, steps = ref.select_logits(out, "weighted")
    assert steps is None
    _close(logits, golden["logits_weighted"])


def test_logits_last(ref, golden, out):
    logits, steps = ref.select_logits(out, "last")
    _close(logits, golden["logits_last_nothr"])
    assert (steps == ref.T - 1).all()


def test_loss(ref, golden):
    loss = ref.loss(golden["input_ids"])
    assert abs(loss - float(golden["loss_hf"])) <= ATOL


def test_per_step_ce(ref, golden):
    _close(ref.per_step_ce(golden["input_ids"]), golden["per_step_ce"])


@pytest.mark.parametrize("mode", ["default", "last"])
def test_decode_golden(ref, golden, mode):
    n = int(golden["n_prefill"])
    logits = ref.decode(golden["input_ids"], n, mode=mode)
    _close(logits, golden["logits_decode"])


def test_float64_close_to_golden(tiny_parts, golden):
    cfg, sd = tiny_parts
    r64 = OuroReference(cfg, sd, dtype=torch.float64)
    o = r64.forward(golden["input_ids"])
    assert o["step_logits"].dtype == np.float64
    _close(o["step_logits"], golden["step_logits"], atol=1e-4)
    _close(o["exit_pdf"], golden["exit_pdf"], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# self-consistency beyond the golden
# ------------------------------------------------------------------------------------------------


def _parts(checkpoint_of, structure):
    """(HF config, float32 torch state dict) of the shared tiny checkpoint of `structure`."""
    checkpoint = checkpoint_of(structure)
    return checkpoint.hf_config, {k: torch.from_numpy(v) for k, v in checkpoint.state_dict.items()}


@pytest.mark.parametrize("structure", DIAGONAL, ids=str)
def test_decode_equals_forward(checkpoint_of, structure):
    cfg, sd = _parts(checkpoint_of, structure)
    r = OuroReference(cfg, sd, dtype=torch.float64)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(2, 40))
    full = r.forward(ids)["step_logits"][-1]  # [B, S, V]
    for n in (1, 17, 39):
        dec = r.decode(ids, n, mode="last")
        assert dec.shape == (2, 40 - n, cfg["vocab_size"])
        _close(dec, full[:, n - 1 : 39], atol=1e-10)
    # fp32 too, at fp32 tolerance
    r32 = OuroReference(cfg, sd, dtype=torch.float32)
    _close(r32.decode(ids, 9, mode="last"), r32.forward(ids)["step_logits"][-1][:, 8:39], atol=1e-5)


@pytest.mark.parametrize("structure", DIAGONAL, ids=str)
def test_decode_default_mode_matches_forward_selection(checkpoint_of, structure):
    cfg, sd = _parts(checkpoint_of, structure)
    r = OuroReference(cfg, sd, dtype=torch.float64)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(2, 24))
    out = r.forward(ids)
    middle = structure.loops // 2
    for mode, kw in [("threshold", {"threshold": 0.5}), ("weighted", {}), ("step", {"step": middle})]:
        sel, _ = r.select_logits(out, mode, **kw)
        _close(r.decode(ids, 5, mode=mode, **kw), sel[:, 4:23], atol=1e-10)


@pytest.mark.parametrize("structure", GROUPED, ids=str)
def test_gqa_head_mapping(checkpoint_of, structure):
    """Query head h must read kv head h // (heads / kv_heads): duplicating the kv weights into an
    MHA model with that mapping must give the same outputs."""
    cfg, sd = _parts(checkpoint_of, structure)
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rep = nh // nkv
    sd_mha = dict(sd)
    for i in range(cfg["num_hidden_layers"]):
        for n in ("k", "v"):
            w = sd[f"model.layers.{i}.self_attn.{n}_proj.weight"].view(nkv, hd, -1)
            sd_mha[f"model.layers.{i}.self_attn.{n}_proj.weight"] = w[[h // rep for h in range(nh)]].reshape(
                nh * hd, -1
            )
    ids = np.random.default_rng(2).integers(0, cfg["vocab_size"], size=(1, 16))
    a = OuroReference(cfg, sd, dtype=torch.float64).forward(ids)["step_logits"]
    b = OuroReference({**cfg, "num_key_value_heads": nh}, sd_mha, dtype=torch.float64).forward(ids)["step_logits"]
    _close(a, b, atol=1e-12)


def test_rope_against_complex_form():
    """Rotate-half RoPE == multiplying the complex numbers x_j + i x_{j+hd/2} by e^{i pos theta^(-2j/hd)}."""
    hd, theta = 8, 50.0
    pos = torch.arange(0, 30)
    x = torch.randn(1, 2, 30, hd, dtype=torch.float64)
    cos, sin = rope_cos_sin(pos, hd, theta, torch.float64)
    got = apply_rope(x, cos, sin)
    want = torch.empty_like(x)
    for j in range(hd // 2):
        ang = pos.double() * theta ** (-2.0 * j / hd)
        z = torch.complex(x[..., j], x[..., j + hd // 2]) * torch.exp(1j * ang)
        want[..., j], want[..., j + hd // 2] = z.real, z.imag
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # relative-position property of the attention logits
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    rq = apply_rope(q.expand(1, 1, 30, hd), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 30, hd), cos, sin)[0, 0]
    assert math.isclose(float(rq[10] @ rk[3]), float(rq[27] @ rk[20]), rel_tol=1e-10)


def test_exit_rule_small_cases():
    g = torch.tensor([[0.0], [0.0], [0.0], [5.0]])  # [T=4, 1]
    pdf = exit_pdf_from_gate_logits(g)  # [1, 4]
    torch.testing.assert_close(pdf, torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert threshold_exit_loops(pdf, 0.5).item() == 0
    assert threshold_exit_loops(pdf, 0.6).item() == 1
    assert threshold_exit_loops(pdf, 0.875).item() == 2
    assert threshold_exit_loops(pdf, 1.0).item() == 3
    assert threshold_exit_loops(pdf, 2.0).item() == 3  # never reached -> last loop


def test_tied_embeddings_and_bf16_runs():
    cfg, sd = random_ouro(seed=3, tie_word_embeddings=True, vocab_size=32, hidden_size=32, intermediate_size=32)
    ids = np.random.default_rng(3).integers(0, 32, size=(1, 8))
    r64 = OuroReference(cfg, sd, dtype=torch.float64)
    rbf = OuroReference(cfg, sd, dtype=torch.bfloat16)
    o64, obf = r64.forward(ids), rbf.forward(ids)
    assert obf["step_logits"].dtype == np.float32
    # bf16 keeps ~3 significant digits; through 2 layers x 4 loops that is a few % of the logit scale.
    scale = np.abs(o64["step_logits"]).max()
    np.testing.assert_allclose(obf["step_logits"], o64["step_logits"], atol=0.1 * scale)
    lg, steps = rbf.select_logits(obf, "default")
    assert lg.shape == (1, 8, 32) and steps.shape == (1, 8)
    assert np.isfinite(rbf.loss(ids))
