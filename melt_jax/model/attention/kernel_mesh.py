"""A kernel call on every device's share of the mesh: XLA cannot split a custom kernel call itself,
so the kernels run in a `shard_map` over the batch (and the heads where the mesh splits them)."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from melt_jax.sharding import partition_spec


def over_the_mesh(per_device, q, k, *arrays, heads_axis: int, layouts=None):
    """per_device(q, k, *arrays) on every device's share of the mesh set by `jax.set_mesh`, or
    directly without one (or on one device). q and k are 4-d with the batch first and the heads at
    `heads_axis` (q's query heads N, k's kv heads K). The batch is split as the activations are, the
    heads over "tensor" when it divides both N and K (each device then keeps whole groups of query
    heads). `layouts` gives, for each of `arrays` (an array with the batch first, or None), the axis
    of its heads or None (nothing else split), or (batch axis, heads axis) for an array with axes
    before its batch (a whole cache [*P, B, K, S, D]); default: k's layout for the first (v), no heads
    for the others (segment ids [B, L]). Returns per_device's output, laid out as q."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_device(q, k, *arrays)
    logical = [None] * 4
    logical[0], logical[heads_axis] = "batch", "heads"
    q_spec = partition_spec(q.shape, tuple(logical), mesh)
    logical[heads_axis] = "kv_heads"
    k_spec = partition_spec(k.shape, tuple(logical), mesh)
    batch, heads = q_spec[0], q_spec[heads_axis] if q_spec[heads_axis] == k_spec[heads_axis] else None

    def spec(x, axis):
        if x is None:
            return None
        batch_axis, heads_axis = axis if isinstance(axis, tuple) else (0, axis)
        axes = [None] * x.ndim
        axes[batch_axis] = batch
        if heads_axis is not None:
            axes[heads_axis] = heads
        return PartitionSpec(*axes)

    if layouts is None:
        layouts = [heads_axis] + [None] * (len(arrays) - 1)
    array_specs = [spec(x, axis) for x, axis in zip(arrays, layouts)]
    specs = (spec(q, heads_axis), spec(k, heads_axis), *array_specs)
    run = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=spec(q, heads_axis), check_vma=False)
    return run(q, k, *arrays)
