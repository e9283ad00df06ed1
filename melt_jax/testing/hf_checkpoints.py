"""Tiny Ouro and MELT checkpoints in Hugging Face layout, written without the converter.

    tiny_hf_config(**overrides)                    an Ouro config.json dict
    random_ouro_state_dict(hf_config, seed, dtype) HF tensor name -> numpy array, random values
    write_hf_checkpoint(path, hf_config, state_dict, layout, dtype)
                                                   config.json + model.safetensors / shards / .bin
    gate_names(layer), random_melt_gates(hf_config, seed, scale, bias)
                                                   MELT's gate tensors under their HF names
    with_gates(params, hf_config, gates)           melt_jax Ouro params plus those gates
    random_ouro(seed, **config_fields)             (hf_config, state dict of torch tensors), needs torch

The tensor names and shapes here are written out from the Ouro checkpoint layout, independently of the
converter's table (convert/mapping.py), so tests that build checkpoints with them check that table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def _dtype_name(dtype) -> str:
    """'float32' / 'bfloat16' / 'float16' for a dtype name, numpy dtype or ml_dtypes type."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    return name


def tiny_hf_config(**overrides) -> dict:
    """An Ouro `config.json` dict of a tiny model; keyword arguments replace or add fields.

    Default: H=64, L=2, 4 query heads and 2 key/value heads (GQA), head_dim 16, I=96, V=128, T=4 loops,
    rope_theta 100 (small, so that positions matter over short prompts), float32 weights.
    """
    config = {
        "architectures": ["OuroForCausalLM"],
        "model_type": "ouro",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rope_theta": 100.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def ouro_tensor_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of every tensor of an Ouro checkpoint, in state-dict order."""
    H = hf_config["hidden_size"]
    N = hf_config["num_attention_heads"]
    K = hf_config.get("num_key_value_heads") or N
    D = hf_config.get("head_dim") or H // N
    I = hf_config["intermediate_size"]
    V = hf_config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(hf_config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (N * D, H),
                p + "self_attn.k_proj.weight": (K * D, H),
                p + "self_attn.v_proj.weight": (K * D, H),
                p + "self_attn.o_proj.weight": (H, N * D),
                p + "mlp.gate_proj.weight": (I, H),
                p + "mlp.up_proj.weight": (I, H),
                p + "mlp.down_proj.weight": (H, I),
                p + "input_layernorm.weight": (H,),
                p + "input_layernorm_2.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
                p + "post_attention_layernorm_2.weight": (H,),
            }
        )
    shapes["model.norm.weight"] = (H,)
    shapes["model.early_exit_gate.weight"] = (1, H)
    shapes["model.early_exit_gate.bias"] = (1,)
    if not hf_config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def random_ouro_state_dict(hf_config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights of an Ouro checkpoint of `hf_config`: HF name -> numpy array of `dtype`.

    Every tensor holds distinct random values: norm weights 1 + 0.1 * N(0, 1) (near one, never all
    ones), Linear weights N(0, 1) / sqrt(fan_in), embeddings N(0, 1), the exit-gate bias N(0, 1)
    (non-zero). `dtype` is a numpy dtype, ml_dtypes.bfloat16, or a name such as "bfloat16".
    """
    np_dtype = _DTYPES[_dtype_name(dtype)]
    rng = np.random.default_rng(seed)
    state_dict = {}
    for name, shape in ouro_tensor_shapes(hf_config).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight" or name == "model.early_exit_gate.bias":
            value = rng.standard_normal(shape)
        else:  # a Linear weight [out, in]
            value = rng.standard_normal(shape) / np.sqrt(shape[-1])
        state_dict[name] = value.astype(np.float32).astype(np_dtype)
    return state_dict


def _write_bin(file: Path, state_dict: dict[str, np.ndarray]) -> None:
    import torch

    tensors = {}
    for name, value in state_dict.items():
        if value.dtype == ml_dtypes.bfloat16:  # torch cannot take ml_dtypes arrays: pass the bits
            tensors[name] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(value.copy())
    torch.save(tensors, file)


def write_hf_checkpoint(
    path: str | os.PathLike,
    hf_config: dict,
    state_dict: dict[str, np.ndarray],
    layout: str = "safetensors",
    dtype=None,
    num_shards: int = 3,
) -> Path:
    """Writes a HF checkpoint folder: config.json plus the weights in `layout`; returns the folder.

    layout: "safetensors" (one model.safetensors), "sharded" (`num_shards` consecutive shards
    model-0000k-of-0000n.safetensors + model.safetensors.index.json) or "bin" (pytorch_model.bin,
    needs torch). With `dtype`, the tensors are cast to it and config.json's torch_dtype set to it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = dict(hf_config)
    if dtype is not None:
        name = _dtype_name(dtype)
        state_dict = {k: v.astype(_DTYPES[name]) for k, v in state_dict.items()}
        hf_config["torch_dtype"] = name
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    if layout == "safetensors":
        save_file(state_dict, path / "model.safetensors", metadata={"format": "pt"})
    elif layout == "sharded":
        names = list(state_dict)
        groups = [list(g) for g in np.array_split(np.array(names, dtype=object), num_shards)]
        weight_map = {}
        for k, group in enumerate(groups):
            file_name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: state_dict[n] for n in group}, path / file_name, metadata={"format": "pt"})
            weight_map.update({n: file_name for n in group})
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in state_dict.values()))},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    elif layout == "bin":
        _write_bin(path / "pytorch_model.bin", state_dict)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected 'safetensors', 'sharded' or 'bin'")
    return path


