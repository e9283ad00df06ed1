"""Attention implementations (melt_jax/model/attention/): blockwise equals dense in values and
gradients on every attention path (causal, cache slots, the two-pass pattern; grouped heads, segment
masks, blocks that do not divide the sequence, bf16); the blockwise gradient does not materialise
[S, M]; the splash kernel (through its interpreter on this CPU) and the cuDNN wrapper (through
jax.nn.dot_product_attention's "xla" implementation) equal dense on the paths they serve, the others
falling back; the choice is validated and kept as runtime policy; and the models give the same
logits and gradients with every implementation, with segment ids keeping packed documents apart."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DEFAULT

from melt_jax.checkpoint import load_config, save_params
from melt_jax.errors import ConfigError
from melt_jax.inference import decode_step, prefill
from melt_jax.model import (
    ExitPolicy,
    KVCache,
    MeltConfig,
    MeltModel,
    OuroConfig,
    OuroModel,
    init_cache,
    mean_next_token_loss,
    two_pass_forward,
)
from melt_jax.model.attention import (
    AUTO_DENSE_MAX_LOGITS,
    DENSE,
    KERNEL_CALLS,
    KERNELS,
    Implementation,
    OwnTokens,
    Rows,
    SlotCache,
    TokenContext,
    attend,
    attend_earlier_and_own,
    attend_history_and_own,
    blockwise_attention,
    causal_mask,
    cudnn_attention,
    cudnn_takes,
    describe_attention,
    pallas_gpu_attention,
    slot_mask,
)
from melt_jax.model.attention import implementation as attention_implementation
from melt_jax.model.attention import pallas_gpu as pallas_gpu_module
from melt_jax.model.attention.masks import history_and_own_mask
from melt_jax.model.attention.pallas_gpu import pallas_gpu_takes, pallas_gpu_takes_earlier_and_own
from melt_jax.sharding import MeshConfig, make_mesh

B, N, D = 2, 4, 8
TOL = 1e-5


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _values_and_grads(fn, q, k, v):
    """(fn(q, k, v), gradients w.r.t. q, k, v of a random scalar function of the output), jitted."""
    weights = _normal(99, q.shape)

    def both(q, k, v):
        grads = jax.grad(lambda *x: jnp.sum(fn(*x).astype(jnp.float32) * weights), argnums=(0, 1, 2))(q, k, v)
        return fn(q, k, v), grads

    return jax.jit(both)(q, k, v)


def _assert_same(dense_fn, blockwise_fn, q, k, v, tol=TOL):
    dense, dense_grads = _values_and_grads(dense_fn, q, k, v)
    blockwise, blockwise_grads = _values_and_grads(blockwise_fn, q, k, v)
    np.testing.assert_allclose(blockwise, dense, atol=tol, rtol=0)
    for name, got, want in zip("qkv", blockwise_grads, dense_grads):
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=f"gradient w.r.t. {name}")


def _blockwise(query_block, key_block):
    return Implementation("blockwise", query_block, key_block)


def _tokens(seq):
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (B, seq))  # [B, S]


def _context(positions, segment_ids=None):
    """The TokenContext a KV source reads (positions, segment ids); no rotary tables."""
    return TokenContext(positions=positions, cos=None, sin=None, segment_ids=segment_ids)


# Row 0: two documents and padding; row 1: one document, then padding.
SEGMENTS_13 = jnp.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 10 + [0] * 3], jnp.int32)


# --------------------------------------------------------------------------------------------------
# Blockwise against dense, function by function


# Key/value heads 1 (MQA), 2 (GQA), N (MHA), each with other blocks: dividing nothing, the whole
# sequence, larger than it (clipped).
@pytest.mark.parametrize("kv_heads, blocks", [(1, (4, 5)), (2, (13, 13)), (N, (16, 3))], ids=["kv1", "kv2", "kv4"])
@pytest.mark.parametrize("segments", [False, True], ids=["causal", "segments"])
def test_blockwise_equals_dense_on_causal_self_attention(kv_heads, blocks, segments):
    seq = 13
    q, k, v = _normal(0, (B, seq, N, D)), _normal(1, (B, seq, kv_heads, D)), _normal(2, (B, seq, kv_heads, D))
    ids = SEGMENTS_13 if segments else None
    mask = causal_mask(_tokens(seq), _tokens(seq), ids, ids)
    _assert_same(
        lambda q, k, v: attend(q, k, v, mask, implementation=DENSE),
        lambda q, k, v: attend(q, k, v, mask, implementation=_blockwise(*blocks)),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "segments"])
def test_blockwise_equals_dense_over_a_partly_filled_cache(segments):
    """Queries at positions end..end+S of each row over an S_max slot array (cache layout [B, K, S_max,
    D]), the slots after a row's last query holding garbage that must stay unseen."""
    seq, max_length, kv_heads = 5, 16, 2
    end = jnp.array([3, 9], jnp.int32)
    positions = end[:, None] + jnp.arange(seq, dtype=jnp.int32)  # [B, S]
    q = _normal(3, (B, seq, N, D))
    k, v = _normal(4, (B, kv_heads, max_length, D)), _normal(5, (B, kv_heads, max_length, D))
    slot_ids = q_ids = None
    if segments:  # row 0: a document ends at slot 5; row 1: slots 14.. are padding
        slot_ids = jnp.array([[1] * 6 + [2] * 10, [1] * 14 + [0] * 2], jnp.int32)
        q_ids = jnp.take_along_axis(slot_ids, positions, axis=1)
    mask = slot_mask(positions, max_length, q_ids, slot_ids)
    _assert_same(
        lambda q, k, v: attend(q, k, v, mask, kv_heads_first=True),
        lambda q, k, v: attend(q, k, v, mask, implementation=_blockwise(2, 3), kv_heads_first=True),
        q,
        k,
        v,
    )
    # The garbage after the queries is unseen: replacing it changes nothing.
    later = jnp.arange(max_length)[None, None, :, None] > positions[:, None, -1:, None]  # [B, 1, S_max, 1]
    k_other = jnp.where(later, _normal(6, k.shape), k)
    for implementation in (DENSE, _blockwise(2, 3)):
        run = jax.jit(lambda k, i=implementation: attend(q, k, v, mask, implementation=i, kv_heads_first=True))
        np.testing.assert_allclose(run(k_other), run(k), atol=TOL)


