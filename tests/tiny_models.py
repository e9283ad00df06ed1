"""The structural options the model-level tests run over, and the tiny models built for each.

A `Structure` is what changes the shape of the computation rather than its numbers: key/value heads
(1, 2 or 4 with 4 query heads: MQA, GQA, MHA) and loops (1, 3 or 4). Tests parametrise over
`DIAGONAL`, which covers each option once without the full cross product; checks that only hold with
a second loop (one loop reading rows another loop wrote) run over `LOOPED` instead.

The models are built by the session fixtures of tests/conftest.py (`checkpoint_of`, `ouro_of`,
`melt_of`), once per structure, from the HF-layout checkpoints of melt_jax.testing.hf_checkpoints: numpy weights read
by the converter, so building one compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

NUM_HEADS = 4  # query heads of every tiny model


@dataclasses.dataclass(frozen=True)
class Structure:
    kv_heads: int  # 1: MQA, 2: GQA, 4: MHA
    loops: int

    def __str__(self) -> str:  # the pytest id, e.g. "kv1-loops3"
        return f"kv{self.kv_heads}-loops{self.loops}"


DEFAULT = Structure(2, 3)  # GQA, 3 loops: for checks run on one structure only
DIAGONAL = (Structure(1, 1), DEFAULT, Structure(4, 4))
LOOPED = (Structure(1, 3), DEFAULT, Structure(4, 4))
GROUPED = tuple(s for s in DIAGONAL if s.kv_heads < NUM_HEADS)  # query heads share a key/value head


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    """An Ouro checkpoint in HF layout (config.json fields, HF tensor name -> float32 numpy) and random
    MELT gates for it under their HF names."""

    structure: Structure
    hf_config: dict
    state_dict: dict[str, np.ndarray]

    @functools.cached_property
    def gates(self) -> dict[str, np.ndarray]:
        """W_z, U_z = 0.1 N(0, 1), b_z = -1: open enough that the shared rows differ from any one loop's.
        (Built on first use: melt_jax.testing.torch_melt imports torch.)"""
        from melt_jax.testing.hf_checkpoints import random_melt_gates

        return random_melt_gates(self.hf_config, seed=6, scale=0.1, bias=-1.0)

    @functools.cached_property
    def melt_reference(self):
        """The float64 PyTorch MELT reference of these weights and gates (built on first use)."""
        import torch

        from melt_jax.testing.torch_melt import MeltReference

        return MeltReference(self.hf_config, self.state_dict, self.gates, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class TinyOuro:
    """`checkpoint` written to `path` and read back by the converter: melt_jax config and params."""

    checkpoint: TinyCheckpoint
    path: Path
    config: Any  # OuroConfig, float32
    params: dict

    @property
    def hf_config(self) -> dict:
        return self.checkpoint.hf_config

    @property
    def state_dict(self) -> dict[str, np.ndarray]:
        return self.checkpoint.state_dict


@dataclasses.dataclass(frozen=True)
class TinyMelt:
    """`ouro` plus the checkpoint's MELT gates: MELT config (chunk size 8) and params."""

    ouro: TinyOuro
    config: Any  # MeltConfig
    params: dict

    @property
    def reference(self):
        return self.ouro.checkpoint.melt_reference


def build_checkpoint(structure: Structure) -> TinyCheckpoint:
    """H=64, L=2, 4 query heads of 16, I=96, V=128 (tiny_hf_config), rope_theta 50 so that positions
    matter over short prompts."""
    from melt_jax.testing.hf_checkpoints import random_ouro_state_dict, tiny_hf_config

    hf_config = tiny_hf_config(
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=structure.kv_heads,
        total_ut_steps=structure.loops,
        rope_theta=50.0,
    )
    return TinyCheckpoint(structure, hf_config, random_ouro_state_dict(hf_config, seed=5))


def build_ouro(checkpoint: TinyCheckpoint, folder: Path) -> TinyOuro:
    from melt_jax.convert import load_hf_checkpoint
    from melt_jax.testing.hf_checkpoints import write_hf_checkpoint

    path = write_hf_checkpoint(folder, checkpoint.hf_config, checkpoint.state_dict)
    config, params = load_hf_checkpoint(path, dtype="float32")
    return TinyOuro(checkpoint, path, config, params)


def build_melt(ouro: TinyOuro) -> TinyMelt:
    from melt_jax.model import MeltConfig
    from melt_jax.testing.hf_checkpoints import with_gates

    config = MeltConfig.from_ouro(ouro.config, chunk_size=8)
    return TinyMelt(ouro, config, with_gates(ouro.params, ouro.hf_config, ouro.checkpoint.gates))
