"""An independent, eager PyTorch implementation of MELT, written from its definition (docs/melt.md).

MELT is Ouro (see melt_jax/testing/torch_ouro.py) with a gated, per-layer shared KV cache: one K row and one
V row per token and layer, updated over the loops of that token instead of one row per loop.

For layer l, token i, loop t (1-based in the equations, 0-based in the code) with u_t = N1(h):

    s_1 = u_1
    z_t = sigmoid(u_t @ W_z + s_{t-1} @ U_z + b_z)          t >= 2, element-wise
    s_t = z_t * s_{t-1} + (1 - z_t) * u_t
    k_t = RoPE(s_t W_K),  v_t = s_t W_V                     Ouro's k_proj / v_proj
    q_t = RoPE(u_t W_Q)

Gate convention of this file: u and s are row vectors [..., H]; W_z and U_z are stored [H_in, H_out]
and used as ``u @ W_z`` (no transpose, unlike nn.Linear); b_z is [H]. Tensor names:
``model.layers.{i}.kv_gate.w_z.weight``, ``model.layers.{i}.kv_gate.u_z.weight``,
``model.layers.{i}.kv_gate.b_z``.

Chunks (docs/melt.md, 'Chunks'): a sequence is cut into chunks; inside a chunk all tokens run their T loops
together; token i at loop t attends to the *final* (last-loop) rows of every token of earlier chunks and
to the loop-t rows of the tokens of its own chunk at positions <= i.

Interpolation (docs/melt.md, 'Phase 1: interpolation'): every key/value attended to is
alpha * K_melt + (1 - alpha) * K_ouro, with K_ouro = RoPE(u_t W_K) (the Ouro key of that token at the
*current* loop t, from the student's own hidden state), K_melt the final row (earlier chunks) or the
loop-t row k_t (own chunk). The same for V. alpha = 0 is exactly Ouro, alpha = 1 exactly MELT. The
stored final rows are always the pure MELT rows (k_T, v_T), whatever alpha.

Two independent ways to run the chunked forward are implemented, and tested against each other:

* ``forward_sequential`` / ``decode``: chunk after chunk with a cache (per layer: the final rows of the
  tokens done, plus their per-loop Ouro rows for the interpolation);
* ``forward_chunked``: the two-pass form (docs/melt.md, 'Training forwards') -- pass 1 is the
  sequential chunked prefill (for the final rows), pass 2 runs every token of every chunk in parallel
  with a mask choosing, per (query, key) pair, the pass-1 final row (earlier chunk) or the current-loop
  row (same chunk).

Precision policy: that of melt_jax/testing/torch_ouro.py (model dtype everywhere; RMSNorm statistics, RoPE and
softmax in float32, or float64 for a float64 model). Default dtype here: float64.

``ouro_last_loop_sharing_decode`` is a third, MELT-free reference: Ouro decoding where every token
attends, at every loop, to the earlier tokens' last-loop keys/values (MELT with z == 0), built directly on
OuroReference's own cached forward.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from melt_jax.testing.hf_checkpoints import gate_names, random_melt_gates
from melt_jax.testing.torch_ouro import (
    OuroReference,
    _compute_dtype,
    _to_numpy,
    _to_tensor,
    apply_rope,
    exit_pdf_from_gate_logits,
    rms_norm,
    rope_cos_sin,
)

__all__ = ["MeltReference", "random_melt_gates", "ouro_last_loop_sharing_decode", "gate_names"]


def _chunk_lengths(S: int, chunk_size) -> list[int]:
    """An int C -> [C, C, ..., rest]; a sequence of ints -> itself (must sum to S)."""
    if isinstance(chunk_size, (int, np.integer)):
        C = int(chunk_size)
        if C < 1:
            raise ValueError(f"chunk_size must be >= 1, got {C}")
        return [min(C, S - a) for a in range(0, S, C)]
    lengths = [int(c) for c in chunk_size]
    if any(c < 1 for c in lengths) or sum(lengths) != S:
        raise ValueError(f"chunk lengths {lengths} must be >= 1 and sum to the sequence length {S}")
    return lengths


class MeltReference:
    """Eager PyTorch MELT: Ouro weights (HF state dict) plus per-layer gates (see random_melt_gates)."""

    def __init__(
        self, hf_config: dict, state_dict: dict[str, Any], gates: dict[str, Any], dtype: torch.dtype = torch.float64
    ):
        # OuroReference reads and checks the HF state dict; its parsed tensors are reused here.
        self.ouro = OuroReference(hf_config, state_dict, dtype=dtype)
        o = self.ouro
        self.dtype, self.cdt = dtype, _compute_dtype(dtype)
        self.H, self.L, self.T, self.V = o.H, o.L, o.T, o.V
        self.n_heads, self.n_kv, self.hd = o.n_heads, o.n_kv, o.hd
        self.eps, self.theta = o.eps, o.theta
        self.layers = []
        for i, p in enumerate(o.layers):
            names = gate_names(i)
            for n in names:
                if n not in gates:
                    raise KeyError(f"missing MELT gate parameter {n}")
            wz, uz, bz = (_to_tensor(gates[n], dtype) for n in names)
            if wz.shape != (self.H, self.H) or uz.shape != (self.H, self.H) or bz.shape != (self.H,):
                raise ValueError(
                    f"layer {i}: gate shapes {tuple(wz.shape)}, {tuple(uz.shape)}, {tuple(bz.shape)}; "
                    f"expected [H, H], [H, H], [H] with H = {self.H}"
                )
            self.layers.append(dict(p, wz=wz, uz=uz, bz=bz))

    # ---------------------------------------------------------------------------------------------
    # pieces
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _linear(x, w):  # nn.Linear layout: w is [out, in]
        return x @ w.T

    def _heads(self, x, n):  # [B, S, n*hd] -> [B, n, S, hd]
        B, S, _ = x.shape
        return x.view(B, S, n, self.hd).transpose(1, 2)

    def _mlp(self, p, x):
        return self._linear(F.silu(self._linear(x, p["gate"])) * self._linear(x, p["up"]), p["down"])

    def _latent(self, p, u, s_prev):
        """The gated latent s_t from u_t and s_{t-1} (None at the first loop)."""
        if s_prev is None:
            return u
        z = torch.sigmoid(u @ p["wz"] + s_prev @ p["uz"] + p["bz"])
        return z * s_prev + (1 - z) * u

    def _qkv(self, p, u, s, cos, sin):
        """q from u; Ouro k/v from u; MELT k/v from s. Keys after RoPE. All [B, heads, S, hd]."""
        q = apply_rope(self._heads(self._linear(u, p["q"]), self.n_heads), cos, sin)
        k_ouro = apply_rope(self._heads(self._linear(u, p["k"]), self.n_kv), cos, sin)
        v_ouro = self._heads(self._linear(u, p["v"]), self.n_kv)
        k_melt = apply_rope(self._heads(self._linear(s, p["k"]), self.n_kv), cos, sin)
        v_melt = self._heads(self._linear(s, p["v"]), self.n_kv)
        return q, k_ouro, v_ouro, k_melt, v_melt

    def _attend(self, p, q, key_sets, masks):
        """Softmax attention of q [B, h, S, hd] over the union of key sets.

        key_sets: list of (k, v) [B, kv, n_j, hd]; masks: list of bool [S, n_j] (True = visible).
        One softmax over all sets together (in float32 / float64); GQA: query head h reads kv head
        h // (heads / kv_heads). Returns o_proj(attention) [B, S, H]."""
        rep = self.n_heads // self.n_kv
        scale = 1.0 / math.sqrt(self.hd)
        scores = []
        for (k, _), m in zip(key_sets, masks):
            k = k.repeat_interleave(rep, dim=1)
            sc = (q @ k.transpose(-1, -2)) * scale  # model dtype
            scores.append(sc.to(self.cdt).masked_fill(~m[None, None], float("-inf")))
        probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1).to(self.dtype)
        out, start = 0, 0
        for k, v in key_sets:
            n = k.shape[2]
            out = out + probs[..., start : start + n] @ v.repeat_interleave(rep, dim=1)
            start += n
        B, _, S, _ = q.shape
        return self._linear(out.transpose(1, 2).reshape(B, S, self.n_heads * self.hd), p["o"])

    @staticmethod
    def _mix(alpha, melt, ouro):
        return alpha * melt + (1 - alpha) * ouro

    def _loop_end(self, h):
        """model.norm after the loop, exit-gate logit, logits."""
        o = self.ouro
        h = rms_norm(h, o.final_norm, self.eps)
        gate = self._linear(h, o.gate_w)[..., 0] + o.gate_b[0]
        return h, gate, self._linear(h, o.lm_head)

    def _ids(self, input_ids) -> torch.Tensor:
        ids = _to_tensor(input_ids).to(torch.int64)
        if ids.ndim != 2:
            raise ValueError("input_ids must be [B, S]")
        return ids

    # ---------------------------------------------------------------------------------------------
    # sequential: one chunk at a time, with a cache
    # ---------------------------------------------------------------------------------------------

    def new_cache(self) -> dict:
        """Per layer: final MELT rows 'k', 'v' [B, kv, n_done, hd] (None while empty) and the per-loop
        Ouro rows 'k_ouro', 'v_ouro' [T] lists of the same shape (only needed when alpha < 1)."""
        return {
            "n": 0,
            "layers": [
                {"k": None, "v": None, "k_ouro": [None] * self.T, "v_ouro": [None] * self.T} for _ in range(self.L)
            ],
        }

    @torch.no_grad()
    def _run_chunk(self, ids: torch.Tensor, cache: dict, alpha: float) -> dict:
        """Runs the chunk `ids` [B, C] (positions cache['n'] ..) through all T loops, attending to the
        cache, then appends its final rows and per-loop Ouro rows to the cache. Torch dict out."""
        B, C = ids.shape
        start = cache["n"]
        pos = torch.arange(start, start + C)
        cos, sin = rope_cos_sin(pos, self.hd, self.theta, self.dtype)
        own_mask = pos[None, :] <= pos[:, None]  # [C, C] causal inside the chunk
        prev_mask = torch.ones(C, start, dtype=torch.bool)
        h = self.ouro.embed[ids]
        s = [None] * self.L
        hidden, gates, logits, attn, k_steps, v_steps = [], [], [], [], [], []
        k_ouro_new, v_ouro_new = [[None] * self.L for _ in range(self.T)], [[None] * self.L for _ in range(self.T)]
        for t in range(self.T):
            a_t, k_t, v_t = [], [], []
            for l, p in enumerate(self.layers):
                u = rms_norm(h, p["n1"], self.eps)
                s[l] = self._latent(p, u, s[l])
                q, k_o, v_o, k_m, v_m = self._qkv(p, u, s[l], cos, sin)
                k_ouro_new[t][l], v_ouro_new[t][l] = k_o, v_o
                k_t.append(k_m)
                v_t.append(v_m)
                sets = [(self._mix(alpha, k_m, k_o), self._mix(alpha, v_m, v_o))]
                masks = [own_mask]
                c = cache["layers"][l]
                if start > 0:
                    sets.insert(0, (self._mix(alpha, c["k"], c["k_ouro"][t]), self._mix(alpha, c["v"], c["v_ouro"][t])))
                    masks.insert(0, prev_mask)
                a = self._attend(p, q, sets, masks)
                a_t.append(a)
                h = h + rms_norm(a, p["n2"], self.eps)
                h = h + rms_norm(self._mlp(p, rms_norm(h, p["n3"], self.eps)), p["n4"], self.eps)
            h, g, lg = self._loop_end(h)
            hidden.append(h)
            gates.append(g)
            logits.append(lg)
            attn.append(torch.stack(a_t))
            k_steps.append(torch.stack(k_t))
            v_steps.append(torch.stack(v_t))

        def cat(old, new):
            return new if old is None else torch.cat([old, new], dim=2)

        for l in range(self.L):
            c = cache["layers"][l]
            c["k"], c["v"] = cat(c["k"], k_steps[-1][l]), cat(c["v"], v_steps[-1][l])
            for t in range(self.T):
                c["k_ouro"][t] = cat(c["k_ouro"][t], k_ouro_new[t][l])
                c["v_ouro"][t] = cat(c["v_ouro"][t], v_ouro_new[t][l])
        cache["n"] = start + C
        return {
            "step_logits": torch.stack(logits),
            "hidden_steps": torch.stack(hidden),
            "gate_logits": torch.stack(gates),
            "attn_outputs": torch.stack(attn),  # [T, L, B, C, H]
            "k_steps": torch.stack(k_steps),  # [T, L, B, kv, C, hd]
            "v_steps": torch.stack(v_steps),
        }

    @staticmethod
    def _rows(x):  # [..., B, kv, S, hd] -> [..., B, S, kv, hd]
        return x.transpose(-3, -2)

    def _finish(self, out: dict, cache: dict) -> dict:
        gl = out["gate_logits"]
        k = torch.stack([c["k"] for c in cache["layers"]])
        v = torch.stack([c["v"] for c in cache["layers"]])
        res = {
            "step_logits": out["step_logits"],
            "hidden_steps": out["hidden_steps"],
            "gate_logits": gl,
            "exit_pdf": exit_pdf_from_gate_logits(gl),
            "attn_outputs": out["attn_outputs"],
            "final_k": self._rows(k),
            "final_v": self._rows(v),
            "k_steps": self._rows(out["k_steps"]),
            "v_steps": self._rows(out["v_steps"]),
        }
        return {n: _to_numpy(x) for n, x in res.items()}

    @torch.no_grad()
    def forward_sequential(self, input_ids, chunk_size, alpha: float = 1.0) -> dict:
        """The chunked forward computed chunk after chunk with a cache (decode's machinery). Same
        outputs as forward_chunked (which see)."""
        ids = self._ids(input_ids)
        cache = self.new_cache()
        outs, a = [], 0
        for C in _chunk_lengths(ids.shape[1], chunk_size):
            outs.append(self._run_chunk(ids[:, a : a + C], cache, alpha))
            a += C
        seq_axis = {
            "step_logits": 2,
            "hidden_steps": 2,
            "gate_logits": 2,
            "attn_outputs": 3,
            "k_steps": 4,
            "v_steps": 4,
        }
        out = {n: torch.cat([o[n] for o in outs], dim=ax) for n, ax in seq_axis.items()}
        return self._finish(out, cache)

    # ---------------------------------------------------------------------------------------------
    # two-pass: all chunks in parallel against the pass-1 final rows
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward_chunked(self, input_ids, chunk_size, alpha: float = 1.0) -> dict:
        """input_ids [B, S] processed in chunks at interpolation `alpha` (docs/melt.md, 'Chunks' and
        'Phase 1: interpolation').

        chunk_size: an int C (chunks of C tokens, the last one shorter if C does not divide S) or a
        sequence of chunk lengths summing to S. Computed in two passes: pass 1 = the sequential chunked
        prefill, for the final rows; pass 2 = all tokens in parallel, each attending to the pass-1 final
        rows of earlier chunks and to the current-loop rows of its own chunk.

        Returns numpy: step_logits [T,B,S,V]; hidden_steps [T,B,S,H] (after model.norm); gate_logits
        [T,B,S] (Ouro exit gate); exit_pdf [B,S,T]; attn_outputs [T,L,B,S,H] (after o_proj, before N2);
        final_k, final_v [L,B,S,kv,hd] (the stored rows: each token's last-loop MELT k (after RoPE) and v,
        from pass 1); k_steps, v_steps [T,L,B,S,kv,hd] (each token's loop-t MELT rows k_t, v_t, pass 2)."""
        ids = self._ids(input_ids)
        B, S = ids.shape
        lengths = _chunk_lengths(S, chunk_size)
        # pass 1
        cache = self.new_cache()
        a = 0
        for C in lengths:
            self._run_chunk(ids[:, a : a + C], cache, alpha)
            a += C
        # pass 2
        chunk_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        pos = torch.arange(S)
        same = (chunk_of[None, :] == chunk_of[:, None]) & (pos[None, :] <= pos[:, None])  # [query, key]
        earlier = chunk_of[None, :] < chunk_of[:, None]
        cos, sin = rope_cos_sin(pos, self.hd, self.theta, self.dtype)
        h = self.ouro.embed[ids]
        s = [None] * self.L
        hidden, gates, logits, attn, k_steps, v_steps = [], [], [], [], [], []
        for _ in range(self.T):
            a_t, k_t, v_t = [], [], []
            for l, p in enumerate(self.layers):
                u = rms_norm(h, p["n1"], self.eps)
                s[l] = self._latent(p, u, s[l])
                q, k_o, v_o, k_m, v_m = self._qkv(p, u, s[l], cos, sin)
                k_t.append(k_m)
                v_t.append(v_m)
                fin = cache["layers"][l]
                sets = [
                    (self._mix(alpha, fin["k"], k_o), self._mix(alpha, fin["v"], v_o)),  # earlier chunks
                    (self._mix(alpha, k_m, k_o), self._mix(alpha, v_m, v_o)),  # own chunk
                ]
                att = self._attend(p, q, sets, [earlier, same])
                a_t.append(att)
                h = h + rms_norm(att, p["n2"], self.eps)
                h = h + rms_norm(self._mlp(p, rms_norm(h, p["n3"], self.eps)), p["n4"], self.eps)
            h, g, lg = self._loop_end(h)
            hidden.append(h)
            gates.append(g)
            logits.append(lg)
            attn.append(torch.stack(a_t))
            k_steps.append(torch.stack(k_t))
            v_steps.append(torch.stack(v_t))
        out = {
            "step_logits": torch.stack(logits),
            "hidden_steps": torch.stack(hidden),
            "gate_logits": torch.stack(gates),
            "attn_outputs": torch.stack(attn),
            "k_steps": torch.stack(k_steps),
            "v_steps": torch.stack(v_steps),
        }
        return self._finish(out, cache)

    __call__ = forward_chunked

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, input_ids, n_prefill: int, prefill_chunk: int, alpha: float = 1.0) -> np.ndarray:
        """Prefill tokens 0 .. n_prefill-1 in chunks of `prefill_chunk`, then feed tokens
        n_prefill .. S-2 one at a time (chunk size 1), each updating its row in place over its loops and
        attending to the final rows of all earlier tokens. Returns the last-loop logits of positions
        n_prefill-1 .. S-2, [B, S-n_prefill, V] (OuroReference.decode's convention, mode 'last')."""
        ids = self._ids(input_ids)
        B, S = ids.shape
        if not 1 <= n_prefill <= S - 1:
            raise ValueError("need 1 <= n_prefill <= S-1")
        cache = self.new_cache()
        a = 0
        for C in _chunk_lengths(n_prefill, prefill_chunk):
            out = self._run_chunk(ids[:, a : a + C], cache, alpha)
            a += C
        pieces = [out["step_logits"][-1][:, -1:]]
        for i in range(n_prefill, S - 1):
            pieces.append(self._run_chunk(ids[:, i : i + 1], cache, alpha)["step_logits"][-1])
        assert cache["n"] == S - 1 and all(c["k"].shape[2] == S - 1 for c in cache["layers"])
        return _to_numpy(torch.cat(pieces, dim=1))


