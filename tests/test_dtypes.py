"""The dtype table (melt_jax/dtypes.py) and the lookups built on it."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from melt_jax import dtypes
from melt_jax.checkpoint import numpy_dtype
from melt_jax.errors import CheckpointError, ConfigError
from melt_jax.model import OuroConfig


def test_dtype_table():
    assert dtypes.STORABLE_NAMES == ("float32", "bfloat16", "float16")
    assert dtypes.CONFIG_NAMES == ("float32", "bfloat16", "float16", "float64")
    assert OuroConfig.preset("tiny", dtype="float64").jnp_dtype == np.float64
    with pytest.raises(ConfigError, match="param_dtype must be one of float32, bfloat16, float16, float64"):
        OuroConfig.preset("tiny", param_dtype="int8")
    with pytest.raises(CheckpointError, match="must be one of float32, bfloat16, float16, got 'float64'"):
        numpy_dtype("float64")
    for row in dtypes.TABLE:
        assert np.dtype(row.jnp) == row.numpy, row.name
        assert row.numpy.name == row.name


def test_dtype_table_safetensors_codes(tmp_path):
    """Each dtype's safetensors code is the one the safetensors library writes for its numpy dtype."""
    for row in dtypes.TABLE:
        path = tmp_path / f"{row.name}.safetensors"
        save_file({"x": np.zeros((2,), row.numpy)}, path)
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        assert json.loads(data[8 : 8 + size])["x"]["dtype"] == row.safetensors, row.name