@pytest.mark.parametrize(
    "chunk, segments",
    [(1, False), (4, False), (12, False), (1, True), (3, True)],
    ids=["chunk1", "chunk4", "chunk12-one-chunk", "chunk1-segments", "chunk3-segments"],
)
def test_blockwise_equals_dense_on_the_two_pass_pattern(chunk, segments):
    seq, kv_heads = 12, 2
    q, k, v = _normal(7, (B, seq, N, D)), _normal(8, (B, seq, kv_heads, D)), _normal(9, (B, seq, kv_heads, D))
    earlier_k, earlier_v = _normal(10, (B, kv_heads, seq, D)), _normal(11, (B, kv_heads, seq, D))
    ids = SEGMENTS_13[:, :seq] if segments else None

    def run(implementation):
        def fn(q, k, v):  # the earlier rows are constants of pass 2, the own rows get gradients
            return attend_earlier_and_own(
                q, earlier_k, earlier_v, k, v, chunk, segment_ids=ids, implementation=implementation
            )

        return fn

    _assert_same(run(DENSE), run(_blockwise(5, 7)), q, k, v)


def _reference(q, k, v, visible):
    """Attention written out in numpy (float64): q [B, S, N, D], k, v [B, M, K, D], visible [B, S, M]."""
    q, k, v, visible = (np.asarray(x, np.float64) for x in (q, k, v, visible))
    group = q.shape[2] // k.shape[2]
    logits = np.einsum("BSND,BMND->BNSM", q, np.repeat(k, group, axis=2)) / np.sqrt(q.shape[-1])
    logits = np.where(visible[:, None].astype(bool), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("BNSM,BMND->BSND", probs, np.repeat(v, group, axis=2))


def test_segment_masks_keep_documents_apart():
    """Both implementations against attention written out: a token sees the earlier tokens of its own
    segment only; padding (segment 0) sees only padding."""
    seq = 13
    q, k, v = _normal(12, (B, seq, N, D)), _normal(13, (B, seq, 2, D)), _normal(14, (B, seq, 2, D))
    ids = np.asarray(SEGMENTS_13)
    positions = np.arange(seq)
    visible = (positions[None, None, :] <= positions[None, :, None]) & (ids[:, :, None] == ids[:, None, :])
    mask = causal_mask(_tokens(seq), _tokens(seq), SEGMENTS_13, SEGMENTS_13)
    np.testing.assert_array_equal(mask.dense(), visible)
    expected = _reference(q, k, v, visible)
    for implementation in (DENSE, _blockwise(4, 4)):
        np.testing.assert_allclose(attend(q, k, v, mask, implementation=implementation), expected, atol=TOL)


def test_bf16_blockwise_is_as_close_to_float32_as_dense():
    """bf16 inputs: both implementations round probabilities to bf16 before the value matmul (dense
    the normalised ones, blockwise the ones scaled by the running max), round the output and the
    gradients to bf16, and receive the output's cotangent in bf16. Each is therefore within a few
    bf16 steps (2^-8 relative to the largest value) of the float32 computation on the same rounded
    inputs, the maximum being set by single roundings; on average blockwise (float32 inside the
    backward pass, cast once) is no further from it than dense."""
    seq, kv_heads = 40, 2
    q, k, v = (
        _normal(s, shape, jnp.bfloat16)
        for s, shape in ((15, (B, seq, N, D)), (16, (B, seq, kv_heads, D)), (17, (B, seq, kv_heads, D)))
    )
    mask = causal_mask(_tokens(seq), _tokens(seq))
    upcast = lambda x: x.astype(jnp.float32)  # noqa: E731
    exact, exact_grads = _values_and_grads(lambda *x: attend(*map(upcast, x), mask), q, k, v)
    mean_errors = {}
    for name, implementation in (("dense", DENSE), ("blockwise", _blockwise(16, 8))):
        out, grads = _values_and_grads(lambda *x, i=implementation: attend(*x, mask, implementation=i), q, k, v)
        assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
        errors = [jnp.abs(upcast(a) - b) for a, b in zip((out, *grads), (exact, *exact_grads))]
        for error, want in zip(errors, (exact, *exact_grads)):
            assert float(jnp.max(error)) <= 4 * 2**-8 * float(jnp.max(jnp.abs(want))), name
        mean_errors[name] = [float(jnp.mean(error)) for error in errors]
    for blockwise_error, dense_error in zip(mean_errors["blockwise"], mean_errors["dense"]):
        assert blockwise_error <= 1.25 * dense_error, mean_errors


def _grad_temp_bytes(implementation: Implementation, seq: int, heads: int) -> int:
    """XLA's temporary memory of the compiled gradient of attention over `seq` tokens (1 row, `heads`
    query heads and 1 key/value head of 16)."""
    q = jax.ShapeDtypeStruct((1, seq, heads, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, seq, 1, 16), jnp.float32)
    positions = jnp.arange(seq, dtype=jnp.int32)[None]

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, causal_mask(positions, positions), implementation=implementation))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_gradient_does_not_materialise_the_logits():
    """Blocks of 256: a block pair's logits, probabilities and their gradients (each [N, 256, 256]
    float32) are the constant part of blockwise's temporary memory; the rest grows with S."""
    heads, seq, blocks = 2, 2048, _blockwise(256, 256)
    blockwise = _grad_temp_bytes(blocks, seq, heads)
    dense = _grad_temp_bytes(DENSE, seq, heads)
    one_logits_array = seq * seq * 4 * heads  # [N, S, S] float32
    assert dense >= one_logits_array  # the check can fail: dense keeps S x S arrays
    assert blockwise < one_logits_array / 8 and blockwise < dense / 20, (blockwise, dense)
    # Linear, not quadratic, in the sequence.
    half = _grad_temp_bytes(blocks, seq // 2, heads)
    assert blockwise <= 2.5 * half, (half, blockwise)


def test_blockwise_gradient_inside_a_scan_keeps_no_block_masks():
    """Attention over traced positions inside a scan (as in the scans over loops and layers): JAX's
    split of the scan body under a gradient would keep the position-derived mask of every block pair
    (S x S in all) unless the blockwise forward recomputes it; temporary memory stays linear in S."""
    heads, blocks = 2, _blockwise(256, 256)

    def temp_bytes(seq):
        q = jax.ShapeDtypeStruct((1, seq, heads, 16), jnp.float32)
        positions = jax.ShapeDtypeStruct((1, seq), jnp.int32)

        def loss(q, k, v, positions):
            def one_loop(carry, _):
                out = attend(q + carry, k, v, causal_mask(positions, positions), implementation=blocks)
                return carry + jnp.mean(out), None

            return jax.lax.scan(one_loop, 0.0, None, length=4)[0]

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, q, q, positions).compile().memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(1024), temp_bytes(4096)
    assert long <= 2.5 * short, (short, long)  # 4x the tokens; 16x the block pairs


