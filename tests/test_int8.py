"""Weight-only int8 decoding (melt_jax/inference/quantization.py) on the tiny Ouro and MELT models of
generation_fixtures: the params really are int8 with per-channel scales, the int8 model computes
exactly the float model with the rounded weights, the rounding error obeys its bound, decoding runs
and reads ~1/4 of the float32 weight bytes, and the options (Python, melt-generate --int8, the
lm-eval adapter's int8=true) work and refuse bad combinations by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_fixtures import tiny_model

import melt_jax.model.attention.implementation as implementation
from melt_jax.checkpoint import save_params
from melt_jax.data import ByteTokenizer
from melt_jax.errors import GenerationError
from melt_jax.inference import SamplingConfig, check_params, cli_generate, decode_step, generate, load_model
from melt_jax.inference.quantization import int8_model, is_int8_model, quantize_int8
from melt_jax.model import (
    OuroConfig,
    OuroModel,
    abstract_params,
    is_int8_params,
    param_bytes,
    stack_layers,
    with_layer_layout,
)

KINDS = ["ouro", "melt"]
PROMPTS = [[5, 9, 2, 7, 1], [3, 8, 200, 17]]


@pytest.fixture(scope="module", params=KINDS)
def pairs(request):
    """(float (model, params) unrolled, int8 (model, params)) of the tiny 'ouro' or 'melt' model."""
    model, params = tiny_model(request.param)
    float_pair = with_layer_layout(model, jax.tree.map(jnp.asarray, params), scan_layers=False)
    return float_pair, quantize_int8(model, params)


def _int8_weights(params) -> dict[str, tuple]:
    """'/'-path -> (qvalue, scale) of every int8 weight of a param tree."""
    found = {}

    def visit(tree, path):
        if isinstance(tree, dict):
            for key, value in tree.items():
                visit(value, f"{path}/{key}" if path else key)
        elif hasattr(tree, "array") and hasattr(tree.array, "qvalue"):
            found[path] = (np.asarray(tree.array.qvalue), np.asarray(tree.array.scale))

    visit(params, "")
    return found


def _float_weight(params, path: str) -> np.ndarray:
    for key in path.split("/"):
        params = params[key]
    return np.asarray(params)


def _dequantized(int8_params, float_params):
    """The float params with every int8 weight replaced by scale * qvalue (in its stored shape)."""
    out = jax.tree.map(np.asarray, float_params)
    for path, (qvalue, scale) in _int8_weights(int8_params).items():
        *parents, name = path.split("/")
        node = out
        for key in parents:
            node = node[key]
        node[name] = (qvalue.astype(np.float32) * scale).reshape(node[name].shape)
    return out


def _tokens(vocab_size: int, shape=(4, 24), seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab_size, shape), jnp.int32)


def test_every_matmul_weight_is_int8_with_float32_scales_per_output_channel(pairs):
    (model, params), (_, int8_params) = pairs
    weights = _int8_weights(int8_params)
    c = model.config
    matmuls = {"attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj"}
    matmuls |= {"mlp/down_proj"}
    want = {f"layers_{i}/{name}/kernel" for i in range(c.num_layers) for name in matmuls} | {"lm_head/kernel"}
    if c.model_type == "melt":
        want |= {f"layers_{i}/kv_gate/{name}" for i in range(c.num_layers) for name in ("w_z", "u_z")}
    assert set(weights) == want
    for path, (qvalue, scale) in weights.items():
        assert qvalue.dtype == np.int8 and scale.dtype == np.float32, path
        # One scale per output channel: the contracted input axis has size 1 in the scale.
        assert scale.shape[0] == 1 and scale.shape[1:] == qvalue.shape[1:], (path, scale.shape, qvalue.shape)
    # Everything else is kept as it was.
    assert int8_params["embedder"]["embedding"].dtype == jnp.float32
    assert is_int8_params(int8_params) and not is_int8_params(params)


def test_param_bytes_are_int8_plus_scales(pairs):
    (_, params), (_, int8_params) = pairs
    weights = _int8_weights(int8_params)
    int8_bytes = sum(q.size + 4 * s.size for q, s in weights.values())
    float_bytes = sum(4 * _float_weight(params, path).size for path in weights)
    assert param_bytes(int8_params) == param_bytes(params) - float_bytes + int8_bytes
    assert int8_bytes < 0.3 * float_bytes


def test_rounding_is_absmax_per_channel_within_half_a_step(pairs):
    """s_j = max_i |W_ij| / 127.5 and |W_ij - s_j q_ij| <= s_j / 2 (see the module docstring)."""
    (_, params), (_, int8_params) = pairs
    for path, (qvalue, scale) in _int8_weights(int8_params).items():
        weight = _float_weight(params, path).reshape(qvalue.shape)
        absmax = np.abs(weight).max(axis=0, keepdims=True)
        np.testing.assert_allclose(scale, absmax / 127.5, rtol=1e-6, err_msg=path)
        assert np.all(np.abs(qvalue.astype(np.int32)).max(axis=0) >= 127), path  # the outermost bucket is used
        error = np.abs(weight - qvalue * scale)
        # Half a step, and float32's rounding of W / s near 128 (~128 * 2^-23 steps).
        assert np.all(error <= scale * (0.5 + 1e-4)), path


def test_int8_model_computes_the_float_model_with_rounded_weights(pairs):
    """Every loop's logits and exit distribution: the int8 path is the float model on s * q, nothing else."""
    (model, params), (int8, int8_params) = pairs
    tokens = _tokens(model.config.vocab_size)
    got = int8.apply({"params": int8_params}, tokens, return_loop_logits=True)
    want = model.apply({"params": _dequantized(int8_params, params)}, tokens, return_loop_logits=True)
    np.testing.assert_allclose(got.loop_logits, want.loop_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.exit_pdf, want.exit_pdf, rtol=1e-4, atol=1e-5)


