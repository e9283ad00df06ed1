"""The parameter table: one row per parameter of the Ouro and MELT models, and what each part of
melt_jax needs to know about it.

A row (`ParamSpec`) gives a parameter's path in the params dict ("layers/attn/q_proj/kernel"), its
symbolic shape, the logical names of its axes (melt_jax/sharding.py maps them to mesh axes), the
Hugging Face tensor it is stored as (name, shape, transpose; convert/mapping.py), whether AdamW's weight
decay applies to it, its role in training (train/optimizer.py), which models have it, and for a
parameter MELT adds to an Ouro checkpoint the value it starts from (`melt_from_ouro`).

Symbolic dimensions are single letters; products are written "N*D", digits are literal sizes:

    L layers, H hidden, N query heads, K key/value heads, D head_dim, I intermediate, V vocab

Per-layer parameters are stacked on a leading L axis (the layer scan's axis); their HF name holds "{i}",
the layer index, and one HF tensor holds one layer's slice. Kernels are [in, out]: a PyTorch Linear
weight [out, in] is stored transposed; attention kernels are split into heads (q: out = N*D -> [N, D];
o: in = N*D -> [N, D]).

Adding a parameter to a model is creating it in the flax module and adding its row here; the tests
(tests/test_param_table.py) check that the rows and the modules agree.

The rows are keyed by '/'-path; `param_paths` gives a param tree as a flat dict of such paths and
`params_from_paths` builds the tree back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax

LAYER = "{i}"  # placeholder for the layer index in per-layer HF names

# Roles in training: the optimizer's groups and LoopLM Stage II's choice of what trains.
LOOP_LM = "loop_lm"  # the LoopLM's weights (Ouro's, which MELT inherits)
EXIT_GATE = "exit_gate"  # the exit gate: the only params LoopLM Stage II trains
KV_GATE = "kv_gate"  # MELT's KV gate: new in MELT, with a learning rate of its own
ROLES = (LOOP_LM, EXIT_GATE, KV_GATE)

# Which models have a param.
ALWAYS = "always"  # every Ouro and MELT model
UNTIED = "untied"  # only with untied embeddings (tie_word_embeddings false)
MELT = "melt"  # only MELT models with the element-wise gate (model_type "melt", gate "elementwise")
MELT_SCALAR_GATE = "melt_scalar_gate"  # only MELT models with a scalar gate per layer
MELT_ONLY = (MELT, MELT_SCALAR_GATE)


def _melt_with_gate(config: Any, gate: str) -> bool:
    return getattr(config, "model_type", None) == "melt" and config.gate == gate


_CONDITIONS: dict[str, Callable[[Any], bool]] = {
    ALWAYS: lambda config: True,
    UNTIED: lambda config: not config.tie_word_embeddings,
    MELT: lambda config: _melt_with_gate(config, "elementwise"),
    MELT_SCALAR_GATE: lambda config: _melt_with_gate(config, "scalar"),
}

# How a param that an existing checkpoint lacks starts: the value every element gets.
ZEROS = "zeros"
GATE_BIAS = "gate_bias_init"  # the config field gate_bias_init
_INITS: dict[str, Callable[[Any], float]] = {
    ZEROS: lambda config: 0.0,
    GATE_BIAS: lambda config: config.gate_bias_init,
}


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


def eval_shape(symbols: Sequence[str], dims: Mapping[str, int]) -> tuple[int, ...]:
    """Evaluates a symbolic shape such as ("N*D", "H", "1") to integers (digits are literal sizes)."""
    return tuple(math.prod(int(f) if f.isdigit() else dims[f] for f in symbol.split("*")) for symbol in symbols)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: see the module docstring for the meaning of each field."""

    path: str  # '/'-path in the params dict
    shape: tuple[str, ...]  # symbolic shape of the whole param (per-layer params: leading "L")
    axes: tuple[str | None, ...]  # logical axis names, one per axis of `shape` (None: replicated)
    hf: str  # Hugging Face tensor name, "{i}" standing for the layer index of a per-layer param
    hf_shape: tuple[str, ...]  # symbolic shape of one HF tensor (one layer's, for a per-layer param)
    transpose: bool = False  # the (2-D) HF tensor is transposed before it is reshaped to the param
    decay: bool = True  # AdamW's weight decay applies (not to norm scales and biases)
    role: str = LOOP_LM  # LOOP_LM, EXIT_GATE or KV_GATE
    when: str = ALWAYS  # ALWAYS, UNTIED or MELT: which models have it
    init: str | None = None  # ZEROS or GATE_BIAS: the start of a param added to an existing checkpoint

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"param {self.path}: {len(self.shape)} axes in its shape, {len(self.axes)} axis names")
        if (self.shape[:1] == ("L",)) != (LAYER in self.hf):
            raise ValueError(f"param {self.path}: a per-layer param has a leading L axis and {LAYER} in its HF name")
        if self.transpose and len(self.hf_shape) != 2:
            raise ValueError(f"param {self.path}: only 2-D HF tensors can be transposed")
        if self.role not in ROLES:
            raise ValueError(f"param {self.path}: role must be one of {ROLES}, got {self.role!r}")
        if self.when not in _CONDITIONS:
            raise ValueError(f"param {self.path}: when must be one of {tuple(_CONDITIONS)}, got {self.when!r}")
        if self.init is not None and self.init not in _INITS:
            raise ValueError(f"param {self.path}: init must be None or one of {tuple(_INITS)}, got {self.init!r}")

    @property
    def per_layer(self) -> bool:
        return self.shape[:1] == ("L",)

    def exists(self, config: Any) -> bool:
        """Whether a model of `config` has this param."""
        return _CONDITIONS[self.when](config)

    def param_shape(self, config: Any) -> tuple[int, ...]:
        """The param's shape for `config`."""
        return eval_shape(self.shape, model_dims(config))

    def initial_value(self, config: Any) -> float:
        """The value every element of this param starts from when it is added to a checkpoint."""
        if self.init is None:
            raise ValueError(f"param {self.path} has no init in the parameter table")
        return _INITS[self.init](config)