def test_blockwise_accepts_any_block_size():
    seq = 6
    q, k, v = _normal(18, (B, seq, N, D)), _normal(19, (B, seq, N, D)), _normal(20, (B, seq, N, D))
    mask = causal_mask(_tokens(seq), _tokens(seq))
    dense = attend(q, k, v, mask)
    for blocks in ((1, 1), (5, 4), (100, 100)):
        got = jax.jit(lambda q, b=blocks: blockwise_attention(q, k, v, mask, query_block=b[0], key_block=b[1]))(q)
        np.testing.assert_allclose(got, dense, atol=TOL, err_msg=str(blocks))


# --------------------------------------------------------------------------------------------------
# The kernels against dense: splash through its interpreter, the cuDNN wrapper through "xla"


def _splash(query_block=128, key_block=128):
    return Implementation("splash", query_block, key_block)


# 13 tokens: one block of 128 after padding. 300 tokens: 3 query blocks of 128 and, with key blocks of
# 256, a sequence padded to 512 (a multiple of both), blocks above the diagonal skipped.
@pytest.mark.parametrize(
    "kv_heads, seq, blocks, segments, kv_heads_first",
    [(1, 13, (128, 128), False, False), (2, 13, (512, 512), True, True), (N, 300, (128, 256), True, False)],
    ids=["kv1-causal", "kv2-segments-cache-layout", "kv4-segments-300-tokens"],
)
def test_splash_equals_dense_on_causal_self_attention(kv_heads, seq, blocks, segments, kv_heads_first):
    kv_shape = (B, kv_heads, seq, D) if kv_heads_first else (B, seq, kv_heads, D)
    q, k, v = _normal(30, (B, seq, N, D)), _normal(31, kv_shape), _normal(32, kv_shape)
    ids = None
    if segments:  # row 0: two documents and padding; row 1: one document, then padding
        ids = jnp.stack([jnp.repeat(jnp.array([1, 2, 0]), jnp.array([5, seq - 7, 2]), total_repeat_length=seq)] * B)
        ids = ids.at[1].set(jnp.where(jnp.arange(seq) < seq - 3, 1, 0))
    mask = causal_mask(_tokens(seq), _tokens(seq), ids, ids, in_order=True)
    _assert_same(
        lambda q, k, v: attend(q, k, v, mask, kv_heads_first=kv_heads_first),
        lambda q, k, v: attend(q, k, v, mask, implementation=_splash(*blocks), kv_heads_first=kv_heads_first),
        q,
        k,
        v,
    )


