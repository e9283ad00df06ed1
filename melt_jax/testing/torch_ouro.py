"""An independent, eager PyTorch implementation of Ouro (LoopLM), written from its definition (docs/melt.md, 'Ouro').

This is the *reference* the JAX port is tested against. It is deliberately plain: one function per
piece of the model, no fusion, no compilation, no cleverness. It is not derived from the upstream
`modeling_ouro.py`.

Precision policy
----------------
All weights and activations are kept in the model dtype (`dtype` argument: float32, bfloat16 or
float64). Where the model computes in float32 (RMSNorm statistics, RoPE cos/sin, softmax) the
computation is done in ``_compute_dtype(dtype)``: float32 for float32/bf16/fp16 models, exactly like
upstream, but float64 for a float64 model so that the float64 mode is a true high-precision
reference of the same maths.

Returned arrays are numpy. numpy has no bfloat16, so a bf16 model returns its bf16 values upcast to
float32 (exact); :meth:`OuroReference.select_logits` casts them back to the model dtype before doing
anything that depends on rounding (the exit cumsum), so the round trip is lossless.

Public API: :class:`OuroReference` (``forward``, ``select_logits``, ``loss``, ``per_step_ce``,
``decode``, ``from_pretrained``), and :func:`exit_pdf_from_gate_logits` / :func:`threshold_exit_loops`
for the exit rule alone.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "OuroReference",
    "exit_pdf_from_gate_logits",
    "threshold_exit_loops",
    "rope_cos_sin",
    "apply_rope",
]

MODES = ("last", "step", "threshold", "weighted", "default")


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the "done in float32" parts: float32, or float64 for a float64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        t = torch.from_numpy(np.array(x, copy=True))
    return t.to(dtype) if dtype is not None else t


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.to(torch.float32)  # exact upcast; numpy has no bfloat16
    return x.numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * (x / sqrt(mean(x^2) + eps)); the normalisation in float32 (float64 for float64 inputs),
    cast back to the input dtype BEFORE the multiply by the weight."""
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    variance = xc.pow(2).mean(dim=-1, keepdim=True)
    xc = xc * torch.rsqrt(variance + eps)
    return weight * xc.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, cdt: torch.dtype = torch.float32) -> torch.Tensor:
    """inv_freq = 1 / theta^(arange(0, hd, 2) / hd), shape [hd/2]."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(cdt) / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [S, hd] for the given absolute positions (1-D), computed in float32
    (float64 for a float64 model), then cast to the model dtype. The hd/2 angles are duplicated
    ("cat(freqs, freqs)"), the Hugging Face rotate-half layout."""
    cdt = _compute_dtype(dtype)
    inv_freq = rope_inv_freq(head_dim, theta, cdt)
    angles = positions.to(cdt)[:, None] * inv_freq[None, :]  # [S, hd/2]
    emb = torch.cat([angles, angles], dim=-1)  # [S, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, hd]; cos/sin: [S, hd]. x' = x cos + rotate_half(x) sin."""
    return x * cos[None, None] + rotate_half(x) * sin[None, None]


def exit_pdf_from_gate_logits(gate_logits: torch.Tensor) -> torch.Tensor:
    """gate_logits [T, ...] (model dtype) -> exit pdf [..., T] in the same dtype.

    lambda_t = sigmoid(g_t); p_t = lambda_t * remaining; remaining = remaining * (1 - lambda_t);
    the last loop takes whatever mass remains. Every op in the model dtype."""
    T = gate_logits.shape[0]
    remaining = torch.ones_like(gate_logits[0])
    probs = []
    for t in range(T - 1):
        lam = torch.sigmoid(gate_logits[t])
        probs.append(lam * remaining)
        remaining = remaining * (1 - lam)
    probs.append(remaining)
    return torch.stack(probs, dim=-1)


