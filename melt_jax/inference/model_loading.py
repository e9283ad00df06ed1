"""Loading a model for inference from a checkpoint directory, and the tokenizer it carries."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax

from melt_jax.checkpoint import load_config, load_params
from melt_jax.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from melt_jax.errors import GenerationError
from melt_jax.model.attention import IMPLEMENTATIONS
from melt_jax.model.ouro import OuroModel
from melt_jax.model.params import with_layer_layout
from melt_jax.model.registry import model_for

Array = jax.Array


def load_model(
    path, dtype: str | None = None, int8: bool = False, attention: str | None = None
) -> tuple[OuroModel, dict]:
    """(model, params on the default device) of a melt_jax checkpoint directory, Ouro or MELT, in the
    layer layout of inference: the layers unrolled (`config.scan_layers` false; see
    melt_jax/model/ouro.py), so that decoding reads every weight in place. With `int8`, the matmul
    weights are int8 with per-channel scales and the activations run in `dtype` (see
    melt_jax.inference.quantization). `attention`: how attention is computed (`config.attention`,
    one of melt_jax.model.attention.IMPLEMENTATIONS; None: the config's, dense "xla"; on a GPU or TPU
    "auto" prefills long prompts through the chip's kernel). CheckpointError / ConfigError name what
    is wrong with the directory or the choice."""
    if not isinstance(int8, bool):
        raise GenerationError(f"int8 must be true or false, got {int8!r}")
    config, params = load_params(path, dtype)
    if attention is not None:
        config = config.replace(attention=attention)
    model, params = with_layer_layout(model_for(config), params, scan_layers=False)
    params = jax.device_put(params)
    if int8:
        from melt_jax.inference.quantization import quantize_int8  # qwix only where int8 is asked for

        model, params = quantize_int8(model, params)
    return model, params


def checkpoint_tokenizer(path, tokenizer: str | None = None) -> Tokenizer:
    """The tokenizer `tokenizer` ('byte', or a tokenizer.json file or its folder); None: the
    tokenizer.json that the checkpoint directory `path` carries (melt-convert copies it from the
    Hugging Face folder). GenerationError when there is none; CheckpointError for a bad `path`."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    load_config(path)  # a missing or malformed checkpoint is named as such
    if not (Path(path) / TOKENIZER_FILE).is_file():
        raise GenerationError(
            f"no tokenizer given and the checkpoint {path} has no {TOKENIZER_FILE}: pass --tokenizer "
            "('byte', or a tokenizer.json file or its folder), or convert the checkpoint from a Hugging Face "
            "folder that holds one"
        )
    return load_tokenizer(os.fspath(path))


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that loads a model with `load_model` and `checkpoint_tokenizer`:
    --checkpoint, --tokenizer, --dtype and --attention."""
    parser.add_argument("--checkpoint", required=True, help="melt_jax checkpoint directory (Ouro or MELT)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="'byte', or a tokenizer.json file or its folder (default: the tokenizer.json in --checkpoint)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="cast the weights")
    parser.add_argument(
        "--attention",
        choices=IMPLEMENTATIONS,
        default=None,
        help="how attention is computed (default: the checkpoint's config, dense xla); "
        "auto on a GPU or TPU: the chip's kernel for long prompts",
    )
