"""OuroConfig: Hugging Face config.json round trip, validation errors, presets."""

import json

import pytest

from melt_jax.model import OuroConfig
from melt_jax.model.config import ConfigError


def _hf(**overrides):
    base = OuroConfig.preset("ouro-1.4b").to_hf_config()
    base.update(overrides)
    return base


def test_hf_round_trip_keeps_unknown_fields():
    hf = _hf(some_future_field={"a": 1}, auto_map={"AutoConfig": "x.y"})
    config = OuroConfig.from_hf_config(hf)
    assert config.extra["some_future_field"] == {"a": 1}
    assert config.to_hf_config() == dict(sorted(hf.items()))


def test_golden_config_reads(tmp_path):
    path = tmp_path / "config.json"
    hf = _hf(num_hidden_layers=2, hidden_size=64, head_dim=16, layer_types=["full_attention"] * 2)
    path.write_text(json.dumps(hf))
    config = OuroConfig.from_json_file(path)
    assert config.num_layers == 2 and config.layer_types == ("full_attention", "full_attention")


def test_defaults_for_optional_fields():
    config = OuroConfig.from_hf_config(
        dict(
            model_type="ouro",
            vocab_size=10,
            hidden_size=32,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    assert config.num_kv_heads == 4 and config.head_dim == 8 and config.total_ut_steps == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_type="llama"), "model_type"),
        (dict(hidden_size=100, head_dim=None), "hidden_size (100) is not divisible by num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads (3) must divide num_attention_heads"),
        (dict(total_ut_steps=0), "total_ut_steps"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(early_exit_step=4), "early_exit_step"),
        (dict(vocab_size="big"), "vocab_size"),
    ],
)
def test_invalid_fields_are_named(overrides, message):
    hf = _hf(**overrides)
    if overrides.get("head_dim", 0) is None:
        del hf["head_dim"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OuroConfig.from_hf_config(hf)


def test_missing_field_is_named():
    hf = _hf()
    del hf["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        OuroConfig.from_hf_config(hf)


def test_bad_json_file_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        OuroConfig.from_json_file(path)
    with pytest.raises(ConfigError, match="not found"):
        OuroConfig.from_json_file(tmp_path / "absent.json")


def test_presets():
    assert OuroConfig.preset("ouro-2.6b").num_layers == 48
    with pytest.raises(ConfigError, match="unknown preset"):
        OuroConfig.preset("ouro-99b")


def test_every_bad_input_error_derives_from_one_base():
    """The command lines catch MeltJaxError; every error melt_jax raises for bad input is one."""
    from melt_jax import errors
    from melt_jax.convert.errors import ConversionError
    from melt_jax.errors import TrainingError
    from melt_jax.train.config import RunConfigError

    for cls in (
        errors.ConfigError,
        errors.DataError,
        errors.CheckpointError,
        errors.ShardingError,
        errors.GenerationError,
        RunConfigError,
        TrainingError,
        ConversionError,
    ):
        assert issubclass(cls, errors.MeltJaxError), cls
    with pytest.raises(errors.MeltJaxError, match="total_ut_steps"):
        OuroConfig.from_hf_config(_hf(total_ut_steps=0))
