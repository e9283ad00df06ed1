"""Tests of the checkpoint converter (convert/) and of melt_jax.checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from melt_jax import checkpoint
from melt_jax.checkpoint import CheckpointError, load_params, save_params
from melt_jax.convert import ConversionError, hf_export, load_hf_checkpoint, save_hf_checkpoint
from melt_jax.convert.cli import main, parse_size
from melt_jax.convert.mapping import OURO_RULES, hf_tensor_plan, param_shapes
from melt_jax.model import OuroConfig, OuroModel, abstract_params, param_paths, params_from_paths
from melt_jax.model.config import ConfigError
from melt_jax.testing.hf_checkpoints import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint

GOLDEN_DIR = Path(__file__).parent / "data" / "ouro-tiny"
BF16 = np.dtype(ml_dtypes.bfloat16)


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of `a` (so that comparisons are bit-exact, -0.0 and NaN included)."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def assert_same_params(a: dict, b: dict) -> None:
    fa, fb = param_paths(a), param_paths(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        x, y = np.asarray(fa[name]), np.asarray(fb[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=name)


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(bits(a[name]), bits(b[name]), err_msg=name)


def read_hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of the safetensors files of a HF folder, read with the safetensors library."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def leftovers(dest: Path) -> list[str]:
    """Temporary siblings of `dest` that a failed write left behind."""
    return [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]


@pytest.fixture(scope="module")
def hf_config() -> dict:
    return tiny_hf_config()


@pytest.fixture(scope="module")
def state_dict(hf_config) -> dict[str, np.ndarray]:
    return random_ouro_state_dict(hf_config, seed=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_config, state_dict) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", hf_config, state_dict)


@pytest.fixture(scope="module")
def imported(hf_dir):
    return load_hf_checkpoint(hf_dir)


# --------------------------------------------------------------------------------------------------
# The mapping table


def test_table_rows_preserve_element_counts_and_invert(hf_config):
    config = OuroConfig.from_hf_config(hf_config)
    rng = np.random.default_rng(0)
    for rule in OURO_RULES:
        hf_shape, slice_shape = rule.hf_tensor_shape(config), rule.slice_shape(config)
        assert math.prod(hf_shape) == math.prod(slice_shape), rule.param
        x = rng.standard_normal(hf_shape).astype(np.float32)
        np.testing.assert_array_equal(rule.to_hf(rule.to_param(x, config), config), x)


@pytest.mark.parametrize("preset, count", [("ouro-1.4b", 1_434_652_673), ("ouro-2.6b", 2_667_974_657)])
def test_table_parameter_counts_of_real_models(preset, count):
    shapes = param_shapes(OuroConfig.preset(preset))
    assert sum(math.prod(s) for s in shapes.values()) == count


@pytest.mark.parametrize("tied", [False, True])
def test_table_matches_the_model_params(tied):
    config = OuroConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=tied))
    abstract = abstract_params(OuroModel(config))
    assert {k: tuple(v.shape) for k, v in param_paths(abstract).items()} == param_shapes(config)


def test_plan_order_and_names(hf_config):
    config = OuroConfig.from_hf_config(hf_config)
    names = [t.name for t in hf_tensor_plan(config)]
    assert names[0] == "model.embed_tokens.weight"
    assert names[1] == "model.layers.0.self_attn.q_proj.weight"
    assert names[-1] == "lm_head.weight"
    assert len(names) == len(set(names)) == 1 + 11 * 2 + 4
    tied = OuroConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=True))
    assert "lm_head.weight" not in [t.name for t in hf_tensor_plan(tied)]


# --------------------------------------------------------------------------------------------------
# Import


def test_import_shapes_dtypes_and_config(imported, hf_config):
    config, params = imported
    assert config.param_dtype == config.dtype == "float32"
    assert config.num_key_value_heads == 2 and config.rope_theta == 100.0
    L, H, N, K, D, I, V = 2, 64, 4, 2, 16, 96, 128
    expected = {
        "embedder/embedding": (V, H),
        "layers/attn/q_proj/kernel": (L, H, N, D),
        "layers/attn/k_proj/kernel": (L, H, K, D),
        "layers/attn/v_proj/kernel": (L, H, K, D),
        "layers/attn/o_proj/kernel": (L, N, D, H),
        "layers/mlp/gate_proj/kernel": (L, H, I),
        "layers/mlp/up_proj/kernel": (L, H, I),
        "layers/mlp/down_proj/kernel": (L, I, H),
        "layers/attn_in_norm/scale": (L, H),
        "layers/attn_out_norm/scale": (L, H),
        "layers/mlp_in_norm/scale": (L, H),
        "layers/mlp_out_norm/scale": (L, H),
        "final_norm/scale": (H,),
        "exit_gate/kernel": (H, 1),
        "exit_gate/bias": (1,),
        "lm_head/kernel": (H, V),
    }
    flat = param_paths(params)
    assert {k: v.shape for k, v in flat.items()} == expected
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in flat.values())


def test_import_values_follow_the_spec(imported, state_dict):
    _, params = imported
    sd, D = state_dict, 16
    attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
    np.testing.assert_array_equal(params["embedder"]["embedding"], sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        wq, wk, wv, wo = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkvo")
        for h in range(4):  # query heads
            np.testing.assert_array_equal(attn["q_proj"]["kernel"][i, :, h, :], wq[h * D : (h + 1) * D, :].T)
            np.testing.assert_array_equal(attn["o_proj"]["kernel"][i, h, :, :], wo[:, h * D : (h + 1) * D].T)
        for h in range(2):  # key/value heads
            np.testing.assert_array_equal(attn["k_proj"]["kernel"][i, :, h, :], wk[h * D : (h + 1) * D, :].T)
            np.testing.assert_array_equal(attn["v_proj"]["kernel"][i, :, h, :], wv[h * D : (h + 1) * D, :].T)
        for n in ("gate", "up", "down"):
            np.testing.assert_array_equal(mlp[f"{n}_proj"]["kernel"][i], sd[p + f"mlp.{n}_proj.weight"].T)
        for param, hf in (
            ("attn_in_norm", "input_layernorm"),
            ("attn_out_norm", "input_layernorm_2"),
            ("mlp_in_norm", "post_attention_layernorm"),
            ("mlp_out_norm", "post_attention_layernorm_2"),
        ):
            np.testing.assert_array_equal(params["layers"][param]["scale"][i], sd[p + hf + ".weight"])
    np.testing.assert_array_equal(params["final_norm"]["scale"], sd["model.norm.weight"])
    np.testing.assert_array_equal(params["exit_gate"]["kernel"], sd["model.early_exit_gate.weight"].T)
    np.testing.assert_array_equal(params["exit_gate"]["bias"], sd["model.early_exit_gate.bias"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)


def test_fixture_values_are_distinct(state_dict):
    norm = state_dict["model.layers.0.input_layernorm.weight"]
    assert not np.all(norm == 1) and abs(norm.mean() - 1) < 0.1
    assert state_dict["model.early_exit_gate.bias"][0] != 0
    values = [v.tobytes() for v in state_dict.values()]
    assert len(set(values)) == len(values)


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_every_layout_imports_the_same(tmp_path, hf_config, state_dict, imported, layout):
    folder = write_hf_checkpoint(tmp_path / layout, hf_config, state_dict, layout)
    config, params = load_hf_checkpoint(folder)
    assert config == imported[0]
    assert_same_params(params, imported[1])


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_bf16_source_imports_to_fp32_and_bf16(tmp_path, hf_config, state_dict, layout):
    folder = write_hf_checkpoint(tmp_path / "hf", hf_config, state_dict, layout, dtype="bfloat16")
    _, p32 = load_hf_checkpoint(folder, "float32")
    config, p16 = load_hf_checkpoint(folder, "bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    assert param_paths(p16)["layers/mlp/up_proj/kernel"].dtype == BF16
    # fp32 holds bf16 exactly: casting the fp32 import down gives the bf16 import.
    assert_same_params({k: v.astype(BF16) for k, v in param_paths(p32).items()}, param_paths(p16))
    np.testing.assert_array_equal(
        bits(p16["embedder"]["embedding"]), bits(state_dict["model.embed_tokens.weight"].astype(BF16))
    )


def test_import_cast_fp32_to_bf16_rounds_like_ml_dtypes(hf_dir, state_dict):
    _, params = load_hf_checkpoint(hf_dir, "bfloat16")
    np.testing.assert_array_equal(bits(params["lm_head"]["kernel"]), bits(state_dict["lm_head.weight"].astype(BF16).T))


def test_tied_embeddings(tmp_path):
    cfg = tiny_hf_config(tie_word_embeddings=True)
    sd = random_ouro_state_dict(cfg)
    config, params = load_hf_checkpoint(write_hf_checkpoint(tmp_path / "hf", cfg, sd))
    assert "lm_head" not in params
    save_hf_checkpoint(config, params, tmp_path / "out")
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), sd)
    # A checkpoint that also stores the tied lm_head.weight (as pytorch_model.bin exports do) imports.
    sd_with_head = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]})
    _, params2 = load_hf_checkpoint(write_hf_checkpoint(tmp_path / "bin", cfg, sd_with_head, "bin"))
    assert_same_params(params, params2)


def test_sharded_bin_imports(tmp_path, hf_config, state_dict, imported):
    import torch

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))
    names = list(state_dict)
    shards = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for file_name, group in shards.items():
        torch.save({n: torch.from_numpy(state_dict[n].copy()) for n in group}, folder / file_name)
    weight_map = {n: f for f, group in shards.items() for n in group}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, params = load_hf_checkpoint(folder)
    assert_same_params(params, imported[1])


def test_rotary_buffers_are_ignored(tmp_path, hf_config, state_dict, imported):
    sd = dict(state_dict, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    _, params = load_hf_checkpoint(write_hf_checkpoint(tmp_path / "hf", hf_config, sd, "bin"))
    assert_same_params(params, imported[1])


@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason="golden checkpoint tests/data/ouro-tiny not present")
def test_golden_checkpoint(tmp_path):
    config, params = load_hf_checkpoint(GOLDEN_DIR)
    flat = param_paths(params)
    assert {k: v.shape for k, v in flat.items()} == param_shapes(config)
    source = read_hf_tensors(GOLDEN_DIR)
    np.testing.assert_array_equal(
        flat["layers/mlp/down_proj/kernel"][1], source["model.layers.1.mlp.down_proj.weight"].T
    )
    save_hf_checkpoint(config, params, tmp_path / "out")
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), source)


# --------------------------------------------------------------------------------------------------
# Export


def test_export_then_import_is_bit_exact(tmp_path, imported, state_dict):
    config, params = imported
    files = save_hf_checkpoint(config, params, tmp_path / "out")
    assert files == ["config.json", "model.safetensors"]
    # Readable by the safetensors library, with the metadata transformers requires.
    with safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), state_dict)
    config2, params2 = load_hf_checkpoint(tmp_path / "out")
    assert config2 == config
    assert_same_params(params2, params)


def test_export_config_json_round_trips(tmp_path, imported, hf_config):
    config, params = imported
    save_hf_checkpoint(config, params, tmp_path / "out", dtype="bfloat16")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16"
    for key, value in hf_config.items():
        if key != "torch_dtype":
            assert written[key] == value, key


def test_bf16_to_fp32_to_bf16_is_bit_exact(tmp_path, hf_config, state_dict):
    src = write_hf_checkpoint(tmp_path / "src", hf_config, state_dict, dtype="bfloat16")
    config, params = load_hf_checkpoint(src, "float32")
    save_hf_checkpoint(config, params, tmp_path / "out")  # default dtype: torch_dtype = bfloat16
    exported = read_hf_tensors(tmp_path / "out")
    assert all(v.dtype == BF16 for v in exported.values())
    assert_same_tensors(exported, read_hf_tensors(src))


def test_sharded_export(tmp_path, imported, state_dict):
    config, params = imported
    files = save_hf_checkpoint(config, params, tmp_path / "out", max_shard_bytes=60_000)
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert files == ["config.json"] + [s.name for s in shards] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state_dict.values())
    assert sorted(index["weight_map"]) == sorted(state_dict)
    for shard in shards:
        tensors = load_file(shard)
        assert sum(v.nbytes for v in tensors.values()) <= 60_000 or len(tensors) == 1
        assert all(index["weight_map"][name] == shard.name for name in tensors)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), state_dict)
    _, params2 = load_hf_checkpoint(tmp_path / "out")
    assert_same_params(params2, params)


def test_export_of_jax_arrays(tmp_path, imported, state_dict):
    config, params = imported
    jax_params = {k: jnp.asarray(v) for k, v in param_paths(params).items()}
    save_hf_checkpoint(config, params_from_paths(jax_params), tmp_path / "out")
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), state_dict)


def test_export_failure_midway_leaves_nothing(tmp_path, imported, monkeypatch):
    config, params = imported
    calls = []
    original = hf_export.write_safetensors

    def fail_on_second_shard(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        original(path, *args, **kwargs)

    monkeypatch.setattr(hf_export, "write_safetensors", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(config, params, tmp_path / "out", max_shard_bytes=60_000)
    assert len(calls) == 2
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# melt_jax.checkpoint (orbax)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_bit_exact(tmp_path, hf_dir, dtype):
    config, params = load_hf_checkpoint(hf_dir, dtype)
    save_params(tmp_path / "ckpt", config, params)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "melt_jax.json", "params"]
    config2, params2 = load_params(tmp_path / "ckpt")
    assert config2 == config and config2.param_dtype == config2.dtype == dtype
    assert_same_params(params2, params)
    assert all(isinstance(v, np.ndarray) for v in param_paths(params2).values())


def test_orbax_load_with_cast_and_jax_arrays(tmp_path, imported):
    config, params = imported
    jax_params = {"embedder": {"embedding": jnp.asarray(params["embedder"]["embedding"])}}
    save_params(tmp_path / "ckpt", config, jax_params)
    _, restored = load_params(tmp_path / "ckpt")
    assert_same_params(restored, {"embedder": {"embedding": params["embedder"]["embedding"]}})
    config16, restored16 = load_params(tmp_path / "ckpt", dtype="bfloat16")
    assert config16.param_dtype == config16.dtype == "bfloat16"
    np.testing.assert_array_equal(
        bits(restored16["embedder"]["embedding"]), bits(params["embedder"]["embedding"].astype(BF16))
    )


def test_save_params_overwrites_when_asked(tmp_path, imported):
    config, params = imported
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    save_params(dest, config, params, overwrite=True)
    assert "keep.txt" not in os.listdir(dest) and not leftovers(dest)
    assert_same_params(load_params(dest)[1], params)


def test_save_params_failure_leaves_nothing(tmp_path, imported, monkeypatch):
    config, params = imported

    def fail(path, tree):
        Path(path).mkdir()
        raise RuntimeError("interrupted")

    monkeypatch.setattr(checkpoint, "save_tree", fail)
    with pytest.raises(RuntimeError):
        save_params(tmp_path / "ckpt", config, params)
    assert not (tmp_path / "ckpt").exists() and not leftovers(tmp_path / "ckpt")


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_import_export_end_to_end(tmp_path, hf_config, state_dict, capsys):
    src = write_hf_checkpoint(tmp_path / "src", hf_config, state_dict, dtype="bfloat16")
    assert main(["import", str(src), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "27 tensors" in out and "78,465 parameters" in out and "(bfloat16)" in out
    config, params = load_params(tmp_path / "ckpt")
    assert config.param_dtype == "bfloat16"
    assert param_paths(params)["lm_head/kernel"].dtype == BF16

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--max-shard-size", "50KB"]) == 0
    assert "export: 27 tensors" in capsys.readouterr().out
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert_same_tensors(read_hf_tensors(tmp_path / "hf"), read_hf_tensors(src))

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf32"), "--dtype", "float32"]) == 0
    exported = read_hf_tensors(tmp_path / "hf32")
    assert exported["lm_head.weight"].dtype == np.float32
    assert json.loads((tmp_path / "hf32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_cli_overwrite(tmp_path, hf_dir):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    assert main(["import", str(hf_dir), str(dest), "--overwrite"]) == 0
    assert (dest / "params").is_dir()


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    """A word-level tokenizer.json over the words of "hi there" and Ouro's special tokens, with the
    other files of a Hugging Face folder that generation reads; name -> bytes written."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "hi", "there"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(words[:3])
    tokenizer.save(str(folder / "tokenizer.json"))
    chat = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": chat}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (folder / "chat_template.jinja").write_text(chat)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "do_sample": False}))
    return {name: (folder / name).read_bytes() for name in checkpoint.GENERATION_FILES if (folder / name).is_file()}