def test_lm_head_error_is_bounded_by_the_weight_scale(pairs):
    """On the same hidden states h, logit v of the int8 LM head is off by at most s_v / 2 * sum |h|."""
    (model, params), (int8, int8_params) = pairs
    hidden = model.apply({"params": params}, _tokens(model.config.vocab_size), exit_policy=None).loop_hidden
    want = model.apply({"params": params}, hidden, method="logits")  # [T, B, S, V]
    got = int8.apply({"params": int8_params}, hidden, method="logits")
    _, scale = _int8_weights(int8_params)["lm_head/kernel"]  # [1, V]
    bound = scale[0] / 2 * np.abs(np.asarray(hidden)).sum(-1, keepdims=True)  # [T, B, S, V]
    error = np.abs(np.asarray(got) - np.asarray(want))
    assert np.all(error <= bound * (1 + 1e-4) + 1e-5)
    assert error.max() > 0.05 * bound.max()  # the bound is not vacuous here


def test_int8_logits_agree_with_float_at_every_loop(pairs):
    """Top-1 agreement and KL(float || int8) per loop on 96 positions. Each weight moves by at most half
    a step (<= 0.4% of its channel's largest entry), which moves a projection's output by ~0.5% of its
    size; the tiny models' noisy random weights (0.3 N(0, 1) on H=32) amplify that from loop to loop,
    measured top-1 0.93-0.98 at the first loop and >= 0.80 at the last over token seeds 0-2."""
    (model, params), (int8, int8_params) = pairs
    tokens = _tokens(model.config.vocab_size)
    want = model.apply({"params": params}, tokens, return_loop_logits=True).loop_logits  # [T, B, S, V]
    got = int8.apply({"params": int8_params}, tokens, return_loop_logits=True).loop_logits
    top1 = np.mean(np.asarray(want.argmax(-1) == got.argmax(-1)), axis=(1, 2))  # [T]
    p, q = jax.nn.log_softmax(want), jax.nn.log_softmax(got)
    kl = np.asarray(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1), axis=(1, 2)))  # [T]
    assert top1[0] >= 0.9 and top1.min() >= 0.75, top1
    assert kl[0] <= 0.005 and kl.max() <= 0.1, kl


def test_int8_generation_is_float_generation_on_the_rounded_weights(pairs):
    """Ouro and MELT decoding (prefill, then the jitted decode loop) run on int8 params and give the
    tokens of the float model with the rounded weights."""
    (model, params), (int8, int8_params) = pairs
    sampling = SamplingConfig(max_new_tokens=8)
    got = generate(int8, int8_params, PROMPTS, sampling)
    want = generate(model, _dequantized(int8_params, params), PROMPTS, sampling)
    assert got.tokens == want.tokens and got.timing.decode_tokens > 0


def test_int8_traced_for_a_gpu_scales_the_product_of_the_int8_values(pairs, monkeypatch):
    """Traced for a GPU (melt_jax.model.layers.weight_einsum), each int8 matmul multiplies the int8
    values, converted, and scales its float32 output: the logits of the dequantize-first product on
    the CPU (to float32 rounding), at batch 1 and 4 (one row multiplied as two at batch 1), and no
    int8 weight is multiplied by its scales before a product."""
    (_, _), (int8, int8_params) = pairs
    for batch in (1, 4):
        tokens = _tokens(int8.config.vocab_size, shape=(batch, 1), seed=batch)
        want = int8.apply({"params": int8_params}, tokens, return_loop_logits=True).loop_logits
        with monkeypatch.context() as patch:
            patch.setattr(implementation, "target_platform", lambda: "gpu")
            run = lambda p, t: int8.apply({"params": p}, t, return_loop_logits=True).loop_logits  # noqa: E731
            got = jax.jit(run)(int8_params, tokens)
            jaxpr = str(jax.make_jaxpr(run)(int8_params, tokens))
        # Float32 rounding of (x q) s against x (q s), carried through the loops: up to 1.4e-5 seen.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-5)
    scale_shapes = {f"f32[{','.join(map(str, q.shape))}]" for q, _ in _int8_weights(int8_params).values()}
    for line in jaxpr.splitlines():
        assert not (" = mul " in line and line.strip().split(":")[1].split(" ")[0] in scale_shapes), line