def exit_cumsum(pdf: torch.Tensor, how: str = "torch") -> torch.Tensor:
    """Cumulative exit probability over the last axis, in pdf's dtype.

    how='sequential': c_0 = p_0, c_t = c_{t-1} + p_t with every add rounded to the model dtype.
    how='torch': torch.cumsum(pdf) on the CPU. NOTE: the CPU kernel of torch.cumsum accumulates in a
    wider type (float64 for float32 input, float32 for bf16) and only rounds each output; it can
    differ from 'sequential' in the last bit (about 25-30 % of random rows), which matters only for
    tokens whose cumsum sits exactly at a threshold (threshold 1.0 in bf16)."""
    if how == "torch":
        return torch.cumsum(pdf, dim=-1)
    if how != "sequential":
        raise ValueError(f"unknown cumsum kind {how!r}")
    out = [pdf[..., 0]]
    for t in range(1, pdf.shape[-1]):
        out.append(out[-1] + pdf[..., t])
    return torch.stack(out, dim=-1)


def threshold_exit_loops(pdf: torch.Tensor, threshold: float, cumsum: str = "torch") -> torch.Tensor:
    """Per token the first t with cumsum(p)_t >= threshold (compared in the model dtype), else T-1.
    pdf: [..., T] -> int64 [...]."""
    T = pdf.shape[-1]
    c = exit_cumsum(pdf, cumsum)
    thr = torch.tensor(threshold, dtype=pdf.dtype)
    steps = torch.full(pdf.shape[:-1], T - 1, dtype=torch.int64)
    found = torch.zeros(pdf.shape[:-1], dtype=torch.bool)
    for t in range(T):
        hit = (c[..., t] >= thr) & ~found
        steps = torch.where(hit, torch.full_like(steps, t), steps)
        found = found | hit
    return steps


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


