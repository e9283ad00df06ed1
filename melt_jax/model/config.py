"""Model configuration: the Ouro (LoopLM) config, read from and written to Hugging Face `config.json`.

`OuroConfig` holds every field of the upstream `config.json` (model_type "ouro") plus the runtime
policy of this library (RUNTIME_FIELDS: `dtype` for activations, `param_dtype` for parameters, `remat`
for what the backward pass recomputes, `attention` with its block sizes for how attention is computed,
`scan_layers` for the layout of the layer params), which is not part of the Hugging Face file: it
changes how the model computes, not what (melt_jax checkpoints keep it in melt_jax.json). Unknown
extra fields of a `config.json` are kept in `extra` and written back by `to_hf_config`, so that
import followed by export reproduces the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar

import jax.numpy as jnp

from melt_jax import dtypes
from melt_jax.errors import ConfigError
from melt_jax.model.attention.implementation import DEFAULT_BLOCK, Implementation, check_implementation
from melt_jax.model.chunking import check_chunk_size

OURO_MODEL_TYPE = "ouro"

# What the backward pass recomputes of each decoder layer instead of keeping it from the forward
# (melt_jax/model/remat.py; docs/melt.md, 'Rematerialisation'): nothing, everything, everything but
# the outputs of the weight matmuls.
REMAT_POLICIES = ("none", "full", "matmuls")

# Fields of the HF config that must be present (the rest have upstream defaults).
_REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# Fields of melt_jax's runtime policy, how it computes a model rather than what the model is: not
# written to config.json, not read from it.
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "remat",
    "attention",
    "attention_query_block",
    "attention_key_block",
    "scan_layers",
)


# Tokens of a long prompt that Ouro prefills at a time (its values do not depend on the chunking).
OURO_PREFILL_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class OuroConfig:
    """Shapes and hyper-parameters of an Ouro looped language model.

    L = num_hidden_layers layers are applied `total_ut_steps` (T) times with the same weights.
    """

    model_type: ClassVar[str] = OURO_MODEL_TYPE
    architecture: ClassVar[str] = "OuroForCausalLM"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 65536
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    total_ut_steps: int = 4
    early_exit_threshold: float | None = 1.0
    early_exit_step: int | None = None
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_scaling: dict | None = None
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    use_cache: bool = True
    torch_dtype: str = "bfloat16"  # dtype of the stored weights, as written in config.json
    # How melt_jax computes the model (RUNTIME_FIELDS: not in config.json).
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"  # parameters
    remat: str = "none"  # what the backward pass recomputes of each layer, one of REMAT_POLICIES
    # How attention is computed: one of the implementations of melt_jax.model.attention (its
    # IMPLEMENTATIONS, checked by `check_implementation`); dense XLA attention by default.
    attention: str = "xla"
    attention_query_block: int = DEFAULT_BLOCK  # blockwise: queries per block (clipped to the sequence)
    attention_key_block: int = DEFAULT_BLOCK  # blockwise: keys per block
    # Layer layout (melt_jax/model/ouro.py): one scan over stacked layer params (training, checkpoints)
    # or the layers unrolled, each reading its own weights in place (decoding).
    scan_layers: bool = True
    # Fields of a config.json that this library does not use, kept for export.
    extra: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}) and no head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ----------------------------------------------------------------------------------------------
    # Derived sizes

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_loops(self) -> int:
        return self.total_ut_steps

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def jnp_dtype(self):
        return dtypes.jnp_dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return dtypes.jnp_dtype(self.param_dtype)

    @property
    def attention_implementation(self) -> Implementation:
        """How the model's attention is computed (the `attention*` fields)."""
        return Implementation(self.attention, self.attention_query_block, self.attention_key_block)

    def replace(self, **changes) -> OuroConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    # KV cache layout and chunking

    @property
    def cache_slots(self) -> tuple[int, ...]:
        """Leading axes of the KV cache's slot arrays: Ouro keeps one per (loop, layer), [T, L]."""
        return (self.num_loops, self.num_layers)

    def kv_bytes_per_token(self, dtype=None) -> int:
        """Bytes of K and V one token occupies in the cache: slot arrays * 2 * K * D * itemsize
        (`dtype` default: the activation dtype)."""
        itemsize = jnp.dtype(dtype or self.jnp_dtype).itemsize
        return math.prod(self.cache_slots) * 2 * self.num_kv_heads * self.head_dim * itemsize

    def kv_cache_bytes(self, batch_size: int, length: int, dtype=None) -> int:
        """Bytes of the K and V caches of `batch_size` sequences of `length` tokens."""
        return self.kv_bytes_per_token(dtype) * batch_size * length

    @property
    def default_chunk_size(self) -> int:
        """The chunk a prefill uses when the caller names none. Ouro's values do not depend on how a
        sequence is chunked (up to rounding): chunks only bound what a long prompt holds while it is
        prefilled (every loop's and layer's rows of one chunk, before they are written into the
        cache), 1/16 of a cache of 4,096 positions at OURO_PREFILL_CHUNK."""
        return OURO_PREFILL_CHUNK

    # ----------------------------------------------------------------------------------------------
    # Validation

    def validate(self) -> None:
        """Raises ConfigError naming the first field whose value cannot describe a runnable model."""
        self._check_sizes()
        self._check_heads()
        self._check_supported_features()
        self._check_layer_types()
        self._check_early_exit()
        self._check_runtime_fields()
        if self.rope_theta <= 0:
            raise ConfigError(f"config field rope_theta must be positive, got {self.rope_theta}")

    def _check_sizes(self) -> None:
        """The shape fields are positive integers, the loop count an integer >= 1."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if not isinstance(self.total_ut_steps, int) or self.total_ut_steps < 1:
            raise ConfigError(
                f"config field total_ut_steps (loops T) must be an integer >= 1, got {self.total_ut_steps!r}"
            )

    def _check_heads(self) -> None:
        """Key/value heads group the query heads evenly; rotary embeddings need an even head_dim."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    def _check_supported_features(self) -> None:
        """The upstream options this library does not implement are off."""
        if self.hidden_act != "silu":
            raise ConfigError(f"config field hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            raise ConfigError(f"config field rope_scaling: only null is supported, got {self.rope_scaling!r}")
        if self.use_sliding_window:
            raise ConfigError("config field use_sliding_window: sliding-window attention is not supported")

    def _check_layer_types(self) -> None:
        """layer_types, when given, names one full-attention layer per decoder layer."""
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config field layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted({t for t in self.layer_types if t != "full_attention"})
        if bad:
            raise ConfigError(f"config field layer_types: only 'full_attention' is supported, got {bad}")

    def _check_early_exit(self) -> None:
        """early_exit_step, when given, is one of the T loops."""
        if self.early_exit_step is not None and not 0 <= self.early_exit_step < self.total_ut_steps:
            raise ConfigError(
                f"config field early_exit_step ({self.early_exit_step}) must be in [0, {self.total_ut_steps})"
            )

    def _check_runtime_fields(self) -> None:
        """The RUNTIME_FIELDS name known dtypes, remat policy and attention implementation."""
        for name in ("dtype", "param_dtype"):
            dtypes.lookup(getattr(self, name), error=ConfigError, what=f"config field {name}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"config field scan_layers must be true or false, got {self.scan_layers!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"config field remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        check_implementation(
            self.attention, self.attention_query_block, self.attention_key_block, "config field attention"
        )

    # ----------------------------------------------------------------------------------------------
    # Hugging Face config.json

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> OuroConfig:
        """Builds a config from the dict of an Ouro `config.json`; `overrides` set runtime fields."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != cls.model_type:
            known = ", ".join(repr(c.model_type) for c in (OuroConfig, MeltConfig) if issubclass(c, cls))
            raise ConfigError(f"config field model_type must be {known}, got {model_type!r}")
        missing = [f for f in _REQUIRED_HF_FIELDS if f not in hf]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        own = {f.name for f in dataclasses.fields(cls)} - {*RUNTIME_FIELDS, "extra"}
        kwargs = {k: v for k, v in hf.items() if k in own}
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):  # some exports store several stop ids
                kwargs[key] = tuple(kwargs[key])
        kwargs["extra"] = {k: v for k, v in hf.items() if k not in own and k != "model_type"}
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except TypeError as e:  # a field of the wrong JSON type
            raise ConfigError(f"config.json: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict of this config (runtime policy, RUNTIME_FIELDS, left out)."""
        out = dict(self.extra)
        out["model_type"] = self.model_type
        for f in dataclasses.fields(self):
            if f.name in (*RUNTIME_FIELDS, "extra"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out.setdefault("architectures", [self.architecture])
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> OuroConfig:
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_config(hf, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_hf_config(), indent=2) + "\n"

    # ----------------------------------------------------------------------------------------------
    # Presets

    @classmethod
    def preset(cls, name: str, **overrides) -> OuroConfig:
        """Named configurations: 'tiny', 'ouro-1.4b', 'ouro-2.6b' (`preset_config` also knows the
        MELT presets)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
        return cls(**{**PRESETS[name], **overrides})


# MELT's KV cache updates s_t = z_t * s_{t-1} + (1 - z_t) * u_t (melt_jax/model/melt.py): the learned
# element-wise gate, a learned scalar per layer, and three fixed ones (docs/melt.md, 'Gate variants').
GATES = ("elementwise", "scalar", "mean", "ema", "last")


@dataclasses.dataclass(frozen=True)
class MeltConfig(OuroConfig):
    """An Ouro config plus MELT's fields: the gate bias initialisation and the default chunk size.

    MELT keeps one KV cache per layer shared by all loops, updated by a learned element-wise gate
    (melt_jax/model/melt.py). Written to config.json with model_type "melt".
    """

    model_type: ClassVar[str] = "melt"
    architecture: ClassVar[str] = "MeltForCausalLM"

    gate_bias_init: float = -4.0  # b_z at initialisation (W_z = U_z = 0): z ~ 0.018, "overwrite"
    chunk_size: int = 128  # the chunk of prefill, evaluation and training forwards
    gate: str = "elementwise"  # the KV cache update, one of GATES
    gate_ema_decay: float = 0.5  # z of gate "ema"

    def validate(self) -> None:
        super().validate()
        check_chunk_size(self.chunk_size, "config field chunk_size")
        if self.gate not in GATES:
            raise ConfigError(f"config field gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if not 0 <= self.gate_ema_decay < 1:
            raise ConfigError(f"config field gate_ema_decay must be in [0, 1), got {self.gate_ema_decay!r}")

    @property
    def cache_slots(self) -> tuple[int, ...]:
        """MELT keeps one slot array per layer, shared by all loops: [L]."""
        return (self.num_layers,)

    @property
    def default_chunk_size(self) -> int:
        """MELT's values depend on the chunking: its own chunk_size unless a caller names another."""
        return self.chunk_size

    @classmethod
    def from_ouro(cls, ouro: OuroConfig, **melt_fields) -> MeltConfig:
        """The MELT config of an Ouro model: the same shapes plus MELT's fields."""
        fields = {f.name: getattr(ouro, f.name) for f in dataclasses.fields(OuroConfig)}
        # Ouro's class names and remote-code map do not describe a MELT checkpoint.
        fields["extra"] = {k: v for k, v in ouro.extra.items() if k not in ("architectures", "auto_map")}
        return cls(**{**fields, **melt_fields})


_OURO_COMMON = dict(
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=128,
    max_position_embeddings=65536,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    total_ut_steps=4,
    early_exit_threshold=1.0,
    torch_dtype="bfloat16",
    dtype="bfloat16",
    param_dtype="bfloat16",
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10_000.0,
        total_ut_steps=4,
        torch_dtype="float32",
    ),
    "ouro-1.4b": dict(_OURO_COMMON, num_hidden_layers=24),
    "ouro-2.6b": dict(_OURO_COMMON, num_hidden_layers=48),
}

# MELT presets: the MELT model distilled from an Ouro preset (MeltConfig.from_ouro: the teacher's shapes
# plus the KV gates; Ouro-1.4B's student has 1.6B parameters). For configs alone, e.g. `melt-train
# compile ... init_from=melt-1.6b`; a trained student's config is its checkpoint's.
MELT_PRESETS: dict[str, str] = {"melt-1.6b": "ouro-1.4b"}


def preset_names() -> list[str]:
    """Every preset name, Ouro and MELT."""
    return sorted([*PRESETS, *MELT_PRESETS])


def preset_config(name: str, **overrides) -> OuroConfig:
    """The config of a preset name: an Ouro preset (PRESETS) or a MELT one (MELT_PRESETS), with
    `overrides` replacing fields."""
    if name in MELT_PRESETS:
        return MeltConfig.from_ouro(OuroConfig.preset(MELT_PRESETS[name]), **overrides)
    return OuroConfig.preset(name, **overrides)
