"""Import of a Hugging Face Ouro checkpoint folder into melt_jax params.

A folder holds `config.json` and the weights in one of these layouts (the first one found is used):

    model.safetensors.index.json + model-0000k-of-0000n.safetensors   (sharded safetensors)
    model.safetensors
    pytorch_model.bin.index.json + pytorch_model-0000k-of-0000n.bin   (sharded PyTorch pickles)
    pytorch_model.bin

Tensors are read lazily, one at a time, and written into preallocated stacked arrays of the target
dtype, so the peak host memory is about one copy of the params in the target dtype plus one tensor.
safetensors files are read with `safetensors`' numpy framework (bf16 arrives as ml_dtypes.bfloat16, no
torch needed); torch is imported only for `pytorch_model.bin` files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from melt_jax import dtypes
from melt_jax.checkpoint import numpy_dtype
from melt_jax.model.config import OuroConfig
from melt_jax.model.param_table import params_from_paths
from melt_jax.model.registry import config_from_json_file

from .errors import ConversionError
from .mapping import hf_tensor_plan, is_ignored_hf_tensor, rules_for

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Floating-point dtypes a source tensor may have (safetensors header names); any is cast on import.
_FLOAT_DTYPES = tuple(d.safetensors for d in dtypes.TABLE)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a HF tensor is stored, and its shape and dtype (safetensors dtype name) from the header."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def _list_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------------
# Weight files


def find_weight_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None, Path | None]:
    """Finds the weights of the HF folder `path`: (format, files, weight_map of the index, index file).

    format is "safetensors" or "bin"; weight_map (tensor name -> file name) and the index file are None
    without an index. Raises ConversionError if there are no weights or a listed shard is missing.
    """
    for fmt, index_name, single_name in (
        ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_FILE),
        ("bin", BIN_INDEX, BIN_FILE),
    ):
        index_file = path / index_name
        if index_file.is_file():
            try:
                index = json.loads(index_file.read_text())
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_file} is not a valid index (JSON with a weight_map): {e}") from None
            files = []
            for file_name in sorted(set(weight_map.values())):
                if not (path / file_name).is_file():
                    raise ConversionError(f"shard {path / file_name} listed in {index_file} is missing")
                files.append(path / file_name)
            return fmt, files, weight_map, index_file
        if (path / single_name).is_file():
            return fmt, [path / single_name], None, None
    raise ConversionError(
        f"no weights file in {path}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX}"
    )


class SafetensorsReader:
    """Reads tensors of safetensors files as numpy arrays, one at a time."""

    def __init__(self, files: list[Path]):
        self.catalog: dict[str, TensorInfo] = {}
        for file in files:
            try:
                with safe_open(file, framework="numpy") as f:
                    for name in f.keys():
                        tensor_slice = f.get_slice(name)
                        info = TensorInfo(file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
                        if name in self.catalog:
                            raise ConversionError(
                                f"tensor {name} is stored twice: in {self.catalog[name].file} and {file}"
                            )
                        self.catalog[name] = info
            except ConversionError:
                raise
            except Exception as e:  # SafetensorError, OSError: a truncated or corrupt file
                raise ConversionError(f"cannot read safetensors file {file}: {e}") from None

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array (bf16 as ml_dtypes.bfloat16)."""
        file = self.catalog[name].file
        try:
            # Opened per tensor so that no memory map of a whole file stays resident.
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise ConversionError(f"cannot read tensor {name} from {file}: {e}") from None

    def close(self) -> None:
        pass


