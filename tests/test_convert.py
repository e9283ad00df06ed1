"""Tests of the checkpoint converter (convert/) and of melt_jax.checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_fixtures import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint
from safetensors import safe_open
from safetensors.numpy import load_file

from melt_jax import checkpoint
from melt_jax.checkpoint import CheckpointError, load_params, save_params
from melt_jax.config import ConfigError, OuroConfig
from melt_jax.convert import ConversionError, hf_export, load_hf_checkpoint, save_hf_checkpoint
from melt_jax.convert.cli import main, parse_size
from melt_jax.convert.mapping import OURO_RULES, flatten_params, hf_tensor_plan, param_shapes, unflatten_params

GOLDEN_DIR = Path(__file__).parent / "data" / "ouro-tiny"
BF16 = np.dtype(ml_dtypes.bfloat16)


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of `a` (so that comparisons are bit-exact, -0.0 and NaN included)."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def assert_same_params(a: dict, b: dict) -> None:
    fa, fb = flatten_params(a), flatten_params(b)
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
    params_module = pytest.importorskip("melt_jax.params")
    config = OuroConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=tied))
    abstract = params_module.abstract_params(params_module.OuroModel(config))
    assert {k: tuple(v.shape) for k, v in flatten_params(abstract).items()} == param_shapes(config)


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
    flat = flatten_params(params)
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
    assert flatten_params(p16)["layers/mlp/up_proj/kernel"].dtype == BF16
    # fp32 holds bf16 exactly: casting the fp32 import down gives the bf16 import.
    assert_same_params({k: v.astype(BF16) for k, v in flatten_params(p32).items()}, flatten_params(p16))
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
    flat = flatten_params(params)
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
    jax_params = {k: jnp.asarray(v) for k, v in flatten_params(params).items()}
    save_hf_checkpoint(config, unflatten_params(jax_params), tmp_path / "out")
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), state_dict)


def test_export_rejects_bad_params(tmp_path, imported):
    config, params = imported
    flat = flatten_params(params)
    cases = [
        ({k: v for k, v in flat.items() if k != "layers/mlp/up_proj/kernel"}, "layers/mlp/up_proj/kernel"),
        (dict(flat, **{"layers/extra/kernel": np.zeros(3)}), "layers/extra/kernel"),
        (dict(flat, **{"exit_gate/kernel": np.zeros((1, 64))}), "exit_gate/kernel"),
    ]
    for bad, needle in cases:
        with pytest.raises(ConversionError, match=needle):
            save_hf_checkpoint(config, unflatten_params(bad), tmp_path / "out")
        assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")


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
    assert all(isinstance(v, np.ndarray) for v in flatten_params(params2).values())


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


def test_save_params_refuses_existing_destination_and_overwrites(tmp_path, imported):
    config, params = imported
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(dest, config, params)
    assert os.listdir(dest) == ["keep.txt"]
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


def test_load_params_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_params(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(CheckpointError, match="params"):
        load_params(tmp_path / "half")


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_import_export_end_to_end(tmp_path, hf_config, state_dict, capsys):
    src = write_hf_checkpoint(tmp_path / "src", hf_config, state_dict, dtype="bfloat16")
    assert main(["import", str(src), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "27 tensors" in out and "78,465 parameters" in out and "(bfloat16)" in out
    config, params = load_params(tmp_path / "ckpt")
    assert config.param_dtype == "bfloat16"
    assert flatten_params(params)["lm_head/kernel"].dtype == BF16

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--max-shard-size", "50KB"]) == 0
    assert "export: 27 tensors" in capsys.readouterr().out
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert_same_tensors(read_hf_tensors(tmp_path / "hf"), read_hf_tensors(src))

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf32"), "--dtype", "float32"]) == 0
    exported = read_hf_tensors(tmp_path / "hf32")
    assert exported["lm_head.weight"].dtype == np.float32
    assert json.loads((tmp_path / "hf32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_cli_overwrite(tmp_path, hf_dir, capsys):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    assert main(["import", str(hf_dir), str(dest)]) == 1
    assert "already exists" in capsys.readouterr().err and os.listdir(dest) == []
    assert main(["import", str(hf_dir), str(dest), "--overwrite"]) == 0
    assert (dest / "params").is_dir()
    assert main(["export", str(dest), str(dest)]) == 1  # the export destination exists too
    assert "already exists" in capsys.readouterr().err


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
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        parse_size("five")


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the thing, exit status 1, no output left behind


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"{" * n  # same length, not JSON
    path.write_bytes(bytes(data))


def _setup_bad_input(case: str, folder: Path, hf_config: dict, state_dict: dict) -> str:
    """Writes a broken HF folder for `case`; returns a string the error message must contain."""
    cfg, sd, layout = dict(hf_config), dict(state_dict), "safetensors"
    needle = None
    if case == "missing tensor":
        needle = "model.layers.1.mlp.up_proj.weight"
        del sd[needle]
    elif case == "unexpected tensor":
        needle = "model.layers.0.mlp.extra_proj.weight"
        sd[needle] = np.zeros((4, 4), np.float32)
    elif case == "wrong shape":
        needle = "model.layers.0.self_attn.k_proj.weight"
        sd[needle] = np.zeros((64, 64), np.float32)  # MHA-sized, but the config says 2 kv heads
    elif case == "integer tensor":
        needle = "model.norm.weight"
        sd[needle] = np.ones(64, np.int32)
    elif case == "unknown model_type":
        cfg["model_type"], needle = "llama", "model_type"
    elif case == "missing config field":
        del cfg["hidden_size"]
        needle = "hidden_size"
    elif case in ("missing shard", "tensor not in its shard"):
        layout = "sharded"
    elif case == "corrupt bin":
        layout = "bin"
    write_hf_checkpoint(folder, cfg, sd, layout)
    if case == "missing config.json":
        (folder / "config.json").unlink()
        needle = str(folder / "config.json")
    elif case == "no weights file":
        (folder / "model.safetensors").unlink()
        needle = "no weights file"
    elif case == "truncated safetensors":
        _truncate(folder / "model.safetensors")
        needle = str(folder / "model.safetensors")
    elif case == "corrupt safetensors":
        _corrupt_header(folder / "model.safetensors")
        needle = str(folder / "model.safetensors")
    elif case == "corrupt bin":
        _truncate(folder / "pytorch_model.bin")
        needle = str(folder / "pytorch_model.bin")
    elif case == "missing shard":
        (folder / "model-00002-of-00003.safetensors").unlink()
        needle = "model-00002-of-00003.safetensors"
    elif case == "tensor not in its shard":
        index_file = folder / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
        index_file.write_text(json.dumps(index))
        needle = "model.norm.weight"
    return needle


BAD_INPUTS = [
    "missing tensor",
    "unexpected tensor",
    "wrong shape",
    "integer tensor",
    "unknown model_type",
    "missing config field",
    "missing config.json",
    "no weights file",
    "truncated safetensors",
    "corrupt safetensors",
    "corrupt bin",
    "missing shard",
    "tensor not in its shard",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_cleanly(tmp_path, hf_config, state_dict, capsys, case):
    folder = tmp_path / "hf"
    needle = _setup_bad_input(case, folder, hf_config, state_dict)
    with pytest.raises((ConversionError, ConfigError)) as info:
        load_hf_checkpoint(folder)
    assert needle in str(info.value)

    dest = tmp_path / "ckpt"
    assert main(["import", str(folder), str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and needle in err
    assert "Traceback" not in err
    assert not dest.exists() and not leftovers(dest)


def test_missing_hf_folder_and_checkpoint(tmp_path, capsys):
    assert main(["import", str(tmp_path / "nope"), str(tmp_path / "ckpt")]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "hf")]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "hf").exists()


def test_wrong_shape_message_names_the_shapes(tmp_path, hf_config, state_dict):
    _setup_bad_input("wrong shape", tmp_path / "hf", hf_config, state_dict)
    with pytest.raises(ConversionError, match=r"shape \[64, 64\], expected \[32, 64\]"):
        load_hf_checkpoint(tmp_path / "hf")
