"""Weight-only int8 for decoding: the weights of the matmuls stored as int8 with one float32 scale per
output channel, dequantized inside each matmul (qwix's post-training quantization, PTQ).

    model, params = load_model(CKPT, int8=True)     # or, on a (model, params) already loaded:
    model, params = quantize_int8(model, params)    # once, like with_layer_layout
    generate(model, params, prompts, sampling)      # the sampler, evaluation, lm-eval: unchanged

A transformation of (model, params) done once at load, as Gemma's and MaxText's quantized inference
do it: the returned model is the same OuroModel / MeltModel with its matmuls routed through qwix, and
the returned params hold int8 values and scales in place of those weights. Everything that takes
(model, params) runs on the pair as it is. Checkpoints keep float weights: int8 is not a storage
format here, and int8 params cannot be stacked back into the scanned layout of training and saving.

What is int8: every weight that a decode step reads at every loop (attention q/k/v/o, MLP
gate/up/down, MELT's element-wise gate w_z and u_z), and the LM head when it is not tied to the
embedding. What stays float: the embedding table (a decode step reads B of its rows; when tied it is
also the LM head, kept float), the RMSNorm scales, the exit gate [H, 1] and MELT's b_z: together a
small part of the bytes a step reads.

Rounding (qwix's "absmax" calibration, per channel): for a weight W contracted over its input axes i,
each output channel j (the axes the einsum does not contract) gets

    s_j = max_i |W_ij| / 127.5,   q_ij = round(W_ij / s_j) in [-128, 127],   W_ij ~ s_j q_ij

(127.5: the largest entry falls on the edge of the outermost bucket, +127 or -128, so every bucket
is used) so |W_ij - s_j q_ij| <= s_j / 2, and one matmul's output y_j = sum_i x_i W_ij is off by at most
(s_j / 2) sum_i |x_i|. Scales are computed from the weights in float32 whatever their dtype, and
kept in float32 ([1, ..., out] per weight: a fraction 1 / (input size) of the int8 bytes).

Compute: the matmul dequantizes the int8 weight to the activation dtype (config.dtype) and multiplies
in that dtype, so int8 changes what is read (1 byte per weight instead of 2 or 4), not the precision
of the arithmetic. XLA on TPU fuses the dequantization into the matmul's reads; XLA's CPU backend
writes the dequantized matrix first (see benchmarks/int8_decode.py for what that costs). A program
traced for a GPU's inference multiplies the int8 values and scales the product instead
(melt_jax.model.layers.weight_einsum), which XLA's GPU compiler reads as int8 inside the matrix kernel.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from melt_jax.errors import GenerationError
from melt_jax.inference.param_check import check_params
from melt_jax.model.params import abstract_params, is_int8_params, with_layer_layout

try:
    import qwix
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("int8 weights need qwix: pip install 'melt-jax[int8]' (qwix==0.1.8)") from e

Params = dict

# Module paths (the last name: the module holding the weight) whose einsums read int8 weights.
INT8_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "kv_gate", "lm_head")
INT8_RULE = qwix.QuantizationRule(module_path=r"(.*/)?(" + "|".join(INT8_MODULES) + ")", weight_qtype="int8")
# The model methods that `apply` calls in inference: the forward, and the LM head on hidden states.
INT8_METHODS = ("__call__", "logits")


def is_int8_model(model: nn.Module) -> bool:
    """Whether `model` is a model returned by `quantize_int8` (its matmuls read int8 weights)."""
    return hasattr(type(model), "_unquantized_type")  # the mark qwix.quantize_model leaves on the class


@functools.cache
def int8_model(model: nn.Module) -> nn.Module:
    """The int8 model of a float model in the unrolled layout: the same module, its einsums in
    INT8_MODULES reading int8 weights; `abstract_params` of it gives the shapes of its int8 params.
    One int8 model per float model (equal float models give the same one), so that the programs
    compiled for it serve every pair quantized from that model."""
    if model.config.scan_layers:
        raise GenerationError("int8 models have the unrolled layer layout: convert with with_layer_layout first")
    return qwix.quantize_model(model, qwix.PtqProvider([INT8_RULE]), methods=INT8_METHODS)


def quantize_int8(model: nn.Module, params: Params) -> tuple[nn.Module, Params]:
    """(int8 model, int8 params) of a float (model, params) pair, Ouro or MELT, in the unrolled layer
    layout of decoding (converted from the scanned one if needed, see melt_jax/model/params.py).

    The params hold, for each int8 weight, qwix's WithAux(array=QArray(qvalue=int8 [compute shape],
    scale=float32 [1, ..., out])) in place of the float array (o_proj's [N, D, H] kernel is stored as
    the [N*D, H] matrix its einsum reads); the other params are those given. The model runs its activations
    in its config's dtype. GenerationError if the pair is already int8 or the params do not fit the model.
    """
    if is_int8_model(model) or is_int8_params(params):
        raise GenerationError("the model or its params are already int8: quantize the float (model, params) once")
    check_params(model, params)
    model, params = with_layer_layout(model, params, scan_layers=False)
    quantized = int8_model(model)
    target = abstract_params(quantized)  # the int8 tree: qwix records there how each weight is rounded

    def as_float32(weight, int8_weight):
        # Rounded from float32 values whatever the weights' dtype; the other params keep theirs.
        # `int8_weight`: the weight's subtree of the int8 tree (qwix's arrays, or the float leaf).
        return jnp.asarray(weight, jnp.float32) if is_int8_params(int8_weight) else weight

    @jax.jit
    def quantize(params):
        return qwix.quantize_params(jax.tree.map(as_float32, params, target), target)

    int8_params = quantize(params)
    return quantized, int8_params
