"""Export of melt_jax params to a Hugging Face Ouro checkpoint folder (config.json + safetensors).

The weights go to one `model.safetensors`, or, when larger than `max_shard_bytes`, to shards
`model-0000k-of-0000n.safetensors` listed in `model.safetensors.index.json` (with `metadata.total_size`
and `weight_map`, as `transformers` writes them). Files are written tensor by tensor (a small streaming
safetensors writer, below), so the peak host memory is about the params plus one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm import tqdm

from melt_jax import dtypes
from melt_jax.checkpoint import atomic_directory, check_destination, copy_generation_files, numpy_dtype
from melt_jax.inference.param_check import param_mismatches
from melt_jax.model.config import OuroConfig
from melt_jax.model.param_table import param_paths

from .errors import ConversionError
from .hf_import import CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX
from .mapping import HFTensor, hf_tensor_plan, param_shapes

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # 5 GB, the transformers default


def write_safetensors(
    path: str | os.PathLike,
    entries: list[tuple[str, tuple[int, ...]]],
    dtype: str,
    fetch: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file holding the tensors `entries` (name, shape), all of dtype `dtype`.

    `fetch(name)` is called once per tensor, in order, when its bytes are written, so only one tensor
    needs to be in memory at a time. The format: 8-byte little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}, "__metadata__": {...}} padded with spaces to a multiple of 8
    bytes, then the raw little-endian tensor bytes in header order.
    """
    np_dtype = numpy_dtype(dtype)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * np_dtype.itemsize
        header[name] = {
            "dtype": dtypes.BY_NAME[dtype].safetensors,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape in entries:
            array = fetch(name)
            if array.shape != tuple(shape) or array.dtype != np_dtype or not array.flags.c_contiguous:
                raise ValueError(
                    f"tensor {name}: got {array.shape} {array.dtype}, expected {shape} {np_dtype} (C order)"
                )
            f.write(array.reshape(-1).view(np.uint8).data)


def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Splits tensors of byte sizes `sizes` (in order) into consecutive groups of at most
    `max_shard_bytes` each; a tensor larger than that gets a shard of its own."""
    shards: list[list[int]] = [[]]
    used = 0
    for k, size in enumerate(sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += size
    return shards


def stored_dtype(config: OuroConfig, params: dict) -> str:
    """The dtype name the floating-point params are stored in, when they share one (else
    `config.param_dtype`)."""
    names = {np.dtype(leaf.dtype).name for leaf in param_paths(params).values()}
    return names.pop() if len(names) == 1 and names <= set(dtypes.STORABLE_NAMES) else config.param_dtype


def check_params(config: OuroConfig, params: dict) -> dict[str, Any]:
    """The flat '/'-path -> array dict of `params`; raises ConversionError naming a missing,
    unexpected or misshapen param."""
    flat = param_paths(params)
    expected = param_shapes(config)
    mismatches = param_mismatches(expected, {name: tuple(leaf.shape) for name, leaf in flat.items()})
    if mismatches.missing:
        raise ConversionError(f"missing param(s): {', '.join(mismatches.missing)}")
    if mismatches.unexpected:
        raise ConversionError(f"unexpected param(s): {', '.join(sorted(mismatches.unexpected))}")
    if mismatches.misshapen:
        name = mismatches.misshapen[0]
        raise ConversionError(f"param {name} has shape {list(flat[name].shape)}, expected {list(expected[name])}")
    return flat


def save_hf_checkpoint(
    config: OuroConfig,
    params: dict,
    path: str | os.PathLike,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    overwrite: bool = False,
    progress: bool = False,
    files: Iterable[str | os.PathLike] = (),
) -> list[str]:
    """Writes `params` (nested dict of numpy or jax arrays) as a HF Ouro checkpoint folder `path`, with
    copies of `files` (tokenizer and generation files, melt_jax.checkpoint.GENERATION_FILES).

    Tensors are stored in `dtype` (default: `config.torch_dtype`), and config.json gets that
    torch_dtype. Returns the names of the files written. The folder appears only when complete; an
    existing `path` raises an error unless `overwrite` is true.
    """
    dtype = config.torch_dtype if dtype is None else dtype
    if dtype not in dtypes.STORABLE_NAMES:
        raise ConversionError(
            f"cannot export in dtype {dtype!r} (config field torch_dtype or --dtype); "
            f"expected one of {', '.join(dtypes.STORABLE_NAMES)}"
        )
    if max_shard_bytes < 1:
        raise ConversionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    check_destination(path, overwrite)
    np_dtype = numpy_dtype(dtype)
    flat = {name: np.asarray(leaf) for name, leaf in check_params(config, params).items()}

    plan = hf_tensor_plan(config)
    by_name: dict[str, HFTensor] = {t.name: t for t in plan}
    shapes = [t.rule.hf_tensor_shape(config) for t in plan]
    shards = plan_shards([math.prod(s) * np_dtype.itemsize for s in shapes], max_shard_bytes)
    if len(shards) == 1:
        file_names = [SAFETENSORS_FILE]
    else:
        file_names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]

    bar = tqdm(total=len(plan), desc="export", unit="tensor", disable=not progress)

    def fetch(name: str) -> np.ndarray:
        """The HF tensor `name` in the export dtype, C-contiguous: [hf_shape]."""
        _, rule, layer = by_name[name]
        leaf = flat[rule.param]
        view = rule.to_hf(leaf if layer is None else leaf[layer], config)
        tensor = np.empty(view.shape, np_dtype)
        tensor[...] = view  # copy, cast to the export dtype
        bar.update(1)
        return tensor

    with bar, atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.replace(torch_dtype=dtype).to_json_string())
        weight_map = {}
        for file_name, shard in zip(file_names, shards):
            entries = [(plan[k].name, shapes[k]) for k in shard]
            write_safetensors(tmp / file_name, entries, dtype, fetch, metadata={"format": "pt"})
            weight_map.update({name: file_name for name, _ in entries})
        if len(shards) > 1:
            total_size = sum(math.prod(s) * np_dtype.itemsize for s in shapes)
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            file_names = file_names + [SAFETENSORS_INDEX]
        file_names += copy_generation_files(files, tmp)
    return [CONFIG_FILE] + file_names
