"""Tiny Ouro and MELT models with random weights, shared by the sampling, evaluation, lm-eval and CLI
tests so that they compile the same shapes once per test session.

Both models have the byte tokenizer's vocabulary (258), H=32, L=2, T=3 loops, GQA (4 query
heads, 2 kv heads of 8); MELT has random gates and chunk size 4.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from melt_jax.model import MeltConfig, MeltModel, OuroConfig, OuroModel, init_params

OURO_CONFIG = OuroConfig(
    vocab_size=258,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=96,
    rope_theta=100.0,
    total_ut_steps=3,
    torch_dtype="float32",
)
MELT_CONFIG = MeltConfig.from_ouro(OURO_CONFIG, chunk_size=4, gate_bias_init=-1.0)


def _perturbed(params, seed: int, scale: float):
    """params plus scale * N(0, 1) noise on every leaf, as numpy arrays."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(tree, noisy)


@functools.cache
def tiny_ouro() -> tuple[OuroModel, dict]:
    model = OuroModel(OURO_CONFIG)
    return model, _perturbed(init_params(model, jax.random.key(0)), seed=1, scale=0.3)


@functools.cache
def tiny_melt() -> tuple[MeltModel, dict]:
    model = MeltModel(MELT_CONFIG)
    return model, _perturbed(init_params(model, jax.random.key(2)), seed=3, scale=0.3)


def tiny_model(kind: str):
    """(model, params) of the tiny 'ouro' or 'melt' model."""
    return {"ouro": tiny_ouro, "melt": tiny_melt}[kind]()