# Rows in the order of the Hugging Face state dict (per-layer rows: the order within a layer), which the
# converter keeps. Each row: path, shape, logical axes / HF name, HF shape, then the non-default fields.
# fmt: off
PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("embedder/embedding", ("V", "H"), ("vocab", "embed"),
              "model.embed_tokens.weight", ("V", "H")),
    ParamSpec("layers/attn/q_proj/kernel", ("L", "H", "N", "D"), ("layers", "embed", "heads", "head_dim"),
              "model.layers.{i}.self_attn.q_proj.weight", ("N*D", "H"), transpose=True),
    ParamSpec("layers/attn/k_proj/kernel", ("L", "H", "K", "D"), ("layers", "embed", "kv_heads", "head_dim"),
              "model.layers.{i}.self_attn.k_proj.weight", ("K*D", "H"), transpose=True),
    ParamSpec("layers/attn/v_proj/kernel", ("L", "H", "K", "D"), ("layers", "embed", "kv_heads", "head_dim"),
              "model.layers.{i}.self_attn.v_proj.weight", ("K*D", "H"), transpose=True),
    ParamSpec("layers/attn/o_proj/kernel", ("L", "N", "D", "H"), ("layers", "heads", "head_dim", "embed"),
              "model.layers.{i}.self_attn.o_proj.weight", ("H", "N*D"), transpose=True),
    ParamSpec("layers/mlp/gate_proj/kernel", ("L", "H", "I"), ("layers", "embed", "mlp"),
              "model.layers.{i}.mlp.gate_proj.weight", ("I", "H"), transpose=True),
    ParamSpec("layers/mlp/up_proj/kernel", ("L", "H", "I"), ("layers", "embed", "mlp"),
              "model.layers.{i}.mlp.up_proj.weight", ("I", "H"), transpose=True),
    ParamSpec("layers/mlp/down_proj/kernel", ("L", "I", "H"), ("layers", "mlp", "embed"),
              "model.layers.{i}.mlp.down_proj.weight", ("H", "I"), transpose=True),
    ParamSpec("layers/attn_in_norm/scale", ("L", "H"), ("layers", "norm"),
              "model.layers.{i}.input_layernorm.weight", ("H",), decay=False),
    ParamSpec("layers/attn_out_norm/scale", ("L", "H"), ("layers", "norm"),
              "model.layers.{i}.input_layernorm_2.weight", ("H",), decay=False),
    ParamSpec("layers/mlp_in_norm/scale", ("L", "H"), ("layers", "norm"),
              "model.layers.{i}.post_attention_layernorm.weight", ("H",), decay=False),
    ParamSpec("layers/mlp_out_norm/scale", ("L", "H"), ("layers", "norm"),
              "model.layers.{i}.post_attention_layernorm_2.weight", ("H",), decay=False),
    ParamSpec("final_norm/scale", ("H",), ("norm",),
              "model.norm.weight", ("H",), decay=False),
    ParamSpec("exit_gate/kernel", ("H", "1"), ("norm", None),
              "model.early_exit_gate.weight", ("1", "H"), transpose=True, role=EXIT_GATE),
    ParamSpec("exit_gate/bias", ("1",), (None,),
              "model.early_exit_gate.bias", ("1",), decay=False, role=EXIT_GATE),
    ParamSpec("lm_head/kernel", ("H", "V"), ("embed", "vocab"),
              "lm_head.weight", ("V", "H"), transpose=True, when=UNTIED),
    # MELT's per-layer KV gate z = sigmoid(u W_z + s U_z + b_z), which starts as W_z = U_z = 0 and
    # b_z = gate_bias_init. W_z and U_z are stored as they are used, [H_in, H_out] (row vectors times the
    # matrix), not in nn.Linear's [out, in] layout.
    ParamSpec("layers/kv_gate/w_z", ("L", "H", "H"), ("layers", "embed", "gate_out"),
              "model.layers.{i}.kv_gate.w_z.weight", ("H", "H"), role=KV_GATE, when=MELT, init=ZEROS),
    ParamSpec("layers/kv_gate/u_z", ("L", "H", "H"), ("layers", "embed", "gate_out"),
              "model.layers.{i}.kv_gate.u_z.weight", ("H", "H"), role=KV_GATE, when=MELT, init=ZEROS),
    ParamSpec("layers/kv_gate/b_z", ("L", "H"), ("layers", "norm"),
              "model.layers.{i}.kv_gate.b_z", ("H",), decay=False, role=KV_GATE, when=MELT, init=GATE_BIAS),
    # The scalar-gate ablation: z = sigmoid(z_logit), one per layer, starting at gate_bias_init.
    ParamSpec("layers/kv_gate/z_logit", ("L", "1"), ("layers", None),
              "model.layers.{i}.kv_gate.z_logit", ("1",), decay=False, role=KV_GATE, when=MELT_SCALAR_GATE,
              init=GATE_BIAS),
)
# fmt: on