def test_conversions_carry_the_tokenizer_and_melt_generate_finds_it(tmp_path, hf_config, state_dict, capsys):
    from melt_jax.inference import cli_generate

    src = write_hf_checkpoint(tmp_path / "src", hf_config, state_dict)
    files = _tokenizer_files(src)
    assert len(files) == 5
    assert main(["import", str(src), str(tmp_path / "ckpt")]) == 0
    assert main(["to-melt", str(tmp_path / "ckpt"), str(tmp_path / "melt")]) == 0
    assert main(["export", str(tmp_path / "melt"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    for folder in ("ckpt", "melt", "hf"):
        assert {name: (tmp_path / folder / name).read_bytes() for name in files} == files, folder
    # melt-generate without --tokenizer reads the checkpoint's tokenizer.json.
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "hi there", "--max-new-tokens", "3"]
    assert cli_generate.main(argv) == 0
    assert "3 new tokens" in capsys.readouterr().err
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    assert cli_generate.main(argv) == 2
    assert f"the checkpoint {tmp_path / 'ckpt'} has no tokenizer.json: pass --tokenizer" in capsys.readouterr().err


def test_cli_export_keeps_the_stored_dtype(tmp_path, hf_dir, capsys):
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "float32"
    assert main(["import", str(hf_dir), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert "(bfloat16)" in capsys.readouterr().out.splitlines()[-1]
    assert {v.dtype for v in read_hf_tensors(tmp_path / "hf").values()} == {BF16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf32"), "--dtype", "float32"]) == 0
    assert {v.dtype for v in read_hf_tensors(tmp_path / "hf32").values()} == {np.dtype(np.float32)}


def test_a_tokenizer_file_that_cannot_be_copied_leaves_nothing(tmp_path, hf_config, state_dict, monkeypatch, capsys):
    src = write_hf_checkpoint(tmp_path / "src", hf_config, state_dict)
    _tokenizer_files(src)

    def fail(source, dest):
        raise OSError(f"disk full while writing {dest}")

    monkeypatch.setattr(checkpoint.shutil, "copyfile", fail)
    assert main(["import", str(src), str(tmp_path / "ckpt")]) == 1
    assert f"cannot copy {src / 'tokenizer.json'}: disk full" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not leftovers(tmp_path / "ckpt")


def test_module_help_runs_as_a_program():
    result = subprocess.run(
        [sys.executable, "-m", "melt_jax.convert", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "import" in result.stdout and "export" in result.stdout


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1024") == 1024


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the thing, exit status 1 from the command line, and the destination
# left as it was (nothing half-written, no temporary siblings)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a case damages: the module's good fixtures, and a fresh folder for the case."""

    tmp_path: Path
    hf_config: dict
    state_dict: dict[str, np.ndarray]
    hf_dir: Path
    imported: tuple


@dataclasses.dataclass(frozen=True)
class Attempt:
    call: Callable[[], object]  # must raise
    dest: Path  # where output would go: must be as it was before
    src: Path  # the input, for `{src}` in a case's match
    argv: list[str] | None = None  # the same through melt-convert: exit status 1


@dataclasses.dataclass(frozen=True)
class BadInput:
    name: str
    setup: Callable[[Inputs], Attempt]
    error: type[Exception]
    match: str  # a regex for the message; `{src}` stands for the escaped input path


def _without(key):
    def edit(mapping: dict) -> None:
        del mapping[key]

    return edit


def _with(key, value):
    def edit(mapping: dict) -> None:
        mapping[key] = value

    return edit


def importing(tensors=None, config=None, layout="safetensors", damage=None, write=True):
    """The fixture checkpoint with `tensors(state_dict)` and `config(hf_config)` applied, written in
    `layout` (unless not `write`), then `damage(folder)`; read by load_hf_checkpoint and by
    `melt-convert import`."""

    def setup(inputs: Inputs) -> Attempt:
        folder, dest = inputs.tmp_path / "hf", inputs.tmp_path / "ckpt"
        if write:
            hf_config, state_dict = dict(inputs.hf_config), dict(inputs.state_dict)
            for edit, target in ((config, hf_config), (tensors, state_dict)):
                if edit is not None:
                    edit(target)
            write_hf_checkpoint(folder, hf_config, state_dict, layout)
        if damage is not None:
            damage(folder)
        return Attempt(lambda: load_hf_checkpoint(folder), dest, folder, ["import", str(folder), str(dest)])

    return setup


def exporting(params):
    """The imported params with `params(flat params)` applied, written by save_hf_checkpoint."""

    def setup(inputs: Inputs) -> Attempt:
        config, good = inputs.imported
        flat = dict(param_paths(good))
        params(flat)
        dest = inputs.tmp_path / "out"
        return Attempt(lambda: save_hf_checkpoint(config, params_from_paths(flat), dest), dest, dest)

    return setup


def _unlink(name: str):
    return lambda folder: (folder / name).unlink()


def _truncate(name: str):
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return damage


def _corrupt_header(name: str):
    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        data[8 : 8 + n] = b"{" * n  # same length, not JSON
        (folder / name).write_bytes(bytes(data))

    return damage


def _move_in_index(tensor: str, shard: str):
    def damage(folder: Path) -> None:
        index_file = folder / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        index["weight_map"][tensor] = shard
        index_file.write_text(json.dumps(index))

    return damage


def _import_into_existing_checkpoint(inputs: Inputs) -> Attempt:
    dest = inputs.tmp_path / "ckpt"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    return Attempt(lambda: save_params(dest, *inputs.imported), dest, dest, ["import", str(inputs.hf_dir), str(dest)])


def _export_onto_its_own_checkpoint(inputs: Inputs) -> Attempt:
    ckpt = inputs.tmp_path / "ckpt"
    save_params(ckpt, *inputs.imported)
    return Attempt(lambda: save_hf_checkpoint(*inputs.imported, ckpt), ckpt, ckpt, ["export", str(ckpt), str(ckpt)])


def exporting_checkpoint(prepare=None):
    """load_params and `melt-convert export` of a melt_jax checkpoint folder made by `prepare(folder)`
    (none without)."""

    def setup(inputs: Inputs) -> Attempt:
        folder, dest = inputs.tmp_path / "ckpt", inputs.tmp_path / "hf"
        if prepare is not None:
            prepare(folder)
        return Attempt(lambda: load_params(folder), dest, folder, ["export", str(folder), str(dest)])

    return setup


def _config_only(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_hf_config()))


def _shard_size(text: str):
    return lambda inputs: Attempt(lambda: parse_size(text), inputs.tmp_path / "hf", inputs.tmp_path)


BAD_INPUTS = [
    # import: the tensors
    BadInput(
        "missing-tensor",
        importing(tensors=_without("model.layers.1.mlp.up_proj.weight")),
        ConversionError,
        r"model\.layers\.1\.mlp\.up_proj\.weight",
    ),
    BadInput(
        "unexpected-tensor",
        importing(tensors=_with("model.layers.0.mlp.extra_proj.weight", np.zeros((4, 4), np.float32))),
        ConversionError,
        r"model\.layers\.0\.mlp\.extra_proj\.weight",
    ),
    BadInput(  # MHA-sized, but the config says 2 kv heads
        "wrong-shape",
        importing(tensors=_with("model.layers.0.self_attn.k_proj.weight", np.zeros((64, 64), np.float32))),
        ConversionError,
        r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape \[64, 64\], expected \[32, 64\]",
    ),
    BadInput(
        "integer-tensor",
        importing(tensors=_with("model.norm.weight", np.ones(64, np.int32))),
        ConversionError,
        r"model\.norm\.weight",
    ),
    # import: the config
    BadInput("unknown-model-type", importing(config=_with("model_type", "llama")), ConfigError, "model_type"),
    BadInput("missing-config-field", importing(config=_without("hidden_size")), ConfigError, "hidden_size"),
    BadInput("missing-config-json", importing(damage=_unlink("config.json")), ConfigError, r"{src}/config\.json"),
    # import: the files
    BadInput("missing-folder", importing(write=False), ConversionError, "{src}"),
    BadInput("no-weights-file", importing(damage=_unlink("model.safetensors")), ConversionError, "no weights file"),
    BadInput(
        "truncated-safetensors",
        importing(damage=_truncate("model.safetensors")),
        ConversionError,
        r"{src}/model\.safetensors",
    ),
    BadInput(
        "corrupt-safetensors",
        importing(damage=_corrupt_header("model.safetensors")),
        ConversionError,
        r"{src}/model\.safetensors",
    ),
    BadInput(
        "corrupt-bin",
        importing(layout="bin", damage=_truncate("pytorch_model.bin")),
        ConversionError,
        r"{src}/pytorch_model\.bin",
    ),
    BadInput(
        "missing-shard",
        importing(layout="sharded", damage=_unlink("model-00002-of-00003.safetensors")),
        ConversionError,
        r"model-00002-of-00003\.safetensors",
    ),
    BadInput(
        "tensor-not-in-its-shard",
        importing(layout="sharded", damage=_move_in_index("model.norm.weight", "model-00001-of-00003.safetensors")),
        ConversionError,
        r"model\.norm\.weight",
    ),
    # export: the params
    BadInput(
        "export-missing-param",
        exporting(_without("layers/mlp/up_proj/kernel")),
        ConversionError,
        "layers/mlp/up_proj/kernel",
    ),
    BadInput(
        "export-unknown-param",
        exporting(_with("layers/extra/kernel", np.zeros(3))),
        ConversionError,
        "layers/extra/kernel",
    ),
    BadInput(
        "export-wrong-shape",
        exporting(_with("exit_gate/kernel", np.zeros((1, 64)))),
        ConversionError,
        "exit_gate/kernel",
    ),
    # melt_jax checkpoints
    BadInput("import-into-existing-destination", _import_into_existing_checkpoint, CheckpointError, "already exists"),
    BadInput("export-into-existing-destination", _export_onto_its_own_checkpoint, CheckpointError, "already exists"),
    BadInput("missing-checkpoint", exporting_checkpoint(), CheckpointError, "not found: {src}"),
    BadInput("checkpoint-without-params", exporting_checkpoint(_config_only), CheckpointError, "params"),
    # arguments
    BadInput("shard-size-not-a-size", _shard_size("five"), argparse.ArgumentTypeError, "invalid size"),
]


def snapshot(path: Path):
    """What is at `path`: None, a file's bytes, or a folder's {relative path: bytes (None for a folder)}."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.name)
def test_bad_input_fails_cleanly(tmp_path, hf_config, state_dict, hf_dir, imported, capsys, case):
    attempt = case.setup(Inputs(tmp_path, hf_config, state_dict, hf_dir, imported))
    match = case.match.replace("{src}", re.escape(str(attempt.src)))
    before = snapshot(attempt.dest)
    with pytest.raises(case.error, match=match):
        attempt.call()
    assert snapshot(attempt.dest) == before and not leftovers(attempt.dest)

    if attempt.argv is not None:
        assert main(attempt.argv) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("melt-convert: error: ") and re.search(match, err)
        assert "Traceback" not in err
        assert snapshot(attempt.dest) == before and not leftovers(attempt.dest)