def gate_names(layer: int) -> tuple[str, str, str]:
    """(W_z, U_z, b_z) tensor names of layer `layer`."""
    p = f"model.layers.{layer}.kv_gate."
    return p + "w_z.weight", p + "u_z.weight", p + "b_z"


def random_melt_gates(hf_config: dict, seed: int = 0, scale: float = 0.1, bias: float = -1.0) -> dict[str, np.ndarray]:
    """Random MELT gate parameters for every layer of `hf_config`, float32 numpy:

    ``model.layers.{i}.kv_gate.w_z.weight`` [H, H] = scale * N(0, 1)
    ``model.layers.{i}.kv_gate.u_z.weight`` [H, H] = scale * N(0, 1)
    ``model.layers.{i}.kv_gate.b_z``        [H]    = bias (constant)

    Convention: z = sigmoid(u @ W_z + s_prev @ U_z + b_z) with u, s_prev row vectors [..., H] and
    W_z, U_z stored as [H_in, H_out] (used without a transpose)."""
    H = int(hf_config["hidden_size"])
    rng = np.random.default_rng(seed)
    gates = {}
    for i in range(int(hf_config["num_hidden_layers"])):
        w, u, b = gate_names(i)
        gates[w] = (scale * rng.standard_normal((H, H))).astype(np.float32)
        gates[u] = (scale * rng.standard_normal((H, H))).astype(np.float32)
        gates[b] = np.full((H,), bias, dtype=np.float32)
    return gates


def with_gates(params: dict, hf_config: dict, gates: dict[str, np.ndarray]) -> dict:
    """Ouro params plus MELT gates given under their HF names."""
    layers = range(hf_config["num_hidden_layers"])
    stacked = [np.stack([gates[gate_names(i)[j]] for i in layers]) for j in range(3)]
    params = dict(params)
    params["layers"] = dict(params["layers"], kv_gate=dict(zip(("w_z", "u_z", "b_z"), stacked)))
    return params


def random_ouro(seed: int = 0, **config_fields) -> tuple[dict, dict]:
    """A small random Ouro checkpoint: (hf_config dict, float32 state dict of torch tensors with HF
    names); `config_fields` override tiny_hf_config's defaults (MHA unless num_key_value_heads is
    given). Every tensor has distinct values (norm weights around 1, a non-zero gate bias)."""
    import torch

    config_fields.setdefault("num_key_value_heads", config_fields.get("num_attention_heads", 4))
    cfg = tiny_hf_config(**config_fields)
    sd = {k: torch.from_numpy(v) for k, v in random_ouro_state_dict(cfg, seed=seed).items()}
    return cfg, sd
