"""Checkpoint I/O of melt_jax: a model config plus its params, saved with orbax in one directory.

Layout of a checkpoint directory:

    config.json     the Hugging Face config of the model (`config.to_json_string()`)
    melt_jax.json   the runtime policy (`dtype`, `param_dtype`, `attention` and its block sizes, ...: the
                    config's RUNTIME_FIELDS), which config.json does not hold
    params/         the params pytree (the content of flax's 'params' collection), an orbax checkpoint
    tokenizer.json, tokenizer_config.json, generation_config.json, ...
                    optional: what generation needs besides the weights (GENERATION_FILES), copied
                    unchanged from the Hugging Face folder the checkpoint was converted from

Directories are written atomically: everything goes into a temporary sibling directory that is renamed
to the destination only when complete (`atomic_directory`), so a failed or interrupted save leaves
nothing behind, and an existing destination is only replaced when asked to (`overwrite=True`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from melt_jax import dtypes
from melt_jax.errors import CheckpointError, ConfigError
from melt_jax.model.config import RUNTIME_FIELDS, OuroConfig
from melt_jax.model.param_table import key_names, param_paths, params_from_paths
from melt_jax.model.params import stack_layers
from melt_jax.model.registry import config_from_json_file
from melt_jax.sharding import param_sharding

CONFIG_FILE = "config.json"
RUNTIME_FILE = "melt_jax.json"
PARAMS_DIR = "params"
# Files of a Hugging Face folder that generation needs besides the weights: the tokenizer (fast
# tokenizer.json, or the vocabulary files of a slow one), its special tokens and chat template, and the
# generation defaults. Conversion carries them over unchanged in both directions.
GENERATION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_FORMAT = "melt_jax.model.params"
_FORMAT_VERSION = 1


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name params can be stored in ('float32', 'bfloat16', 'float16');
    CheckpointError for any other name."""
    return dtypes.numpy_dtype(name, error=CheckpointError)


# --------------------------------------------------------------------------------------------------
# Atomic directories


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises CheckpointError if `path` exists and `overwrite` is false."""
    if os.path.lexists(path) and not overwrite:
        raise CheckpointError(f"destination already exists: {path} (pass overwrite=True / --overwrite to replace it)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a new empty temporary directory beside `path`; renames it to `path` when the block ends.

    If the block raises (or is interrupted), the temporary directory is removed and `path` is left as
    it was. An existing `path` raises CheckpointError unless `overwrite` is true, in which case it is
    replaced only after the new directory is complete.
    """
    path = Path(path)
    check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        check_destination(path, overwrite)  # it may have appeared while we were writing
        if os.path.lexists(path):
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            _remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generation_files(folder: str | os.PathLike) -> list[Path]:
    """The files of GENERATION_FILES that the folder `folder` holds, in that order."""
    folder = Path(folder)
    return [folder / name for name in GENERATION_FILES if (folder / name).is_file()]


def copy_generation_files(files: Iterable[str | os.PathLike], dest: Path) -> list[str]:
    """Copies `files` (each named in GENERATION_FILES) into the folder `dest`; returns their names."""
    names = []
    for file in map(Path, files):
        if file.name not in GENERATION_FILES:
            raise CheckpointError(f"{file} is not one of the files carried beside the weights: {GENERATION_FILES}")
        try:
            shutil.copyfile(file, dest / file.name)
        except OSError as e:  # kept an OSError: a full disk is a failure at run time, not bad input
            raise type(e)(f"cannot copy {file}: {e}") from None
        names.append(file.name)
    return names