def _decode_step_arguments(model, params) -> tuple[int, int]:
    """(argument bytes of the compiled decode step, of which the cache and token)."""
    cache = jax.eval_shape(lambda: model.init_cache(1, 32))
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    compiled = decode_step.lower(model, params, token, cache).compile()
    return compiled.memory_analysis().argument_size_in_bytes, param_bytes(cache) + 4


def test_the_compiled_decode_step_takes_int8_weights():
    """A decode step's arguments are the params as stored: with H = 256 and I = 1024 the matmul weights
    dominate, and the int8 step's params are 0.26x float32's (1 byte per weight plus a float32 scale
    per output channel, the embedding and norms still float32)."""
    config = OuroConfig(
        vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        total_ut_steps=2, tie_word_embeddings=True, scan_layers=False,
    )  # fmt: skip
    model = OuroModel(config)
    float_params = abstract_params(model)
    quantized = int8_model(model)
    int8_params = abstract_params(quantized)
    float_args, rest = _decode_step_arguments(model, float_params)
    int8_args, int8_rest = _decode_step_arguments(quantized, int8_params)
    # The weights that are read differ by the int8 bytes saved (an unread param, here the exit gate
    # under the 'last' exit policy, is no argument of the compiled step).
    assert float_args - int8_args == param_bytes(float_params) - param_bytes(int8_params)
    assert float_args - rest <= param_bytes(float_params) and rest == int8_rest
    assert (int8_args - rest) / (float_args - rest) < 0.3


# --------------------------------------------------------------------------------------------------
# The options and their errors


def test_bad_combinations_are_refused_by_name(pairs):
    (model, params), (int8, int8_params) = pairs
    with pytest.raises(GenerationError, match="already int8"):
        quantize_int8(int8, int8_params)
    with pytest.raises(GenerationError, match="already int8"):
        quantize_int8(model, int8_params)
    with pytest.raises(GenerationError, match="params are int8 but the model is float"):
        check_params(model, int8_params)
    with pytest.raises(GenerationError, match="model is int8 but its params are float"):
        generate(int8, params, PROMPTS, SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="int8 params exist only in the unrolled layout"):
        stack_layers(int8_params)
    with pytest.raises(ValueError, match="int8 params exist only in the unrolled layout"):
        save_params("/nonexistent/never-written", int8.config, int8_params)
    with pytest.raises(GenerationError, match="params do not match"):
        quantize_int8(model, {**params, "lm_head": {}})


def test_scanned_params_are_unrolled_before_quantizing():
    model, params = tiny_model("ouro")
    assert model.config.scan_layers
    int8, int8_params = quantize_int8(model, params)
    assert is_int8_model(int8) and not int8.config.scan_layers and "layers_0" in int8_params
    assert not is_int8_model(model)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "ouro"
    model, params = tiny_model("ouro")
    save_params(path, model.config, params)
    return path


def test_load_model_int8(checkpoint):
    model, params = load_model(checkpoint, int8=True)
    assert is_int8_model(model) and is_int8_params(params)
    check_params(model, params)
    with pytest.raises(GenerationError, match="int8 must be true or false"):
        load_model(checkpoint, int8="yes")


def test_melt_generate_int8_end_to_end(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--tokenizer", "byte", "--max-new-tokens", "8", "--prompt", "k=3,q?"]
    assert cli_generate.main([*args, "--int8"]) == 0
    out, err = capsys.readouterr()
    model, params = quantize_int8(*tiny_model("ouro"))
    tokens = generate(model, params, [list(b"k=3,q?")], SamplingConfig(max_new_tokens=8)).tokens[0]
    assert out == ByteTokenizer().decode(tokens, skip_special_tokens=False) + "\n"
    assert "int8 weights: params" in err and "tokens/s" in err


def test_lm_eval_adapter_int8_model_argument(checkpoint):
    lm_eval_adapter = pytest.importorskip("melt_jax.inference.lm_eval_adapter")
    from lm_eval.api.instance import Instance

    lm = lm_eval_adapter.MeltJaxLM(str(checkpoint), tokenizer="byte", batch_size=2, int8="true")
    assert is_int8_model(lm.model) and is_int8_params(lm.params)
    # Scoring runs the int8 model's forward and LM head: the same scores as the pair quantized in memory.
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=("x=3;y=", "4"), idx=0)]
    pair = quantize_int8(*tiny_model("ouro"))
    in_memory = lm_eval_adapter.MeltJaxLM.from_model(*pair, ByteTokenizer(), batch_size=2)
    np.testing.assert_allclose(lm.loglikelihood(requests), in_memory.loglikelihood(requests), rtol=1e-5)
    assert not is_int8_model(lm_eval_adapter.MeltJaxLM(str(checkpoint), batch_size=2, int8=False).model)
    with pytest.raises(GenerationError, match="model argument int8 must be true or false"):
        lm_eval_adapter.MeltJaxLM(str(checkpoint), int8="maybe")
