"""The floating-point dtypes of melt_jax, by name: one row per dtype with its jax, numpy and
safetensors forms.

Configs name dtypes as strings ("bfloat16"); `jnp_dtype` and `numpy_dtype` turn a name into the dtype
object. Params can be stored (checkpoints, Hugging Face export and import) in the dtypes with
`storable` set; configs also accept float64, a high-precision reference in tests that needs
jax_enable_x64.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class DType:
    """One dtype: its name in configs and on the command line, and its forms elsewhere."""

    name: str  # "bfloat16"
    jnp: Any  # jnp.bfloat16
    numpy: np.dtype  # numpy's form; bfloat16 is ml_dtypes.bfloat16 (numpy has none)
    safetensors: str  # the dtype code of a safetensors header ("BF16")
    storable: bool = True  # params may be stored in it (checkpoints, HF export and import)


# fmt: off
TABLE: tuple[DType, ...] = (
    DType("float32",  jnp.float32,  np.dtype(np.float32),         "F32"),
    DType("bfloat16", jnp.bfloat16, np.dtype(ml_dtypes.bfloat16), "BF16"),
    DType("float16",  jnp.float16,  np.dtype(np.float16),         "F16"),
    DType("float64",  jnp.float64,  np.dtype(np.float64),         "F64", storable=False),
)
# fmt: on

BY_NAME: dict[str, DType] = {d.name: d for d in TABLE}

# Names accepted by configs (dtype, param_dtype) and by storage (checkpoints, convert), in table order.
CONFIG_NAMES: tuple[str, ...] = tuple(d.name for d in TABLE)
STORABLE_NAMES: tuple[str, ...] = tuple(d.name for d in TABLE if d.storable)


def lookup(name: str, *, storable: bool = False, error: type[Exception] = ValueError, what: str = "dtype") -> DType:
    """The row of dtype `name`. Raises `error` naming `what` and the accepted names when `name` is not
    one (with storable=True only the dtypes params can be stored in are accepted)."""
    names = STORABLE_NAMES if storable else CONFIG_NAMES
    if not isinstance(name, str) or name not in names:
        raise error(f"{what} must be one of {', '.join(names)}, got {name!r}")
    return BY_NAME[name]


def jnp_dtype(name: str) -> Any:
    """The jax dtype of a config dtype name ('float32', 'bfloat16', 'float16', 'float64')."""
    return lookup(name).jnp


def numpy_dtype(name: str, error: type[Exception] = ValueError) -> np.dtype:
    """The numpy dtype of a storable dtype name ('float32', 'bfloat16', 'float16'); `error` otherwise."""
    return lookup(name, storable=True, error=error).numpy


def at_least_float32(dtype) -> Any:
    """float32 for reduced-precision dtypes, the dtype itself for float32 and float64: the dtype in
    which norms, logits and softmax are computed."""
    return jnp.promote_types(dtype, jnp.float32)