class TorchBinReader:
    """Reads tensors of `pytorch_model.bin` files (memory-mapped, weights only) as numpy arrays."""

    def __init__(self, files: list[Path]):
        import torch  # only for .bin checkpoints

        self._torch = torch
        # torch dtype -> safetensors code
        self._dtypes = {getattr(torch, d.name): d.safetensors for d in dtypes.TABLE}
        self._file: Path | None = None  # the file whose state dict is loaded (memory-mapped) now
        self._state_dict: dict = {}
        self.catalog: dict[str, TensorInfo] = {}
        for file in files:
            for name, tensor in self._load(file).items():
                if name in self.catalog:
                    raise ConversionError(f"tensor {name} is stored twice: in {self.catalog[name].file} and {file}")
                dtype = self._dtypes.get(tensor.dtype, str(tensor.dtype).replace("torch.", ""))
                self.catalog[name] = TensorInfo(file, tuple(tensor.shape), dtype)

    def _load(self, file: Path) -> dict:
        """The state dict of `file`, memory-mapped; only the last loaded file is kept open."""
        if file != self._file:
            self._state_dict = {}
            try:
                state_dict = self._torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # a truncated zip, a pickle with more than tensors, ...
                raise ConversionError(f"cannot read PyTorch weights file {file}: {e}") from None
            if not isinstance(state_dict, dict) or not all(
                isinstance(k, str) and isinstance(v, self._torch.Tensor) for k, v in state_dict.items()
            ):
                raise ConversionError(f"{file} does not hold a state dict (a dict of name -> tensor)")
            self._file, self._state_dict = file, state_dict
        return self._state_dict

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array (bf16 as ml_dtypes.bfloat16)."""
        tensor = self._load(self.catalog[name].file)[name].detach().contiguous()
        if tensor.dtype == self._torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            return tensor.view(self._torch.int16).numpy().view(dtypes.BY_NAME["bfloat16"].numpy)
        return tensor.numpy()

    def close(self) -> None:
        self._file, self._state_dict = None, {}


# --------------------------------------------------------------------------------------------------
# Import


def check_hf_tensors(config: OuroConfig, catalog: dict[str, TensorInfo], source: str) -> None:
    """Raises ConversionError unless `catalog` holds exactly the tensors of `config`, with their shapes."""
    plan = hf_tensor_plan(config)
    expected = {t.name for t in plan}
    missing = [t.name for t in plan if t.name not in catalog]
    if missing:
        hint = " (config.json has tie_word_embeddings false)" if "lm_head.weight" in missing else ""
        raise ConversionError(f"missing tensor(s) in {source}: {_list_names(missing)}{hint}")
    unexpected = sorted(n for n in catalog if n not in expected and not is_ignored_hf_tensor(n, config))
    if unexpected:
        raise ConversionError(f"unexpected tensor(s) in {source}: {_list_names(unexpected)}")
    for name, rule, _ in plan:
        info = catalog[name]
        shape = rule.hf_tensor_shape(config)
        if info.shape != shape:
            raise ConversionError(
                f"tensor {name} in {info.file} has shape {list(info.shape)}, expected {list(shape)} "
                f"({' x '.join(rule.hf_shape)} from config.json)"
            )
        if info.dtype not in _FLOAT_DTYPES:
            raise ConversionError(
                f"tensor {name} in {info.file} has dtype {info.dtype}, expected a floating-point type"
            )


def load_hf_checkpoint(
    path: str | os.PathLike, dtype: str = "float32", *, progress: bool = False
) -> tuple[OuroConfig, dict[str, Any]]:
    """Reads the HF Ouro checkpoint folder `path`: (config, params as a nested dict of numpy arrays).

    The params are in `dtype` ('float32', 'bfloat16' or 'float16'), laid out as in
    melt_jax/model/param_table.py; the config gets `param_dtype = dtype = dtype`. Raises ConfigError for a
    bad config.json and ConversionError for bad weights, both naming the file, field or tensor.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"Hugging Face checkpoint folder not found: {path}")
    np_dtype = numpy_dtype(dtype)
    config = config_from_json_file(path / CONFIG_FILE, dtype=dtype, param_dtype=dtype)

    fmt, files, weight_map, index_file = find_weight_files(path)
    reader = SafetensorsReader(files) if fmt == "safetensors" else TorchBinReader(files)
    try:
        if weight_map is not None:
            for name, file_name in weight_map.items():
                if name not in reader.catalog or reader.catalog[name].file != path / file_name:
                    raise ConversionError(f"tensor {name} listed in {index_file} is not in {path / file_name}")
        check_hf_tensors(config, reader.catalog, str(index_file or files[0]))

        flat = {rule.param: np.empty(rule.param_shape(config), np_dtype) for rule in rules_for(config)}
        for name, rule, layer in tqdm(hf_tensor_plan(config), desc="import", unit="tensor", disable=not progress):
            tensor = reader.read(name)  # [hf_shape], in the stored dtype
            target = flat[rule.param] if layer is None else flat[rule.param][layer]
            target[...] = rule.to_param(tensor, config)  # transpose/reshape view, cast on assignment
            del tensor
    finally:
        reader.close()
    return config, params_from_paths(flat)
