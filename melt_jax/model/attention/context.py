"""What every layer of every loop needs about the tokens in flight."""

from __future__ import annotations

import flax.struct
import jax

Array = jax.Array


@flax.struct.dataclass
class TokenContext:
    """The tokens in flight of one model call: their positions and rotary tables (the layers read
    them) and what their attention masks need (the KV sources read positions, segment ids and
    `in_order`; see masks.py)."""

    positions: Array  # [B, S] int32
    cos: Array  # [B, S, D] float32
    sin: Array  # [B, S, D] float32
    segment_ids: Array | None = None  # [B, S] int32: a token attends only within its segment
    # The positions increase along every row (the model made them), so the tokens in flight see each
    # other in index order: a mask known when tracing, which the attention kernels take.
    in_order: bool = flax.struct.field(pytree_node=False, default=False)
