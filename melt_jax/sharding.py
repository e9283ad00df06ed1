"""Device meshes and the sharding of params and batches over them.

A mesh has the axes ("data", "fsdp", "tensor"). Every parameter gets logical axis names from its row
of the parameter table (melt_jax/model/param_table.py; `param_logical_axes`), and `LOGICAL_RULES` maps
logical names to mesh axes: the embedding dimension is sharded over "fsdp" (ZeRO-3 style: each device
holds a slice of every weight, gathered for the matmuls), heads / kv heads / MLP width / vocabulary
over "tensor", the batch over ("data", "fsdp").
A mesh axis that does not divide a dimension is left out for that array (the dimension is replicated
over it), so tiny test models shard as far as their shapes allow.

Activations follow the same rules through `constrain`: the models call it on their main activations
(hidden states, latents, queries / keys / values, MLP width, logits) and it pins their sharding when a
mesh is set with `jax.set_mesh` (the training program traces its steps under one); without a mesh it
does nothing. The hidden dimension of activations ("act_embed") is replicated: "fsdp" splits the batch
of activations, not their width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from melt_jax.errors import ShardingError
from melt_jax.model.param_table import find_param, key_names, stacked_path

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes (in order of preference; all that divide the dimension are used).
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "gate_out": ("tensor",),
    "layers": (),
    "head_dim": (),
    "norm": (),
    "length": (),
    "act_embed": (),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1: it takes the devices the others leave.
    num_devices > 0 builds the mesh over the first num_devices devices only (0: all of them)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_devices: int = 0

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        for name, size in zip(MESH_AXES, sizes):
            if size == 0 or size < -1:
                raise ShardingError(f"mesh axis {name!r} has size {size}: use a positive size or -1")
        if sizes.count(-1) > 1:
            raise ShardingError(
                f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}"
            )
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(
                    f"mesh data={self.data} fsdp={self.fsdp} tensor={self.tensor}: the fixed axes ({known} devices) "
                    f"do not divide the {num_devices} devices"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ShardingError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                f"but there are {num_devices}"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes), with
    automatic (GSPMD) axes. On a multi-device CPU this also turns off asynchronous CPU dispatch."""
    devices = list(jax.devices() if devices is None else devices)
    if config.num_devices > len(devices) or config.num_devices < 0:
        raise ShardingError(f"mesh num_devices={config.num_devices} but there are {len(devices)} devices")
    if config.num_devices:
        devices = devices[: config.num_devices]
    shape = config.shape(len(devices))
    if len(devices) > 1 and devices[0].platform == "cpu":
        # Several sharded programs in flight at once can starve XLA's CPU collectives of threads
        # (a rendezvous timeout aborts the process); run CPU programs one at a time.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_axes_of(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the param at `path` (its row of melt_jax.model.param_table); ShardingError when
    the table has no row for it or the row names another number of axes."""
    name = "/".join(path)
    # A layer of the unrolled layout (config.scan_layers false), "layers_<i>/...", has the row of the
    # stacked "layers/..." without its leading layers axis.
    row = stacked_path(name)
    spec = find_param(row)
    if spec is None:
        raise ShardingError(f"no sharding rule for param {name} (it has no row in melt_jax/model/param_table.py)")
    axes = spec.axes if row == name else spec.axes[1:]
    if len(axes) != ndim:
        raise ShardingError(f"param {name} has {ndim} axes, its sharding rule names {len(axes)}")
    return axes


def param_logical_axes(params: Any) -> Any:
    """The tree of params with each leaf replaced by its logical axis names."""
    return jax.tree_util.tree_map_with_path(lambda path, x: logical_axes_of(key_names(path), len(x.shape)), params)


def partition_spec(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis names on `mesh`: each name's mesh axes that
    divide its dimension (and are not used by an earlier dimension)."""
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, logical):
        axes = []
        for axis in LOGICAL_RULES.get(name, ()) if name is not None else ():
            width = mesh.shape[axis] * math.prod(mesh.shape[a] for a in axes)
            if axis not in used and mesh.shape[axis] > 1 and size % width == 0:
                axes.append(axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x with its sharding pinned to `partition_spec(x.shape, logical, mesh)` on the mesh set by
    `jax.set_mesh`; x unchanged when no mesh is set (or it has one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    if len(logical) != x.ndim:
        raise ShardingError(f"activation of shape {x.shape} given {len(logical)} logical axes {tuple(logical)}")
    return jax.lax.with_sharding_constraint(x, partition_spec(x.shape, logical, mesh))


def param_sharding(path: tuple[str, ...], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """The NamedSharding on `mesh` of the param at key path `path` with `shape`."""
    return NamedSharding(mesh, partition_spec(shape, logical_axes_of(tuple(path), len(shape)), mesh))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedShardings of a param tree (arrays or ShapeDtypeStructs) on `mesh`."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_sharding(key_names(path), x.shape, mesh), params)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Arrays [B, ...] with the batch split over ("data", "fsdp")."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    shards = math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])
    if global_batch % shards:
        raise ShardingError(
            f"global batch size {global_batch} is not divisible by the data x fsdp mesh axes ({shards} devices)"
        )


def global_batch_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """One global [B, ...] array from this process's rows (its contiguous slice of the batch)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)


def _trailing_dict_keys(path) -> tuple[str, ...]:
    keys = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(str(entry.key))
    return tuple(reversed(keys))


def shardings_following_params(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that holds copies of the params (an optimizer state): a leaf whose path
    ends with a param's path and has its shape gets that param's sharding; other leaves (step counts)
    are replicated."""
    by_path = {
        key_names(path): (x.shape, s)
        for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings))
    }

    def sharding_of(path, leaf):
        match = by_path.get(_trailing_dict_keys(path))
        if match is not None and tuple(match[0]) == tuple(leaf.shape):
            return match[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding_of, tree)