def _two_pass_inputs(seed: int, seq: int, segments: bool):
    """q [B, S, N, D], the own rows k, v [B, S, 2, D], the earlier rows [B, 2, S, D] (cache layout) and,
    with segments, ids [B, S] (row 0: two documents; row 1: one, then 2 padding tokens)."""
    kv_heads = 2
    q = _normal(seed, (B, seq, N, D))
    k, v = _normal(seed + 1, (B, seq, kv_heads, D)), _normal(seed + 2, (B, seq, kv_heads, D))
    earlier_k, earlier_v = _normal(seed + 3, (B, kv_heads, seq, D)), _normal(seed + 4, (B, kv_heads, seq, D))
    ids = None
    if segments:
        ids = jnp.stack([jnp.where(jnp.arange(seq) < seq // 3, 1, 2), jnp.where(jnp.arange(seq) < seq - 2, 1, 0)])
    return q, k, v, earlier_k, earlier_v, ids


def _two_pass(earlier_k, earlier_v, chunk, ids, implementation):
    """(q, k, v) -> the two-pass pattern over these earlier rows, through `implementation`."""

    def fn(q, k, v):
        return attend_earlier_and_own(
            q, earlier_k, earlier_v, k, v, chunk, segment_ids=ids, implementation=implementation
        )

    return fn


@pytest.mark.parametrize(
    "seq, chunk, segments",
    [(12, 1, False), (12, 4, True), (12, 12, False), (260, 65, True)],
    ids=["chunk1", "chunk4-segments", "chunk12-one-chunk", "260-tokens-chunk65-segments"],
)
def test_splash_equals_dense_on_the_two_pass_pattern(seq, chunk, segments):
    """The [S, 2S] mask over the earlier and own rows; at 260 tokens in chunks of 65, chunk
    boundaries fall inside the kernel's blocks of 128."""
    q, k, v, earlier_k, earlier_v, ids = _two_pass_inputs(33, seq, segments)
    run = lambda implementation: _two_pass(earlier_k, earlier_v, chunk, ids, implementation)  # noqa: E731
    _assert_same(run(DENSE), run(_splash()), q, k, v)


@pytest.mark.parametrize(
    "kernel, kv_heads", [("splash", 1), ("splash", 2), ("pallas_gpu", 2)], ids=["splash-kv1", "splash-kv2", "pallas"]
)
def test_kernels_under_a_mesh_equal_dense(kernel, kv_heads):
    """Under `jax.set_mesh` a kernel runs on each device's share (shard_map, kernel_mesh.py): the batch
    over fsdp, the heads over tensor when it divides both N and K (kv2), else whole (kv1)."""
    seq = 13
    q, k, v = _normal(38, (B, seq, N, D)), _normal(39, (B, seq, kv_heads, D)), _normal(40, (B, seq, kv_heads, D))
    mask = causal_mask(_tokens(seq), _tokens(seq), SEGMENTS_13, SEGMENTS_13, in_order=True)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, num_devices=4))
    dense, dense_grads = _values_and_grads(lambda *x: attend(*x, mask), q, k, v)
    with jax.set_mesh(mesh):
        implementation = _splash() if kernel == "splash" else _pallas_gpu()
        out, grads = _values_and_grads(lambda *x: attend(*x, mask, implementation=implementation), q, k, v)
    np.testing.assert_allclose(out, dense, atol=TOL, rtol=0)
    for name, got, want in zip("qkv", grads, dense_grads):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"gradient w.r.t. {name}")


def test_splash_falls_back_where_the_mask_is_not_static():
    """Positions given by the caller (not known to be in order) and the partly filled cache: the
    "auto" rule's dense or blockwise, with the values of dense."""
    seq, max_length = 5, 16
    end = jnp.array([3, 9], jnp.int32)
    positions = end[:, None] + jnp.arange(seq, dtype=jnp.int32)  # [B, S]
    q = _normal(41, (B, seq, N, D))
    k, v = _normal(42, (B, 2, max_length, D)), _normal(43, (B, 2, max_length, D))
    mask = slot_mask(positions, max_length)
    dense = attend(q, k, v, mask, kv_heads_first=True)
    np.testing.assert_allclose(attend(q, k, v, mask, implementation=_splash(), kv_heads_first=True), dense, atol=TOL)
    own = causal_mask(positions, positions)  # not in order: the caller's positions could be anything
    k, v = _normal(44, (B, seq, 2, D)), _normal(45, (B, seq, 2, D))
    np.testing.assert_allclose(attend(q, k, v, own, implementation=_splash()), attend(q, k, v, own), atol=TOL)
    splash = _splash()
    assert splash.resolve(seq, seq) == "xla" and splash.resolve(seq, seq, lambda name: True) == "splash"
    assert splash.resolve(1, 32_768) == "xla" and splash.resolve(2048, 2048) == "blockwise"  # as "auto"


@pytest.mark.parametrize("kv_heads", [1, 2, N], ids=["kv1", "kv2", "kv4"])
@pytest.mark.parametrize("kv_heads_first", [False, True], ids=["token-layout", "cache-layout"])
def test_cudnn_wrapper_equals_dense(kv_heads, kv_heads_first):
    """The wrapper's layout, grouped heads, scale and causal mask, through jax.nn.dot_product_attention's
    "xla" implementation (cuDNN itself needs a GPU)."""
    seq = 13
    kv_shape = (B, kv_heads, seq, D) if kv_heads_first else (B, seq, kv_heads, D)
    q, k, v = _normal(46, (B, seq, N, D)), _normal(47, kv_shape), _normal(48, kv_shape)
    mask = causal_mask(_tokens(seq), _tokens(seq), in_order=True)
    _assert_same(
        lambda q, k, v: attend(q, k, v, mask, kv_heads_first=kv_heads_first),
        lambda q, k, v: cudnn_attention(q, k, v, kv_heads_first=kv_heads_first, backend="xla"),
        q,
        k,
        v,
    )


def test_cudnn_takes_in_order_causal_attention_in_half_precision_only():
    seq = 8
    positions = _tokens(seq)
    in_order, ids = causal_mask(positions, positions, in_order=True), jnp.ones((B, seq), jnp.int32)
    bf16 = _normal(49, (B, seq, N, 128), jnp.bfloat16)
    assert cudnn_takes(bf16, in_order) and cudnn_takes(bf16.astype(jnp.float16), in_order)
    assert not cudnn_takes(bf16.astype(jnp.float32), in_order)  # cuDNN has no float32 flash attention
    assert not cudnn_takes(bf16, causal_mask(positions, positions))  # positions not known to be in order
    assert not cudnn_takes(bf16, causal_mask(positions, positions, ids, ids, in_order=True))  # segments
    assert not cudnn_takes(_normal(50, (B, seq, N, 256), jnp.bfloat16), in_order)  # head dim
    assert not cudnn_takes(_normal(51, (B, seq, N, 12), jnp.bfloat16), in_order)


def test_cudnn_off_a_gpu_is_a_config_error_naming_the_field_and_backend():
    seq = 8
    q = k = v = _normal(52, (B, seq, N, D), jnp.bfloat16)
    positions = _tokens(seq)
    with pytest.raises(ConfigError, match=r"config field attention is 'cudnn'.*backend 'cpu'"):
        attend(q, k, v, causal_mask(positions, positions, in_order=True), implementation=Implementation("cudnn"))
    with pytest.raises(ConfigError, match=r"config field attention is 'cudnn'.*backend 'cpu'"):
        attend_earlier_and_own(q, k, v, k, v, 4, implementation=Implementation("cudnn"))