# The key of one layer's params in the unrolled layout (config.scan_layers false, melt_jax/model/ouro.py):
# "layers_<i>" holds layer i's params, each the row of "layers/..." without its leading L axis.
UNROLLED_LAYER = re.compile(r"layers_(\d+)")


def stacked_path(path: str) -> str:
    """The '/'-path of the table row of a param of either layout: "layers_<i>/x" -> "layers/x"."""
    first, sep, rest = path.partition("/")
    return f"layers{sep}{rest}" if UNROLLED_LAYER.fullmatch(first) else path


BY_PATH: dict[str, ParamSpec] = {spec.path: spec for spec in PARAMS}


def find_param(path: str | Sequence[str]) -> ParamSpec | None:
    """The row of the param at `path` ('a/b' or ("a", "b")); None when the table has none."""
    return BY_PATH.get(path if isinstance(path, str) else "/".join(path))


def param_spec(path: str | Sequence[str]) -> ParamSpec:
    """The row of the param at `path` ('a/b' or ("a", "b")); ValueError when the table has none."""
    spec = find_param(path)
    if spec is None:
        name = path if isinstance(path, str) else "/".join(path)
        raise ValueError(f"param {name} has no row in the parameter table (melt_jax/model/param_table.py)")
    return spec


def params_of(config: Any) -> tuple[ParamSpec, ...]:
    """The rows of the params a model of `config` has, in table order."""
    return tuple(spec for spec in PARAMS if spec.exists(config))


def param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The '/'-path -> shape of every param of a model of `config`."""
    return {spec.path: spec.param_shape(config) for spec in params_of(config)}


def model_type_of_params(paths: Iterable[str]) -> str:
    """The model type a set of '/'-paths belongs to: 'melt' if one of them is a param only MELT
    models have, else 'ouro'."""
    for path in paths:
        spec = find_param(stacked_path(path))
        if spec is not None and spec.when in MELT_ONLY:
            return "melt"
    return "ouro"


# --------------------------------------------------------------------------------------------------
# Paths: a param tree as a flat dict keyed by each leaf's path


def key_names(key_path: Iterable[Any]) -> tuple[str, ...]:
    """The names along a jax key path (DictKey, GetAttrKey or plain keys): ("layers", "attn", ...)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def path_of(key_path: Iterable[Any]) -> str:
    """The '/'-path of a jax key path: "layers/attn/q_proj/kernel"."""
    return "/".join(key_names(key_path))


def param_paths(params: Any, key: Callable[[tuple], Hashable] = path_of) -> dict[Hashable, Any]:
    """Every leaf of a param tree by its path, in jax's leaf order (dict keys sorted):
    {"a": {"b": x}} -> {"a/b": x}. `key` turns a jax key path into the dict's key: `path_of` (the
    '/'-path), `key_names` (the tuple of names) or `jax.tree_util.keystr` ("['a']['b']"). Any pytree
    works (a flax FrozenDict counts as a dict); an int8 weight's qwix arrays are nodes, their leaves
    ending in "array/qvalue" and "array/scale"."""
    return {key(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def params_from_paths(flat: Mapping[str | tuple[str, ...], Any], base: Mapping | None = None) -> dict:
    """The inverse of `param_paths`: {"a/b": x} (or {("a", "b"): x}) -> {"a": {"b": x}}, the dicts in
    the order of `flat`. With `base` (a nested dict), the leaves are added to it: the dicts along the
    new paths are copies, everything else is shared with `base`."""
    out = dict(base or {})
    for path, value in flat.items():
        *parents, leaf = path.split("/") if isinstance(path, str) else path
        node = out
        for name in parents:
            node[name] = dict(node.get(name, {}))
            node = node[name]
        node[leaf] = value
    return out
