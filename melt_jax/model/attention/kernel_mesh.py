"""A kernel call on every device's share of the mesh: XLA cannot split a custom kernel call itself,
so the kernels run in a `shard_map` over the batch (and the heads where the mesh splits them)."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from melt_jax.sharding import partition_spec


def over_the_mesh(per_device, q, k, v, q_segments, k_segments, *, heads_axis: int):
    """per_device(q, k, v, q_segments, k_segments) on every device's share of the mesh set by
    `jax.set_mesh`, or directly without one (or on one device). q, k, v are 4-d with the batch first
    and the heads at `heads_axis` (q's query heads N, k's and v's kv heads K); segment ids [B, L] or
    None. The batch is split as the activations are, the heads over "tensor" when it divides both N
    and K (each device then keeps whole groups of query heads). Returns per_device's output, laid
    out as q."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_device(q, k, v, q_segments, k_segments)
    logical = [None] * 4
    logical[0], logical[heads_axis] = "batch", "heads"
    q_spec = partition_spec(q.shape, tuple(logical), mesh)
    logical[heads_axis] = "kv_heads"
    k_spec = partition_spec(k.shape, tuple(logical), mesh)
    batch, heads = q_spec[0], q_spec[heads_axis] if q_spec[heads_axis] == k_spec[heads_axis] else None
    axes = [None] * 4
    axes[0], axes[heads_axis] = batch, heads
    spec = PartitionSpec(*axes)
    segment_spec = None if q_segments is None else PartitionSpec(batch, None)
    specs = (spec, spec, spec, segment_spec, segment_spec)
    run = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)
    return run(q, k, v, q_segments, k_segments)
