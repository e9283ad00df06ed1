"""How Hugging Face Ouro and MELT tensors map to melt_jax params, used by import and export.

The rows come from the parameter table (melt_jax/model/param_table.py): each param's row names the Hugging
Face tensor it is stored as, both shapes in symbolic dimensions, and whether the HF tensor is
transposed. A `TensorRule` applies one row, in either direction:

    import:  param[i] = reshape(transpose?(hf_tensor_i), shape)           # one layer's slice
    export:  hf_tensor_i = transpose?(reshape(param[i], transpose?(hf_shape)))

A HF name containing "{i}" is a per-layer tensor: the melt_jax param stacks the L layers on a leading
axis, `param[i]` holding layer i. A row exists only for the configs whose models have the param (e.g.
`lm_head` only with untied embeddings, the KV gate only for MELT). Adding a tensor is adding a row to
the parameter table.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import numpy as np

from melt_jax.model.param_table import LAYER, PARAMS, ParamSpec, eval_shape, model_dims, param_shapes

__all__ = [
    "LAYER",
    "OURO_RULES",
    "HFTensor",
    "TensorRule",
    "eval_shape",
    "hf_tensor_plan",
    "is_ignored_hf_tensor",
    "model_dims",
    "param_shapes",
    "rules_for",
]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one melt_jax param (its row of the parameter table) is built from Hugging Face tensors (one,
    or one per layer)."""

    spec: ParamSpec

    @property
    def param(self) -> str:
        """Path in the params dict, e.g. "layers/attn/q_proj/kernel"."""
        return self.spec.path

    @property
    def hf(self) -> str:
        """HF name, "{i}" standing for the layer index of a per-layer tensor."""
        return self.spec.hf

    @property
    def hf_shape(self) -> tuple[str, ...]:
        """Symbolic shape of one HF tensor, e.g. ("N*D", "H")."""
        return self.spec.hf_shape

    @property
    def shape(self) -> tuple[str, ...]:
        """Symbolic shape of one layer's slice of the param (the whole param if not per layer)."""
        return self.spec.shape[1:] if self.per_layer else self.spec.shape

    @property
    def transpose(self) -> bool:
        """Whether the (2-D) HF tensor is transposed before it is reshaped to `shape`."""
        return self.spec.transpose

    @property
    def per_layer(self) -> bool:
        return self.spec.per_layer

    def exists(self, config: Any) -> bool:
        """Whether checkpoints of `config` hold this tensor."""
        return self.spec.exists(config)

    def hf_name(self, layer: int | None = None) -> str:
        """The HF tensor name (of layer `layer` for a per-layer tensor)."""
        return self.hf.replace(LAYER, str(layer)) if self.per_layer else self.hf

    def hf_tensor_shape(self, config: Any) -> tuple[int, ...]:
        """Shape of one HF tensor of this row."""
        return eval_shape(self.hf_shape, model_dims(config))

    def slice_shape(self, config: Any) -> tuple[int, ...]:
        """Shape of the param of one layer (the whole param if not per layer)."""
        return eval_shape(self.shape, model_dims(config))

    def param_shape(self, config: Any) -> tuple[int, ...]:
        """Shape of the param: the slice shape, with a leading L axis for per-layer tensors."""
        return self.spec.param_shape(config)

    def to_param(self, tensor: np.ndarray, config: Any) -> np.ndarray:
        """HF tensor -> param slice (a view of `tensor` where numpy can make one)."""
        x = tensor.T if self.transpose else tensor
        return x.reshape(self.slice_shape(config))

    def to_hf(self, param_slice: np.ndarray, config: Any) -> np.ndarray:
        """Param slice -> HF tensor (a view where numpy can make one): the inverse of `to_param`."""
        hf_shape = self.hf_tensor_shape(config)
        if self.transpose:
            return param_slice.reshape(hf_shape[::-1]).T
        return param_slice.reshape(hf_shape)


# One rule per row of the parameter table, in its order (the order of the HF state dict).
OURO_RULES: tuple[TensorRule, ...] = tuple(TensorRule(spec) for spec in PARAMS)

# HF tensors that may be present in a checkpoint but carry nothing melt_jax needs (checked by name).
_IGNORED_HF_PATTERNS = (
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),  # RoPE buffer of older exports
)


def is_ignored_hf_tensor(name: str, config: Any) -> bool:
    """True for HF tensors that import skips: RoPE buffers, and lm_head.weight when it is tied."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    return any(p.fullmatch(name) for p in _IGNORED_HF_PATTERNS)


def rules_for(config: Any, rules: tuple[TensorRule, ...] = OURO_RULES) -> tuple[TensorRule, ...]:
    """The rows of `rules` that exist for `config`."""
    return tuple(r for r in rules if r.exists(config))


class HFTensor(NamedTuple):
    """One tensor of a HF checkpoint: its name, its row, and its layer (None if not per layer)."""

    name: str
    rule: TensorRule
    layer: int | None


def hf_tensor_plan(config: Any, rules: tuple[TensorRule, ...] = OURO_RULES) -> list[HFTensor]:
    """Every HF tensor of a checkpoint of `config`, in HF state-dict order.

    Rows before the first per-layer row come first, then layer 0's tensors, layer 1's, ..., then the
    remaining rows.
    """
    active = rules_for(config, rules)
    layer_rules = [r for r in active if r.per_layer]
    plan = []
    for rule in active:
        if not rule.per_layer:
            plan.append(HFTensor(rule.hf_name(), rule, None))
        elif rule is layer_rules[0]:
            for i in range(config.num_hidden_layers):
                plan.extend(HFTensor(r.hf_name(i), r, i) for r in layer_rules)
    return plan
