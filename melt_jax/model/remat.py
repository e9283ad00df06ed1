"""Rematerialisation of the decoder layers: what the backward pass recomputes instead of keeping.

A layer runs inside the scan over layers, itself inside the scan over loops, so without remat the
backward pass keeps every intermediate of every (loop, layer): activations grow with T * L * S.
With a policy the layer is wrapped in `jax.checkpoint` and keeps only what the policy saves, plus its
input carry; the rest is recomputed layer by layer during the backward pass.

| `remat`    | kept per (loop, layer) besides the input                            |
|------------|----------------------------------------------------------------------|
| `none`     | everything (no recompute)                                            |
| `full`     | nothing: the whole layer is recomputed                               |
| `matmuls`  | outputs of the weight matmuls (projections, MLP); norms, RoPE and    |
|            | attention are recomputed                                             |

Forward values and gradients are the same under every policy (up to the order of float additions
the compiler picks); only memory and time change. See docs/melt.md, 'Rematerialisation'.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from melt_jax.model.config import REMAT_POLICIES

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # dot_generals without batch dimensions are the matmuls against weights; attention's logits and
    # weighted sums have batch dimensions (batch, heads) and are recomputed.
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert set(_POLICIES) | {"none"} == set(REMAT_POLICIES)


def rematerialized(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """`layer_cls` whose backward pass recomputes what `policy` (one of REMAT_POLICIES) does not keep."""
    if policy == "none":
        return layer_cls
    # prevent_cse guards against XLA merging the recompute with the forward; inside scans it is not
    # needed and costs performance.
    return nn.remat(layer_cls, policy=_POLICIES[policy], prevent_cse=False)