def _pallas_gpu():
    return Implementation("pallas_gpu")


# 13 tokens: one block of 16 after padding; 150 tokens: 3 query blocks of 64 (padded to 192), blocks
# above the diagonal skipped, segment ids across block edges.
@pytest.mark.parametrize(
    "kv_heads, seq, segments, kv_heads_first",
    [(1, 13, False, False), (2, 13, True, True), (N, 150, True, False)],
    ids=["kv1-causal", "kv2-segments-cache-layout", "kv4-segments-150-tokens"],
)
def test_pallas_gpu_equals_dense_on_causal_self_attention(kv_heads, seq, segments, kv_heads_first):
    """The Pallas GPU kernel through Pallas's interpreter: values and the kernels' gradients."""
    kv_shape = (B, kv_heads, seq, D) if kv_heads_first else (B, seq, kv_heads, D)
    q, k, v = _normal(60, (B, seq, N, D)), _normal(61, kv_shape), _normal(62, kv_shape)
    ids = None
    if segments:  # row 0: three documents, the second across a block edge, and padding; row 1: one
        ids = jnp.stack([jnp.where(jnp.arange(seq) < seq // 4, 1, jnp.where(jnp.arange(seq) < seq - 2, 2, 0))] * B)
        ids = ids.at[0, seq // 2 :].set(jnp.where(jnp.arange(seq - seq // 2) < seq - seq // 2 - 2, 3, 0))
        ids = ids.at[1].set(jnp.where(jnp.arange(seq) < seq - 3, 1, 0))
    mask = causal_mask(_tokens(seq), _tokens(seq), ids, ids, in_order=True)
    _assert_same(
        lambda q, k, v: attend(q, k, v, mask, kv_heads_first=kv_heads_first),
        lambda q, k, v: attend(q, k, v, mask, implementation=_pallas_gpu(), kv_heads_first=kv_heads_first),
        q,
        k,
        v,
    )


# Chunks of 16 (blocks of 16), of 32 over 96 tokens (blocks of 32),
# of 128 over 256 tokens (two query blocks of 64 per chunk).
@pytest.mark.parametrize(
    "seq, chunk, segments", [(48, 16, True), (96, 32, False), (256, 128, True)], ids=["c16-seg", "c32", "c128-seg"]
)
def test_pallas_gpu_equals_dense_on_the_two_pass_pattern(seq, chunk, segments):
    q, k, v, earlier_k, earlier_v, ids = _two_pass_inputs(63, seq, segments)
    run = lambda implementation: _two_pass(earlier_k, earlier_v, chunk, ids, implementation)  # noqa: E731
    _assert_same(run(DENSE), run(_pallas_gpu()), q, k, v)
    # The earlier rows' gradients, which the kernel computes in the same key-gradient kernel.
    weights = _normal(68, q.shape)

    def earlier_grads(implementation):
        loss = lambda ek, ev: jnp.sum(  # noqa: E731
            attend_earlier_and_own(q, ek, ev, k, v, chunk, segment_ids=ids, implementation=implementation) * weights
        )
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(earlier_k, earlier_v)

    for got, want in zip(earlier_grads(_pallas_gpu()), earlier_grads(DENSE)):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# The slot array alone (64 slots), or read in place in a cache [2, 3, B, K, 100, D] at slot (1, 2):
# 100 slots are one whole key block of 64 and a part one, the rows of row 1 reaching into it.
@pytest.mark.parametrize(
    "segments, slot", [(False, ()), (True, ()), (True, (1, 2))], ids=["causal", "segments", "in-the-cache"]
)
def test_pallas_gpu_equals_dense_over_a_slot_array_and_the_rows_in_flight(segments, slot):
    """A chunk in flight at positions base .. base + S - 1 over the slots before base of a slot array
    read in the cache layout (pass 1 of the two-pass forward, the sequential forward, prefill):
    values, and the gradients w.r.t. q, k, v and the cache."""
    seq, kv_heads = 16, 2
    max_length = 100 if slot else 64
    base = jnp.array([5, 70 if slot else 30], jnp.int32)
    positions = base[:, None] + jnp.arange(seq, dtype=jnp.int32)  # [B, S]
    cache_shape = (2, 3)[: len(slot)] + (B, kv_heads, max_length, D)  # [*P, B, K, S_max, D]
    cache_k, cache_v = _normal(80, cache_shape), _normal(81, cache_shape)
    slot_ids = None
    if segments:  # row 0: the first document ends before base; row 1: a document starts inside the chunk
        slot_ids = jnp.stack(
            [jnp.where(jnp.arange(max_length) < 3, 1, 2), jnp.where(jnp.arange(max_length) < base[1] + 10, 1, 2)]
        )
    ids = None if slot_ids is None else jnp.take_along_axis(slot_ids, positions, axis=1)
    mask = history_and_own_mask(_context(positions, ids), max_length, slot_ids)
    q = _normal(82, (B, seq, N, D))
    k, v = _normal(83, (B, seq, kv_heads, D)), _normal(84, (B, seq, kv_heads, D))

    def run(implementation, with_base, cache_k=cache_k, cache_v=cache_v):
        def fn(q, k, v):
            return attend_history_and_own(
                q, cache_k, cache_v, k, v, mask, slot=slot, implementation=implementation,
                base=base if with_base else None,
            )  # fmt: skip

        return fn

    _assert_same(run(DENSE, False), run(_pallas_gpu(), True), q, k, v)
    # Without the base (positions not known to be in order) the kernel does not take the call.
    assert "pallas_call" not in str(jax.make_jaxpr(run(_pallas_gpu(), False))(q, k, v))
    assert "pallas_call" in str(jax.make_jaxpr(run(_pallas_gpu(), True))(q, k, v))
    if slot:  # the kernel reads the cache where it lies: nothing slices the slot array out first
        eqns = jax.make_jaxpr(run(_pallas_gpu(), True))(q, k, v).eqns
        readers = {e.primitive.name for e in eqns if any(getattr(x, "aval", None) == cache_k.aval for x in e.invars)}
        assert readers and all(name.startswith("custom_vjp") for name in readers), readers
    # The cache's gradient: the slot array's, zero elsewhere in the cache.
    weights = _normal(85, q.shape)

    def cache_grads(implementation, with_base):
        loss = lambda ck, cv: jnp.sum(run(implementation, with_base, ck, cv)(q, k, v) * weights)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(cache_k, cache_v)

    for got, want in zip(cache_grads(_pallas_gpu(), True), cache_grads(DENSE, False)):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_pallas_gpu_in_bfloat16_is_as_close_to_float32_as_dense():
    """In bf16 the kernel (float32 sums and softmax in the kernel) is no further from the float32
    result than dense bf16 attention is (twice dense's largest error)."""
    seq = 70
    q, k, v = (_normal(72 + i, (B, seq, N, D)) for i in range(3))
    mask = causal_mask(_tokens(seq), _tokens(seq), in_order=True)
    exact = attend(q, k, v, mask)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    dense_error = jnp.max(jnp.abs(attend(*half, mask).astype(jnp.float32) - exact))
    kernel_error = jnp.max(jnp.abs(pallas_gpu_attention(*half).astype(jnp.float32) - exact))
    assert kernel_error <= 2 * dense_error, (kernel_error, dense_error)


def test_pallas_gpu_takes_static_masks_and_whole_tiles():
    positions = _tokens(8)
    q = _normal(75, (B, 8, N, 128), jnp.bfloat16)
    ids = jnp.ones((B, 8), jnp.int32)
    assert pallas_gpu_takes(q, causal_mask(positions, positions, ids, ids, in_order=True))  # segments too
    assert pallas_gpu_takes(q.astype(jnp.float32), causal_mask(positions, positions, in_order=True))
    assert not pallas_gpu_takes(q, causal_mask(positions, positions))  # positions not known to be in order
    assert pallas_gpu_takes_earlier_and_own(q, 512) and pallas_gpu_takes_earlier_and_own(q, 12)  # interpreted


def test_pallas_gpu_takes_chunks_of_whole_tiles_on_a_gpu(monkeypatch):
    monkeypatch.setattr(pallas_gpu_module, "target_platform", lambda: "gpu")
    q = _normal(75, (B, 8, N, 128), jnp.bfloat16)
    assert pallas_gpu_takes_earlier_and_own(q, 512) and not pallas_gpu_takes_earlier_and_own(q, 12)


# --------------------------------------------------------------------------------------------------
# The choice: validation, "auto", runtime policy


def test_unknown_implementations_and_block_sizes_are_named():
    names = "auto, xla, blockwise, splash, cudnn, pallas_gpu"
    for name in ("flash", "dense", ""):
        with pytest.raises(ConfigError, match=f"attention must be one of {names}, got"):
            Implementation(name)
        with pytest.raises(ConfigError, match=f"config field attention must be one of {names}"):
            OuroConfig.preset("tiny", attention=name)
    for field in ("attention_query_block", "attention_key_block"):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ConfigError, match=f"config field {field} must be a positive integer"):
                OuroConfig.preset("tiny", **{field: bad})
    with pytest.raises(ConfigError, match="attention_key_block must be a positive integer, got 0"):
        Implementation("blockwise", 4, 0)
    with pytest.raises(ConfigError, match="config field attention_query_block must be a multiple of 128 for splash"):
        OuroConfig.preset("tiny", attention="splash", attention_query_block=64)
    Implementation("blockwise", 64, 64)  # any block for blockwise
    from melt_jax.train.config import RunConfigError, load_train_config

    with pytest.raises(RunConfigError, match=f"attention must be one of {names}, got 'flash'"):
        load_train_config(None, ["attention=flash"])
    assert load_train_config(None, ["attention=splash"]).attention == "splash"


def test_every_kernel_has_its_calls():
    assert tuple(KERNEL_CALLS) == tuple(KERNELS)


def test_auto_is_dense_for_few_logits_and_blockwise_for_many():
    auto = Implementation("auto")
    assert auto.resolve(24, 24) == "xla"
    assert auto.resolve(1, 32_768) == "xla"  # decoding one token over a long cache
    assert auto.resolve(512, 512) == "blockwise" and auto.resolve(8, 4096) == "xla"
    assert auto.resolve(AUTO_DENSE_MAX_LOGITS, 1) == "xla" and auto.resolve(AUTO_DENSE_MAX_LOGITS + 1, 1) == "blockwise"
    assert Implementation("xla").resolve(8192, 8192) == "xla"
    assert OuroConfig.preset("tiny").attention_implementation == DENSE  # the default computes as before


@pytest.mark.parametrize(
    "platform, takes, picked",
    [
        ("cpu", {"splash", "cudnn", "pallas_gpu"}, "blockwise"),  # kernels only interpreted there
        ("tpu", {"splash", "pallas_gpu"}, "splash"),
        ("tpu", set(), "blockwise"),
        ("gpu", {"splash", "cudnn", "pallas_gpu"}, "cudnn"),
        ("gpu", {"splash", "pallas_gpu"}, "pallas_gpu"),  # segment ids, the two-pass pattern, float32
    ],
)
def test_auto_picks_the_platforms_kernel_that_takes_the_call(platform, takes, picked, monkeypatch):
    """Above the dense threshold "auto" computes a call with the first kernel of the platform the
    program is traced for that takes it; below, dense on every platform."""
    monkeypatch.setattr(attention_implementation, "target_platform", lambda: platform)
    auto = Implementation("auto")
    assert auto.resolve(4096, 4096, lambda name: name in takes) == picked
    assert auto.resolve(1, 4096, lambda name: True) == "xla"
    assert platform in describe_attention("auto", platform) and (
        picked in describe_attention("auto", platform) or picked == "blockwise"
    )


def test_auto_traced_for_a_gpu_computes_packed_documents_with_the_pallas_kernel(monkeypatch):
    """A model-sized call with segment ids, traced for a GPU: the Pallas kernel (here interpreted),
    with the values of dense."""
    monkeypatch.setattr(attention_implementation, "target_platform", lambda: "gpu")
    seq = 384  # 147,456 logits per head: above the dense threshold
    q, k, v = (_normal(76 + i, (1, seq, 2, D)) for i in range(3))
    ids = jnp.where(jnp.arange(seq) < 200, 1, 2)[None]
    mask = causal_mask(_tokens(seq)[:1], _tokens(seq)[:1], ids, ids, in_order=True)
    calls = KERNEL_CALLS["pallas_gpu"]
    picked = []
    spy = lambda *args: picked.append("pallas_gpu") or calls.attend(*args)  # noqa: E731
    monkeypatch.setitem(KERNEL_CALLS, "pallas_gpu", dataclasses.replace(calls, attend=spy))
    np.testing.assert_allclose(
        attend(q, k, v, mask, implementation=Implementation("auto")), attend(q, k, v, mask), atol=TOL, rtol=0
    )
    assert picked == ["pallas_gpu"]


def test_attention_is_runtime_policy_kept_by_checkpoints_not_config_json(tmp_path):
    config = MeltConfig.from_ouro(OuroConfig.preset("tiny"), chunk_size=4).replace(
        attention="blockwise", attention_query_block=64, attention_key_block=32
    )
    hf = config.to_hf_config()
    assert not {"attention", "attention_query_block", "attention_key_block"} & set(hf)
    assert MeltConfig.from_hf_config(hf).attention == "xla"  # config.json does not carry it
    save_params(tmp_path / "ckpt", config, {"w": np.zeros(2, np.float32)})
    loaded = load_config(tmp_path / "ckpt")
    assert (loaded.attention, loaded.attention_query_block, loaded.attention_key_block) == ("blockwise", 64, 32)
    assert load_config(tmp_path / "ckpt", dtype="bfloat16").attention == "blockwise"
    assert MeltConfig.from_ouro(config).attention == "blockwise"


def test_a_cache_needs_its_slots_segment_ids_for_segment_masking():
    cache = KVCache(k=_normal(21, (1, B, 2, 8, D)), v=_normal(22, (1, B, 2, 8, D)), end_index=jnp.zeros(B, jnp.int32))
    rows = Rows(k=_normal(23, (B, 3, 2, D)), v=_normal(24, (B, 3, 2, D)))
    q, positions, ids = _normal(25, (B, 3, N, D)), _tokens(3), jnp.ones((B, 3), jnp.int32)

    def slot_cache_attend(source, segment_ids=None):
        carried = source.begin(cache, rows.k.shape)
        return source.attend(q, rows, None, carried, _context(positions, segment_ids), 0, 0)

    with pytest.raises(ConfigError, match=r"segment ids over a cache need the segment ids of its slots"):
        slot_cache_attend(SlotCache(), segment_ids=ids)
    # Given the slots' ids, the queries' own ids default to the slots' at their positions.
    slot_ids = jnp.array([[1, 1, 2, 2, 2, 0, 0, 0]] * B, jnp.int32)
    with_ids, _ = slot_cache_attend(SlotCache(slot_ids), segment_ids=slot_ids[:, :3])
    derived, _ = slot_cache_attend(SlotCache(slot_ids))
    np.testing.assert_array_equal(with_ids, derived)
    own, _ = OwnTokens().attend(q, rows, None, None, _context(positions, slot_ids[:, :3]), 0, 0)
    np.testing.assert_allclose(derived, own, atol=TOL)  # the empty cache adds nothing visible


# --------------------------------------------------------------------------------------------------
# The models with attention="blockwise" and "splash" against "xla"

BLOCKWISE = dict(attention="blockwise", attention_query_block=5, attention_key_block=7)  # divide nothing
SPLASH = dict(attention="splash", attention_query_block=128, attention_key_block=128)
SEQ = 24


@pytest.fixture(scope="module")
def tiny(melt_of):
    """(Ouro config, MELT config, MELT params (Ouro's plus gates), tokens [2, 24]) of the default
    structure."""
    melt = melt_of(DEFAULT)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, melt.config.vocab_size, size=(2, SEQ)))
    return melt.ouro.config, melt.config, jax.tree.map(jnp.asarray, melt.params), tokens


def _each(config):
    """name -> the config computing attention that way; "xla" first, the reference."""
    return {
        "xla": config,
        "blockwise": config.replace(**BLOCKWISE),
        "splash": config.replace(**SPLASH),
        "pallas_gpu": config.replace(attention="pallas_gpu"),
    }


def _assert_trees_close(got, want, rtol=1e-4):
    """Every leaf within rtol of the largest magnitude of its counterpart."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-6)
        np.testing.assert_allclose(a, b, atol=rtol * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


def _runs_splash(fn, *args) -> bool:
    """Whether fn(*args) runs a Pallas kernel (splash or the Pallas GPU kernel, whichever the config names)."""
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def _ouro_params(params):
    return {k: v for k, v in params.items() if k != "layers"} | {
        "layers": {k: v for k, v in params["layers"].items() if k != "kv_gate"}
    }


def test_model_forward_logits_and_gradients_match(tiny):
    """Ouro's forward (the tokens attend to each other: the source of MELT's one-chunk forward too)."""
    ouro_config, _, params, tokens = tiny

    def loss(params, config):
        out = OuroModel(config).apply({"params": params}, tokens, exit_policy=ExitPolicy.last())
        return mean_next_token_loss(out.logits, tokens), out.logits

    results = {
        name: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(_ouro_params(params), c)
        for name, c in _each(ouro_config).items()
    }
    (_, want_logits), want_grads = results["xla"]
    for name in ("blockwise", "splash", "pallas_gpu"):
        (_, logits), grads = results[name]
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0, err_msg=name)
        _assert_trees_close(grads, want_grads)
    splash = _each(ouro_config)["splash"]
    assert _runs_splash(lambda p: loss(p, splash), _ouro_params(params))
    assert _runs_splash(lambda p: loss(p, _each(ouro_config)["pallas_gpu"]), _ouro_params(params))
    # Positions given by the caller are not known to be in order: the "auto" rule's dense instead.
    given = lambda p: OuroModel(splash).apply({"params": p}, tokens, positions=_tokens(SEQ))  # noqa: E731
    assert not _runs_splash(given, _ouro_params(params))


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_models_cached_prefill_and_decode_match(tiny, kind):
    ouro_config, melt_config, params, tokens = tiny
    config, model_cls = (ouro_config, OuroModel) if kind == "ouro" else (melt_config, MeltModel)
    params = _ouro_params(params) if kind == "ouro" else params
    logits = {}
    for name, c in _each(config).items():  # splash: the cache paths fall back (dense here)
        model = model_cls(c)
        cache = init_cache(c, tokens.shape[0], SEQ + 8)
        first, cache = prefill(model, params, tokens[:, :20], cache)  # MELT: chunks of 8, the last of 4
        steps = [first]
        for i in range(20, SEQ):
            step, cache = jax.jit(decode_step, static_argnums=0)(model, params, tokens[:, i], cache)
            steps.append(step[:, None])
        logits[name] = jnp.concatenate(steps, axis=1)
        assert not _runs_splash(lambda p, c, m=model: decode_step(m, p, tokens[:, 0], c), params, cache)
    for name in ("blockwise", "splash", "pallas_gpu"):
        np.testing.assert_allclose(logits[name], logits["xla"], atol=1e-4, rtol=0, err_msg=name)


def test_two_pass_training_forward_values_and_gradients_match(tiny):
    """MELT's two-pass forward: pass 1 through the slot cache, pass 2 through the earlier-and-own
    pattern. (The interpolated one, which mixes the rows before the same attention, is compared
    with segment ids below.)"""
    _, melt_config, params, tokens = tiny

    def loss(params, config):
        model = MeltModel(config)
        out = two_pass_forward(model, params, tokens, 8)
        logits = model.apply({"params": params}, out.loop_hidden[-1], method=MeltModel.logits)
        return mean_next_token_loss(logits, tokens), logits

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    results = {name: run(params, c) for name, c in _each(melt_config).items()}
    for name in ("blockwise", "splash", "pallas_gpu"):  # kernels: pass 1 falls back (the cache), pass 2 runs them
        np.testing.assert_allclose(results[name][0][1], results["xla"][0][1], atol=1e-4, rtol=0, err_msg=name)
        _assert_trees_close(results[name][1], results["xla"][1])
    assert _runs_splash(lambda p: loss(p, _each(melt_config)["splash"]), params)
    assert _runs_splash(lambda p: loss(p, _each(melt_config)["pallas_gpu"]), params)


# --------------------------------------------------------------------------------------------------
# Segment ids keep the documents of a packed row apart

# Row 0: document 1 is tokens 0..9, document 2 tokens 10..23 (a chunk of 8 holds both); row 1: one
# document and 4 padding tokens.
PACKED = jnp.array([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)


def _packed_forwards():
    """name -> (config, params, tokens, segment_ids) -> loop_hidden [T, B, S, H]. The MELT two-pass
    forwards run the slot-cache sources (pass 1) and the earlier-and-own pattern (pass 2)."""

    def ouro(config, params, tokens, segment_ids):
        return OuroModel(config).apply({"params": _ouro_params(params)}, tokens, segment_ids=segment_ids).loop_hidden

    def melt_two_pass(config, params, tokens, segment_ids, alpha=None):
        return two_pass_forward(MeltModel(config), params, tokens, 8, alpha, segment_ids).loop_hidden

    return {
        "ouro": ouro,
        "melt-two-pass": melt_two_pass,
        "melt-two-pass-interpolated": lambda *a: melt_two_pass(*a, alpha=jnp.float32(0.4)),
    }


@pytest.mark.parametrize("name", list(_packed_forwards()))
def test_segment_ids_stop_attention_across_documents(tiny, name):
    """Changing document 1 of a row leaves document 2 and the other row as they were, with every
    implementation, and the implementations agree."""
    ouro_config, melt_config, params, tokens = tiny
    config = ouro_config if name == "ouro" else melt_config
    run = jax.jit(_packed_forwards()[name], static_argnums=0)
    changed = tokens.at[0, :10].set((tokens[0, :10] + 1) % config.vocab_size)  # document 1 of row 0
    second = slice(10, SEQ)
    hidden = {}
    for implementation, c in _each(config).items():
        before, after = run(c, params, tokens, PACKED), run(c, params, changed, PACKED)
        np.testing.assert_allclose(after[:, 0, second], before[:, 0, second], atol=1e-6)
        np.testing.assert_array_equal(after[:, 1], before[:, 1])  # the other row
        assert np.isfinite(np.asarray(before)).all()
        hidden[implementation] = before
    for implementation in ("blockwise", "splash", "pallas_gpu"):
        _assert_trees_close(hidden[implementation], hidden["xla"])
    # With one segment per row the change reaches document 2: the check can fail.
    one = jnp.ones_like(PACKED)
    leaked = run(config, params, changed, one)[:, 0, second] - run(config, params, tokens, one)[:, 0, second]
    assert float(jnp.max(jnp.abs(leaked))) > 1e-3
