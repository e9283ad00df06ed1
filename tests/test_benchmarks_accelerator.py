"""benchmarks/accelerator.py on CPU with --small: one case run in-process, its JSON row checked, and
the bytes read per step computed here from the tiny config's shapes."""

import json

from benchmark_scripts import load_benchmark

from melt_jax.model import abstract_params, model_for


def load_script():
    return load_benchmark("accelerator.py")


def expected_bytes(small: dict, slots: int, gates: bool, batch: int, prompt: int, new: int) -> int:
    """Weights (T loops of layers + final norm + exit gate, the head once, the embedding rows) plus the
    filled cache, counted from the shapes, 2 bytes per bf16 number."""
    h, i, v, d = small["hidden_size"], small["intermediate_size"], small["vocab_size"], small["head_dim"]
    heads, kv, layers, loops = small["num_attention_heads"], small["num_key_value_heads"], small["num_hidden_layers"], 4
    attention = h * heads * d + 2 * h * kv * d + heads * d * h
    layer = attention + 3 * h * i + 4 * h + (2 * h * h + h if gates else 0)  # 4 norms (sandwich), MELT's gate
    per_loop = layers * layer + h + (h + 1)  # the final norm and the exit gate
    steps = new - 1
    weights = 2 * (loops * per_loop + h * v + batch * h)
    cache = batch * slots * 2 * kv * d * 2 * (prompt + (steps + 1) / 2)
    return int(weights + cache)


def test_accelerator_small_rows(tmp_path):
    script = load_script()
    out = tmp_path / "rows.jsonl"
    rows = script.main(["--small", "--cases", "ouro-b1", "--repeats", "1", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    (row,) = rows
    assert row["case"] == "ouro-b1" and row["error"] is None and row["device"]
    assert row["decode_steps"] == row["new"] - 1 == 15
    assert row["ms_per_step"] > 0 and row["tok_per_s"] > 0 and row["ttft_ms"] > 0
    assert row["bandwidth_fraction"] is None  # CPU: no bandwidth unless given
    small = script.SMALL
    layers = small["num_hidden_layers"]
    assert row["bytes_per_step"] == expected_bytes(small, 4 * layers, False, 1, 32, 16)
    # MELT: one slot array per layer and a gate per layer, from the same formula without running it
    melt = script.configs(True, 32)["melt"]
    case = script.Case("melt", 4, 240, 16, True)
    got = script.bytes_per_step(melt, abstract_params(model_for(melt)), case)
    assert got == expected_bytes(small, layers, True, 4, 240, 16)