# --------------------------------------------------------------------------------------------------
# Orbax


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
    """An orbax PyTree handler that saves host (numpy) params without extra copies.

    Two orbax defaults each cost up to a full extra copy of the params in host memory while saving:
    the numpy handler deep-copies every array (a guard against concurrent modification, which a
    synchronous save does not need), and compression (zstd) holds the compressed arrays in memory.
    With both off, peak memory while saving numpy params is about the params themselves (see
    benchmarks/convert_memory.py); the price is disk: compression saves ~10-25% on bf16 weights.
    jax.Array leaves use orbax's standard handler.
    """
    try:
        numpy_handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    except TypeError:  # an orbax without the option
        numpy_handler = ocp.type_handlers.get_type_handler(np.ndarray)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler),
        *[(t, ocp.type_handlers.get_type_handler(t)) for t in (jax.Array, int, float, np.number)],
    )
    return ocp.PyTreeCheckpointHandler(
        use_compression=False, type_handler_registry=registry, multiprocessing_options=_this_process_only()
    )


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options for I/O done by this process alone: a model checkpoint is written by one process
    of a multi-process run (and read by each on its own), so orbax must not wait for the others."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"melt_jax_process_{me}"
    )


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Saves a pytree of arrays (numpy or jax) as an orbax checkpoint in the new directory `path`."""
    checkpointer = ocp.Checkpointer(_pytree_handler(), multiprocessing_options=_this_process_only())
    try:
        checkpointer.save(Path(path).absolute(), args=ocp.args.PyTreeSave(tree))
    finally:
        checkpointer.close()


def load_tree(
    path: str | os.PathLike,
    dtype: str | None = None,
    sharding_of: Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding] | None = None,
) -> dict:
    """Restores the orbax checkpoint of a nested dict of arrays in `path`, cast to `dtype` if given:
    as numpy arrays, or with `sharding_of(key path, shape)` as global jax.Arrays with that sharding,
    each process reading only the shards of its own devices (all processes must call it together).

    Leaves are restored one at a time (orbax partial restore), largest first: reading a leaf takes
    transient buffers of about its size, so restoring all leaves at once, or a large leaf last, would
    peak well above one copy of the tree.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"orbax checkpoint directory not found: {path}")
    np_dtype = numpy_dtype(dtype) if dtype is not None else None
    # Host restores are this process's own business; a sharded restore is collective.
    processes = _this_process_only() if sharding_of is None else ocp.options.MultiprocessingOptions()
    checkpointer = ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(multiprocessing_options=processes), multiprocessing_options=processes
    )
    try:
        try:
            metadata = checkpointer.metadata(path)
        except Exception as e:  # orbax raises many kinds of errors on a damaged directory
            raise CheckpointError(f"cannot read the orbax checkpoint in {path}: {e}") from e
        # orbax >= 0.11 wraps the tree in a StepMetadata; older versions return the tree itself.
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        if not isinstance(tree, dict):
            raise CheckpointError(f"the orbax checkpoint in {path} does not hold a nested dict of arrays")
        # (key path, leaf metadata) in jax's leaf order, the order orbax saves (and lists) leaves in
        leaves = list(param_paths(tree, key=key_names).items())
        restored_leaves = {}
        for keys, leaf_metadata in sorted(leaves, key=lambda kv: -math.prod(getattr(kv[1], "shape", ()) or ())):
            if sharding_of is None:
                restore_args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=np_dtype)
            else:
                sharding = sharding_of(keys, tuple(leaf_metadata.shape))
                restore_args = ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, dtype=np_dtype)
            args = ocp.args.PyTreeRestore(
                item=params_from_paths({keys: leaf_metadata}),
                restore_args=params_from_paths({keys: restore_args}),
                partial_restore=True,
            )
            try:
                restored = checkpointer.restore(path, args=args)
            except Exception as e:
                raise CheckpointError(
                    f"cannot restore {'/'.join(keys)} from the orbax checkpoint in {path}: {e}"
                ) from e
            for key in keys:
                restored = restored[key]
            restored_leaves[keys] = restored
        return params_from_paths({keys: restored_leaves[keys] for keys, _ in leaves})
    finally:
        checkpointer.close()


# --------------------------------------------------------------------------------------------------
# Model checkpoints (config + params)


def save_params(
    path: str | os.PathLike,
    config: OuroConfig,
    params: Any,
    *,
    overwrite: bool = False,
    files: Iterable[str | os.PathLike] = (),
) -> None:
    """Writes `config` and `params` (nested dict of numpy or jax arrays) as a checkpoint directory,
    with copies of `files` (tokenizer and generation files, each named in GENERATION_FILES) beside them.

    The arrays are saved with their own dtypes, bit for bit, always in the scanned layer layout (params
    of the unrolled one, `config.scan_layers` false, are stacked first). The directory appears only
    when complete; an existing `path` raises CheckpointError unless `overwrite` is true.
    """
    if not config.scan_layers:
        config, params = dataclasses.replace(config, scan_layers=True), stack_layers(params)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json_string())
        runtime = {"format": _FORMAT, "version": _FORMAT_VERSION}
        runtime.update({name: getattr(config, name) for name in RUNTIME_FIELDS})
        (tmp / RUNTIME_FILE).write_text(json.dumps(runtime, indent=2) + "\n")
        copy_generation_files(files, tmp)
        save_tree(tmp / PARAMS_DIR, params)


def load_params(
    path: str | os.PathLike, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None
) -> tuple[OuroConfig, dict]:
    """Reads a checkpoint directory written by `save_params`: (config, params).

    The params are numpy arrays, or with a `mesh` global jax.Arrays sharded on it by the parameter
    rules of melt_jax.sharding (each process reads only its shards; call it on all processes). With
    `dtype=None` the params keep their saved dtypes and the config its saved dtype policy. With a
    dtype name, the params are cast to it while reading and the config gets `dtype=param_dtype=dtype`.
    """
    config = load_config(path, dtype)
    sharding_of = None
    if mesh is not None:
        sharding_of = lambda keys, shape: param_sharding(keys, shape, mesh)  # noqa: E731
    params = load_tree(Path(path) / PARAMS_DIR, dtype, sharding_of)
    return config, params


def load_config(path: str | os.PathLike, dtype: str | None = None) -> OuroConfig:
    """The config of the checkpoint directory `path` (see `load_params` for `dtype`), without reading
    its params."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    for name in (CONFIG_FILE, PARAMS_DIR):
        if not (path / name).exists():
            raise CheckpointError(f"not a melt_jax checkpoint: {path / name} is missing")
    runtime = {}
    if (path / RUNTIME_FILE).is_file():
        try:
            runtime = json.loads((path / RUNTIME_FILE).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / RUNTIME_FILE} is not valid JSON: {e}") from None
    # A checkpoint written before a runtime field existed gets the field's default.
    policy = {k: runtime[k] for k in RUNTIME_FIELDS if k in runtime}
    policy = {"dtype": "float32", "param_dtype": "float32", **policy}
    if dtype is not None:
        numpy_dtype(dtype)  # validates the name
        policy.update(dtype=dtype, param_dtype=dtype)
    return config_from_json_file(path / CONFIG_FILE, **policy)


__all__ = [
    "GENERATION_FILES",
    "CheckpointError",
    "ConfigError",
    "atomic_directory",
    "check_destination",
    "copy_generation_files",
    "generation_files",
    "load_config",
    "load_params",
    "load_tree",
    "numpy_dtype",
    "save_params",
    "save_tree",
]