# --------------------------------------------------------------------------------------------------
# Ouro with last-loop cache sharing (MELT at z == 0), on OuroReference alone
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def ouro_last_loop_sharing_decode(
    ouro_hf_config: dict, state_dict: dict, input_ids, dtype: torch.dtype = torch.float64
) -> np.ndarray:
    """Ouro decoded token by token where token i, at every loop t and layer l, attends to the earlier
    tokens' LAST-loop keys/values of layer l and to its own loop-t key/value. Returns the last-loop
    logits of every position, [B, S, V].

    Built on OuroReference's cached forward: before each token, every one of its T*L cache slots
    (t, l) is filled with the last-loop rows of layer l; the token's own loop-t rows are appended by
    OuroReference itself, and its last-loop rows (slot (T-1, l)) become the shared rows."""
    ref = OuroReference(ouro_hf_config, state_dict, dtype=dtype)
    ids = _to_tensor(input_ids).to(torch.int64)
    B, S = ids.shape
    T, L = ref.T, ref.L
    last: list = [None] * L  # per layer (k, v) [B, kv, n, hd], last-loop rows of the tokens done
    logits = []
    for i in range(S):
        cache = [last[l] for t in range(T) for l in range(L)]  # slot t*L + l
        out = ref._run(ids[:, i : i + 1], i, cache)
        logits.append(out["step_logits"][-1])
        last = [cache[(T - 1) * L + l] for l in range(L)]
        assert last[0][0].shape[2] == i + 1
    return _to_numpy(torch.cat(logits, dim=1))
