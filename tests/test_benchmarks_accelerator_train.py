"""benchmarks/accelerator_train.py on CPU with --small: a Stage I case and a MELT case run in-process,
their JSON rows checked, and the model FLOPs per token computed here from the tiny configs' shapes."""

import json
import math

import pytest
from benchmark_scripts import load_benchmark


def load_script():
    return load_benchmark("accelerator_train.py")


def forward_flops(small: dict, seq: int, gates: bool, head: bool = True) -> int:
    """T loops of: 2 x the layers' params (attention, MLP, four norms, MELT's gate), the causal
    attention's 2 L S heads d, and the head's 2 H V."""
    h, i, v, d = small["hidden_size"], small["intermediate_size"], small["vocab_size"], small["head_dim"]
    heads, kv, layers, loops = small["num_attention_heads"], small["num_key_value_heads"], small["num_hidden_layers"], 4
    layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i + 4 * h + (2 * h * h + h if gates else 0)
    return loops * (2 * layers * layer + 2 * layers * seq * heads * d + (2 * h * v if head else 0))


def test_accelerator_train_small_rows(tmp_path):
    script = load_script()
    out = tmp_path / "rows.jsonl"
    cases = "looplm-2x256-auto,phase2-2x256-auto,looplm-2x256-cudnn"
    rows = script.main(["--small", "--cases", cases, "--attention", "auto,cudnn", "--repeats", "1", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    looplm, phase2, cudnn = rows
    for row in (looplm, phase2):
        assert row["error"] is None and row["device"] and row["attention"] == "auto"
        assert (row["batch"], row["seq"]) == (2, 256)
        assert math.isfinite(row["loss"]) and row["step_s"] > 0 and row["compile_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 256 / row["step_s"])
        assert row["model_tflops_per_s"] == pytest.approx(row["model_flops_per_step"] / row["step_s"] / 1e12)
        assert row["mfu"] is None  # CPU: no peak unless given
        assert row["model_flops_per_step"] == 2 * 256 * row["model_flops_per_token"]
    small = script.SMALL
    assert looplm["stage"] == "looplm"
    assert looplm["model_flops_per_token"] == 3 * forward_flops(small, 256, gates=False)
    # MELT: the trained second pass, the first pass without the head, the frozen teacher
    student = 3 * forward_flops(small, 256, gates=True) + forward_flops(small, 256, gates=True, head=False)
    assert phase2["stage"] == "melt_phase2"
    assert phase2["model_flops_per_token"] == student + forward_flops(small, 256, gates=False)
    # a kernel of another platform is a row saying so, not a failure
    assert cudnn["error"].startswith("skipped: cudnn runs only on gpu") and "step_s" not in cudnn


def test_accelerator_train_unknown_case():
    script = load_script()
    with pytest.raises(SystemExit, match="unknown cases \\['looplm-9x9-auto'\\]; known: looplm-2x256-auto"):
        script.main(["--small", "--cases", "looplm-9x9-auto"])
