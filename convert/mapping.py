"""The one table that maps Hugging Face Ouro tensors to melt_jax params, used by import and export.

Every row (`TensorRule`) names a melt_jax parameter (a '/'-separated path in the params dict), the
Hugging Face tensor it comes from, both shapes in symbolic dimensions, and whether the HF tensor is
transposed. Import and export both apply the row, in opposite directions:

    import:  param[i] = reshape(transpose?(hf_tensor_i), shape)           # one layer's slice
    export:  hf_tensor_i = transpose?(reshape(param[i], transpose?(hf_shape)))

A HF name containing "{i}" is a per-layer tensor: the melt_jax param stacks the L layers on a leading
axis, `param[i]` holding layer i. Symbolic dimensions (see `model_dims`) are single letters, products
are written "N*D":

    L layers, H hidden, N query heads, K key/value heads, D head_dim, I intermediate, V vocab

Adding a tensor (e.g. the MELT gate `layers/kv_gate/w_z`) is adding a row; a row with `when` set
exists only for configs where `when(config)` is true (e.g. `lm_head` only with untied embeddings).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

LAYER = "{i}"  # placeholder for the layer index in per-layer HF names


def model_dims(config: Any) -> dict[str, int]:
    """The values of the symbolic dimension letters for `config`."""
    return {
        "L": config.num_hidden_layers,
        "H": config.hidden_size,
        "N": config.num_attention_heads,
        "K": config.num_key_value_heads,
        "D": config.head_dim,
        "I": config.intermediate_size,
        "V": config.vocab_size,
    }


def eval_shape(symbols: tuple[str, ...], dims: dict[str, int]) -> tuple[int, ...]:
    """Evaluates a symbolic shape such as ("N*D", "H", "1") to integers (digits are literal sizes)."""
    return tuple(math.prod(int(f) if f.isdigit() else dims[f] for f in symbol.split("*")) for symbol in symbols)


def _always(config: Any) -> bool:
    return True


def _untied(config: Any) -> bool:
    return not config.tie_word_embeddings


def _melt(config: Any) -> bool:
    return getattr(config, "model_type", None) == "melt"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one melt_jax param is built from Hugging Face tensors (one, or one per layer)."""

    param: str  # path in the params dict, e.g. "layers/attn/q_proj/kernel"
    hf: str  # HF name, "{i}" standing for the layer index of a per-layer tensor
    hf_shape: tuple[str, ...]  # symbolic shape of one HF tensor, e.g. ("N*D", "H")
    shape: tuple[str, ...]  # symbolic shape of the param (one layer's slice of it if per layer)
    transpose: bool = False  # transpose the (2-D) HF tensor before reshaping it to `shape`
    when: Callable[[Any], bool] = _always  # the row exists only for configs where this is true

    def __post_init__(self):
        if self.transpose and len(self.hf_shape) != 2:
            raise ValueError(f"{self.param}: only 2-D tensors can be transposed")

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf

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
        leading = (config.num_hidden_layers,) if self.per_layer else ()
        return leading + self.slice_shape(config)

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


# The Ouro table, in the order of the HF state dict (per-layer rows: the order within a layer).
# Kernels are [in, out]: a PyTorch Linear weight [out, in] is transposed; attention kernels are split
# into heads (q: out = N*D -> [N, D]; o: in = N*D -> [N, D]).
OURO_RULES: tuple[TensorRule, ...] = (
    TensorRule("embedder/embedding", "model.embed_tokens.weight", ("V", "H"), ("V", "H")),
    TensorRule(
        "layers/attn/q_proj/kernel",
        "model.layers.{i}.self_attn.q_proj.weight",
        ("N*D", "H"),
        ("H", "N", "D"),
        transpose=True,
    ),
    TensorRule(
        "layers/attn/k_proj/kernel",
        "model.layers.{i}.self_attn.k_proj.weight",
        ("K*D", "H"),
        ("H", "K", "D"),
        transpose=True,
    ),
    TensorRule(
        "layers/attn/v_proj/kernel",
        "model.layers.{i}.self_attn.v_proj.weight",
        ("K*D", "H"),
        ("H", "K", "D"),
        transpose=True,
    ),
    TensorRule(
        "layers/attn/o_proj/kernel",
        "model.layers.{i}.self_attn.o_proj.weight",
        ("H", "N*D"),
        ("N", "D", "H"),
        transpose=True,
    ),
    TensorRule(
        "layers/mlp/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", ("I", "H"), ("H", "I"), transpose=True
    ),
    TensorRule(
        "layers/mlp/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", ("I", "H"), ("H", "I"), transpose=True
    ),
    TensorRule(
        "layers/mlp/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", ("H", "I"), ("I", "H"), transpose=True
    ),
    TensorRule("layers/attn_in_norm/scale", "model.layers.{i}.input_layernorm.weight", ("H",), ("H",)),
    TensorRule("layers/attn_out_norm/scale", "model.layers.{i}.input_layernorm_2.weight", ("H",), ("H",)),
    TensorRule("layers/mlp_in_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", ("H",), ("H",)),
    TensorRule("layers/mlp_out_norm/scale", "model.layers.{i}.post_attention_layernorm_2.weight", ("H",), ("H",)),
    TensorRule("final_norm/scale", "model.norm.weight", ("H",), ("H",)),
    TensorRule("exit_gate/kernel", "model.early_exit_gate.weight", ("1", "H"), ("H", "1"), transpose=True),
    TensorRule("exit_gate/bias", "model.early_exit_gate.bias", ("1",), ("1",)),
    TensorRule("lm_head/kernel", "lm_head.weight", ("V", "H"), ("H", "V"), transpose=True, when=_untied),
    # MELT's per-layer KV gate z = sigmoid(u W_z + s U_z + b_z): W_z and U_z are stored as they are
    # used, [H_in, H_out] (row vectors times the matrix), not in nn.Linear's [out, in] layout.
    TensorRule("layers/kv_gate/w_z", "model.layers.{i}.kv_gate.w_z.weight", ("H", "H"), ("H", "H"), when=_melt),
    TensorRule("layers/kv_gate/u_z", "model.layers.{i}.kv_gate.u_z.weight", ("H", "H"), ("H", "H"), when=_melt),
    TensorRule("layers/kv_gate/b_z", "model.layers.{i}.kv_gate.b_z", ("H",), ("H",), when=_melt),
)

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
    return tuple(r for r in rules if r.when(config))


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


def param_shapes(config: Any, rules: tuple[TensorRule, ...] = OURO_RULES) -> dict[str, tuple[int, ...]]:
    """The '/'-path -> shape of every melt_jax param of `config`."""
    return {r.param: r.param_shape(config) for r in rules_for(config, rules)}


# --------------------------------------------------------------------------------------------------
# Nested params dicts <-> flat '/'-paths


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x} (any Mapping, e.g. a flax FrozenDict, counts as a dict)."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_params(flat: dict[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    params: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return params
