"""Attention: softmax(q k^T / sqrt(D)) v over the keys each query may see, where the keys and values
come from (the KV sources) and how the softmax is computed (the implementations).

One attention call of a layer: the layer (melt_jax/model/ouro.py, melt.py) passes its queries, its
rows of keys and values, the TokenContext of the tokens in flight and the config's implementation to
a KV source's `attend`; the source builds the mask and the key set and calls an entry point of
dispatch.py, which picks the implementation that computes it.

| module              | job                                                                        |
|---------------------|----------------------------------------------------------------------------|
| `context.py`        | `TokenContext`: positions, rotary tables, segment ids, in_order            |
| `implementation.py` | names, block sizes, the "auto" rule and kernel fallback, `target_platform` |
| `masks.py`          | `CausalMask`, `EarlierAndOwnMask` and the masks of the sources' paths      |
| `dense.py`          | "xla": dense logits, one softmax                                           |
| `blockwise.py`      | "blockwise": online softmax in blocks, recomputing custom_vjp gradient     |
| `splash.py`         | "splash": jax's TPU Pallas splash kernel                                   |
| `cudnn.py`          | "cudnn": cuDNN flash attention through jax.nn.dot_product_attention        |
| `pallas_gpu.py`     | "pallas_gpu": flash attention in Pallas (Triton) with segments, two-pass   |
| `pallas_gpu_kernels.py` | its programs (forward, key and query gradients) and their mask         |
| `kernel_mesh.py`    | a kernel call on each device's share of the mesh (shard_map)               |
| `dispatch.py`       | `attend`, `attend_earlier_and_own`, `attend_history_and_own`: the choice   |
| `filled_history.py` | `attend_filled_history_and_own`: inference's read of the filled slots      |
| `kv_sources.py`     | `KVSource` and its subclasses, their caches' carried types                 |

Implementations (`Implementation.name`, the model config's `attention` field): "xla", "blockwise",
"auto" ("xla" while S * M <= AUTO_DENSE_MAX_LOGITS logits per head; above, the first kernel of
AUTO_KERNELS for the traced-for platform that takes the call, else "blockwise"), and the kernels
"splash", "cudnn" and "pallas_gpu" for the calls they take, "auto"'s choice elsewhere. Their speed is
measured by benchmarks/attention_speed.py (figures in docs/measured.md); each module says what it computes.

Letters in shape comments and einsum strings: B batch, S query tokens, M key/value tokens, N query
heads, K key/value heads, G query heads per kv head (N = K * G; query head n reads kv head n // G),
D head dim.

Adding a kernel: a module here with the kernel, its `..._takes(q, mask)` predicate and `..._attend`
(and `..._earlier_and_own` if it computes the two-pass pattern) in the signatures of
`dispatch.KernelCalls`; one line in `dispatch.KERNEL_CALLS`; its name with what it asks of the config
and the platform in `implementation.KERNELS` (the config validates names without importing kernels).
Tests: the kernel against dense on every path it takes, and its fallback where it does not.

Adding a KV source: a `KVSource` subclass in kv_sources.py with `attend(q, rows, ouro_rows, cache,
ctx, layer_index, loop_index, implementation)` and, if it reads a cache, `check` (and `begin`/`end`,
`freeze`/`fill_skipped` as needed); its mask from masks.py; one line here in the imports and
`__all__`. A caller passes it as `model.apply(..., kv_source=...)` (docs/melt.md, 'Adding a cache
variant or attention path').

Import from this package; the submodules import each other directly. One exception: the model config
imports implementation.py itself (the package's KV sources import the cache, and so the config), and
implementation.py imports nothing of the model.
"""

from melt_jax.model.attention.blockwise import blockwise_attention
from melt_jax.model.attention.context import TokenContext
from melt_jax.model.attention.cudnn import cudnn_attention, cudnn_takes
from melt_jax.model.attention.dense import dense_attention
from melt_jax.model.attention.dispatch import (
    KERNEL_CALLS,
    attend,
    attend_earlier_and_own,
    attend_history_and_own,
)
from melt_jax.model.attention.filled_history import attend_filled_history_and_own
from melt_jax.model.attention.implementation import (
    AUTO_DENSE_MAX_LOGITS,
    AUTO_KERNELS,
    DEFAULT_BLOCK,
    DENSE,
    IMPLEMENTATIONS,
    KERNELS,
    Implementation,
    check_implementation,
    control_flow_on_device,
    describe_attention,
    target_platform,
)
from melt_jax.model.attention.kv_sources import (
    EarlierRows,
    InterpolatedCache,
    InterpolatedSlotCache,
    InterpolatedTokens,
    KVSource,
    OwnTokens,
    PendingRows,
    Rows,
    SlotCache,
    default_source,
    init_training_cache,
    interpolate,
    slot_index,
)
from melt_jax.model.attention.masks import CausalMask, EarlierAndOwnMask, causal_mask, slot_mask
from melt_jax.model.attention.pallas_gpu import pallas_gpu_attention
from melt_jax.model.attention.splash import splash_attention

__all__ = [
    "AUTO_DENSE_MAX_LOGITS",
    "AUTO_KERNELS",
    "DEFAULT_BLOCK",
    "DENSE",
    "IMPLEMENTATIONS",
    "KERNELS",
    "KERNEL_CALLS",
    "CausalMask",
    "EarlierAndOwnMask",
    "EarlierRows",
    "Implementation",
    "InterpolatedCache",
    "InterpolatedSlotCache",
    "InterpolatedTokens",
    "KVSource",
    "OwnTokens",
    "PendingRows",
    "Rows",
    "SlotCache",
    "TokenContext",
    "attend",
    "attend_earlier_and_own",
    "attend_filled_history_and_own",
    "attend_history_and_own",
    "blockwise_attention",
    "causal_mask",
    "check_implementation",
    "control_flow_on_device",
    "cudnn_attention",
    "cudnn_takes",
    "default_source",
    "describe_attention",
    "dense_attention",
    "init_training_cache",
    "interpolate",
    "pallas_gpu_attention",
    "slot_index",
    "slot_mask",
    "splash_attention",
    "target_platform",
]
