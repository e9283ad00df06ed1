"""Where MELT's attention reads earlier tokens' keys and values from, besides its own cache.

- `InterpolatedCache`: the phase-1 student's caches, MELT's rows and Ouro's per-loop rows of the same
  tokens, which attention mixes with the interpolation weight alpha (docs/melt.md, "Phase 1").
- `EarlierRows`: the pass-1 rows of the two-pass training forward (docs/melt.md, "Training forwards").
"""

from __future__ import annotations

import flax.struct
import jax

from melt_jax.cache import KVCache, init_cache
from melt_jax.config import MeltConfig

Array = jax.Array


@flax.struct.dataclass
class InterpolatedCache:
    """The caches of the phase-1 interpolated student (docs/melt.md, 'Phase 1: interpolation'): MELT's rows
    (k, v [L, B, K, S_max, D]: final rows of earlier tokens) and Ouro's per-loop rows of the same
    tokens (k, v [T, L, B, K, S_max, D]), computed from the student's own hidden states."""

    melt: KVCache
    ouro: KVCache

    @property
    def end_index(self) -> Array:
        return self.melt.end_index

    @property
    def max_length(self) -> int:
        return self.melt.max_length

    @property
    def batch_size(self) -> int:
        return self.melt.batch_size

    def advance(self, num_tokens) -> InterpolatedCache:
        return InterpolatedCache(melt=self.melt.advance(num_tokens), ouro=self.ouro.advance(num_tokens))


@flax.struct.dataclass
class EarlierRows:
    """Pass-1 rows for the two-pass training forward: every token's stored rows (a KVCache, or an
    InterpolatedCache when interpolating, with positions 0..S-1) and the chunk size. A token sees these
    rows of the tokens of earlier chunks, and the current-loop rows of its own chunk."""

    cache: KVCache | InterpolatedCache
    chunk_size: int = flax.struct.field(pytree_node=False)


def init_training_cache(config: MeltConfig, batch_size: int, length: int, interpolate: bool, dtype=None):
    """An empty cache for a chunked forward: MELT's rows, plus Ouro's per-loop rows when interpolating."""
    melt = init_cache(config, batch_size, length, dtype)
    if not interpolate:
        return melt
    ouro = init_cache(config, batch_size, length, dtype, slots=(config.num_loops, config.num_layers))
    return InterpolatedCache(melt=melt, ouro=ouro)