class OuroReference:
    """Eager PyTorch Ouro. See the module docstring for the precision policy."""

    def __init__(self, hf_config: dict, state_dict: dict[str, Any], dtype: torch.dtype = torch.float32):
        c = dict(hf_config)
        self.config = c
        self.dtype = dtype
        self.cdt = _compute_dtype(dtype)
        self.H = int(c["hidden_size"])
        self.L = int(c["num_hidden_layers"])
        self.n_heads = int(c["num_attention_heads"])
        kvh = c.get("num_key_value_heads")
        self.n_kv = int(kvh) if kvh is not None else self.n_heads
        hd = c.get("head_dim")
        self.hd = int(hd) if hd is not None else self.H // self.n_heads
        self.I = int(c["intermediate_size"])
        self.V = int(c["vocab_size"])
        self.theta = float(c.get("rope_theta", 10000.0))
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.T = int(c.get("total_ut_steps", 4))
        self.tie = bool(c.get("tie_word_embeddings", False))
        self.early_exit_step = c.get("early_exit_step")
        self.early_exit_threshold = c.get("early_exit_threshold", 1.0)
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only silu is supported, got {c.get('hidden_act')}")
        if c.get("rope_scaling"):
            raise ValueError("rope_scaling is not part of Ouro")
        if self.n_heads % self.n_kv:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

        def get(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"missing parameter {name}")
            return _to_tensor(state_dict[name], dtype)

        self.embed = get("model.embed_tokens.weight")
        self.layers = []
        for i in range(self.L):
            p = f"model.layers.{i}."
            self.layers.append(
                {
                    "q": get(p + "self_attn.q_proj.weight"),
                    "k": get(p + "self_attn.k_proj.weight"),
                    "v": get(p + "self_attn.v_proj.weight"),
                    "o": get(p + "self_attn.o_proj.weight"),
                    "gate": get(p + "mlp.gate_proj.weight"),
                    "up": get(p + "mlp.up_proj.weight"),
                    "down": get(p + "mlp.down_proj.weight"),
                    "n1": get(p + "input_layernorm.weight"),
                    "n2": get(p + "input_layernorm_2.weight"),
                    "n3": get(p + "post_attention_layernorm.weight"),
                    "n4": get(p + "post_attention_layernorm_2.weight"),
                }
            )
        self.final_norm = get("model.norm.weight")
        self.gate_w = get("model.early_exit_gate.weight")  # [1, H]
        self.gate_b = get("model.early_exit_gate.bias")  # [1]
        if self.tie or "lm_head.weight" not in state_dict:
            self.lm_head = self.embed
        else:
            self.lm_head = get("lm_head.weight")

        # shape checks (catch a wrong mapping early)
        assert self.embed.shape == (self.V, self.H)
        assert self.layers[0]["q"].shape == (self.n_heads * self.hd, self.H)
        assert self.layers[0]["k"].shape == (self.n_kv * self.hd, self.H)
        assert self.layers[0]["o"].shape == (self.H, self.n_heads * self.hd)
        assert self.layers[0]["gate"].shape == (self.I, self.H)
        assert self.gate_w.shape == (1, self.H)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> OuroReference:
        """Load a HF-layout folder: config.json + model.safetensors (or shards with an index)."""
        from safetensors.torch import load_file

        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        index = os.path.join(path, "model.safetensors.index.json")
        sd: dict[str, torch.Tensor] = {}
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            for fn in files:
                sd.update(load_file(os.path.join(path, fn)))
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            sd = load_file(os.path.join(path, "model.safetensors"))
        else:
            sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        return cls(cfg, sd, dtype=dtype)

    # ---------------------------------------------------------------------------------------------
    # building blocks
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = x @ w.T
        return y + b if b is not None else y

    def _attention(self, p: dict, x: torch.Tensor, cos, sin, q_pos: torch.Tensor, cache: list | None, slot: int):
        """x: [B, S, H] (already N1-normed). q_pos: absolute positions of the S new tokens.
        cache: list of T*L (k, v) entries or None; keys are stored after RoPE, [B, kv, s, hd]."""
        B, S, _ = x.shape
        q = self._linear(x, p["q"]).view(B, S, self.n_heads, self.hd).transpose(1, 2)
        k = self._linear(x, p["k"]).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        v = self._linear(x, p["v"]).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            if cache[slot] is not None:
                k_old, v_old = cache[slot]
                k = torch.cat([k_old, k], dim=2)
                v = torch.cat([v_old, v], dim=2)
            cache[slot] = (k, v)
        n_keys = k.shape[2]
        k_pos = torch.arange(n_keys)  # cached tokens are positions 0 .. n_keys-1
        # GQA: query head h reads kv head h // (heads / kv_heads)
        rep = self.n_heads // self.n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))  # model dtype
        causal = k_pos[None, :] <= q_pos[:, None]  # [S, n_keys]
        scores = scores.to(self.cdt).masked_fill(~causal[None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        out = probs @ v  # [B, heads, S, hd]
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.hd)
        return self._linear(out, p["o"])

    def _mlp(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        return self._linear(F.silu(self._linear(x, p["gate"])) * self._linear(x, p["up"]), p["down"])

    def _layer(self, p: dict, h, cos, sin, q_pos, cache, slot):
        a = self._attention(p, rms_norm(h, p["n1"], self.eps), cos, sin, q_pos, cache, slot)
        h = h + rms_norm(a, p["n2"], self.eps)
        m = self._mlp(p, rms_norm(h, p["n3"], self.eps))
        h = h + rms_norm(m, p["n4"], self.eps)
        return h

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, start_pos: int = 0, cache: list | None = None) -> dict:
        """The full looped forward on new tokens `ids` [B, S] at positions start_pos.. ; torch dict."""
        B, S = ids.shape
        q_pos = torch.arange(start_pos, start_pos + S)
        cos, sin = rope_cos_sin(q_pos, self.hd, self.theta, self.dtype)  # shared by all loops/layers
        h = self.embed[ids]
        emb = h
        layer_outputs, hidden, gates, logits = [], [], [], []
        for t in range(self.T):
            for i, p in enumerate(self.layers):
                h = self._layer(p, h, cos, sin, q_pos, cache, t * self.L + i)
                layer_outputs.append(h)
            h = rms_norm(h, self.final_norm, self.eps)  # model.norm after EVERY loop; feeds next loop
            hidden.append(h)
            gates.append(self._linear(h, self.gate_w, self.gate_b)[..., 0])
            logits.append(self._linear(h, self.lm_head))
        gate_logits = torch.stack(gates)  # [T, B, S]
        return {
            "embeddings": emb,
            "layer_outputs": torch.stack(layer_outputs),
            "hidden_steps": torch.stack(hidden),
            "gate_logits": gate_logits,
            "exit_pdf": exit_pdf_from_gate_logits(gate_logits),  # [B, S, T]
            "step_logits": torch.stack(logits),  # [T, B, S, V]
        }

    def _ids(self, input_ids) -> torch.Tensor:
        ids = _to_tensor(input_ids).to(torch.int64)
        assert ids.ndim == 2, "input_ids must be [B, S]"
        return ids

    # ---------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------

    def forward(self, input_ids) -> dict:
        """input_ids [B, S] -> dict of numpy arrays:
        embeddings [B,S,H]; layer_outputs [T*L,B,S,H] (index t*L+i, before the per-loop norm);
        hidden_steps [T,B,S,H] (after model.norm); gate_logits [T,B,S]; exit_pdf [B,S,T];
        step_logits [T,B,S,V]."""
        out = self._run(self._ids(input_ids))
        return {k: _to_numpy(v) for k, v in out.items()}

    __call__ = forward

    def _select(self, step_logits: torch.Tensor, pdf: torch.Tensor, mode: str, step, threshold, cumsum):
        """Torch version of select_logits. step_logits [T,B,S,V], pdf [B,S,T], both model dtype."""
        if mode == "default":
            mode, step, threshold = self._default_mode(step, threshold)
        if mode == "last":
            return self._select_step(step_logits, pdf, self.T - 1)
        if mode == "step":
            if step is None:
                raise ValueError("mode 'step' needs step")
            return self._select_step(step_logits, pdf, step)
        if mode == "threshold":
            return self._select_threshold(step_logits, pdf, threshold, cumsum)
        if mode == "weighted":
            return self._select_weighted(step_logits, pdf)
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")

    def _default_mode(self, step, threshold) -> tuple[str, int | None, float | None]:
        """upstream default: exit_at_step (config.early_exit_step) > threshold > last loop.
        Returns (mode, step, threshold) with the config's values filled in."""
        if step is None:
            step = self.early_exit_step
        if threshold is None:
            threshold = self.early_exit_threshold
        if step is not None:
            return "step", step, threshold
        if threshold is not None:
            return "threshold", step, threshold
        return "last", step, threshold

    def _select_step(self, step_logits: torch.Tensor, pdf: torch.Tensor, step):
        """Loop `step`'s logits [B,S,V] for every token, and that loop as the exit [B,S]."""
        B, S = pdf.shape[:2]
        step = int(step)
        if not 0 <= step < self.T:
            raise ValueError(f"step {step} out of range [0, {self.T})")
        return step_logits[step], torch.full((B, S), step, dtype=torch.int64)

    def _select_threshold(self, step_logits: torch.Tensor, pdf: torch.Tensor, threshold, cumsum):
        """Per token the logits of the first loop whose cumulative exit probability reaches
        `threshold` (None: the config's, else 1.0), and those loops [B,S]."""
        B, S = pdf.shape[:2]
        if threshold is None:
            threshold = self.early_exit_threshold if self.early_exit_threshold is not None else 1.0
        steps = threshold_exit_loops(pdf, threshold, cumsum)  # [B, S]
        idx = steps[None, :, :, None].expand(1, B, S, step_logits.shape[-1])
        return torch.gather(step_logits, 0, idx)[0], steps

    def _select_weighted(self, step_logits: torch.Tensor, pdf: torch.Tensor):
        """The exit-probability-weighted mix of the loops' logits, sum_t pdf[..., t] * logits[t]."""
        mixed = pdf[..., 0, None] * step_logits[0]
        for t in range(1, self.T):
            mixed = mixed + pdf[..., t, None] * step_logits[t]
        return mixed, None

    def select_logits(
        self,
        out: dict,
        mode: str,
        step: int | None = None,
        threshold: float | None = None,
        cumsum: str = "torch",
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Choose the returned logits from a forward() dict.

        mode 'last': logits of loop T-1.  'step': logits of loop `step`.
        'threshold': per token the first t with cumsum(p)_t >= threshold (else T-1); threshold None
            means config.early_exit_threshold (1.0 in the released configs). The cumsum is done in
            the model dtype (see exit_cumsum for `cumsum`) and compared with `>=` in the model dtype.
        'weighted': sum_t p_t * logits_t (accumulated in the model dtype, t = 0..T-1).
        'default': the upstream default: config early_exit_step if set, else threshold exit with
            config early_exit_threshold, else the last loop.
        Returns (logits [B,S,V], exit_steps [B,S] int64, or None for 'weighted')."""
        step_logits = _to_tensor(out["step_logits"], self.dtype)
        pdf = _to_tensor(out["exit_pdf"], self.dtype)
        logits, steps = self._select(step_logits, pdf, mode, step, threshold, cumsum)
        return _to_numpy(logits), (None if steps is None else steps.numpy())

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """Next-token CE: logits [B,S,V] predict labels shifted by one; ignore -100; in float32
        (float64 for a float64 model)."""
        lg = logits[:, :-1].to(self.cdt)
        lb = labels[:, 1:]
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction=reduction)
        return ce if reduction != "none" else ce.view(lb.shape)

    @torch.no_grad()
    def loss(self, input_ids, labels=None) -> float:
        """Upstream training loss: mixed logits sum_t p_t * logits_t (model dtype), mean next-token
        cross-entropy (labels shifted by one here, -100 ignored). labels default to input_ids."""
        ids = self._ids(input_ids)
        labels = ids if labels is None else self._ids(labels)
        out = self._run(ids)
        mixed, _ = self._select(out["step_logits"], out["exit_pdf"], "weighted", None, None, "sequential")
        return float(self._ce(mixed, labels, "mean"))

    @torch.no_grad()
    def per_step_ce(self, input_ids) -> np.ndarray:
        """[T, B, S-1]: next-token cross-entropy of each loop's logits (labels = input_ids)."""
        ids = self._ids(input_ids)
        out = self._run(ids)
        return np.stack([_to_numpy(self._ce(out["step_logits"][t], ids, "none")) for t in range(self.T)])

    @torch.no_grad()
    def decode(
        self,
        input_ids,
        n_prefill: int,
        mode: str = "default",
        step: int | None = None,
        threshold: float | None = None,
        cumsum: str = "torch",
    ) -> np.ndarray:
        """Cached decoding with a KV cache of T*L slots (slot t*L+i holds loop t / layer i keys and
        values, keys after RoPE).

        Call 1 prefills tokens 0 .. n_prefill-1 in one go; then tokens n_prefill .. S-2 are fed one
        at a time at their positions, each attending (at loop t, layer i) to the cached slot-(t,i)
        keys/values of all earlier tokens. Token S-1 is never fed: nothing is predicted from it.

        Returns [B, S-n_prefill, V]: the logits of positions n_prefill-1 .. S-2 (the last prefill
        position, then every fed token), i.e. the predictions of tokens n_prefill .. S-1. This is the
        golden `logits_decode` convention.

        Which loop's logits: selected per call with select_logits(mode, step, threshold). The
        default, mode='default', is what a plain upstream forward call returns: threshold exit at
        config.early_exit_threshold (1.0), which in fp32 is nearly always the last loop but can stop
        earlier by rounding. On the golden ouro-tiny data the threshold-1.0 selection picks the last
        loop for every token, so the golden matches both 'default' and 'last' (tested)."""
        ids = self._ids(input_ids)
        B, S = ids.shape
        if not 1 <= n_prefill <= S - 1:
            raise ValueError("need 1 <= n_prefill <= S-1")
        cache: list = [None] * (self.T * self.L)
        chunks = []
        out = self._run(ids[:, :n_prefill], 0, cache)
        logits, _ = self._select(out["step_logits"], out["exit_pdf"], mode, step, threshold, cumsum)
        chunks.append(logits[:, -1:])
        for pos in range(n_prefill, S - 1):
            out = self._run(ids[:, pos : pos + 1], pos, cache)
            logits, _ = self._select(out["step_logits"], out["exit_pdf"], mode, step, threshold, cumsum)
            chunks.append(logits)
        assert all(kv[0].shape[2] == S - 1 for kv in cache)
        return _to_numpy(torch.cat(chunks, dim=1))
