"""Exit distribution and threshold exit against PyTorch, bit for bit, including the rounding cases
where threshold 1.0 stops a token before the last loop."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from melt_jax.errors import GenerationError
from melt_jax.model import ExitPolicy, OuroConfig, cumulative_exit_probs, exit_distribution, threshold_exit_loops
from melt_jax.testing.torch_ouro import exit_pdf_from_gate_logits

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _gate_logits(num_loops, shape, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(num_loops, *shape))
    # Saturated gates: these make the exit mass reach 1.0 early in rounding.
    logits[:, :, : shape[1] // 4] += 12.0
    return logits.astype(np.float32)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_loops", [2, 4, 8])
def test_exit_pdf_cumsum_and_threshold_match_torch_bitwise(dtype, num_loops):
    logits = _gate_logits(num_loops, (64, 256), seed=num_loops)
    torch_logits = torch.from_numpy(logits).to(TORCH_DTYPES[dtype])
    jax_logits = jnp.asarray(logits).astype(dtype)

    torch_pdf = exit_pdf_from_gate_logits(torch_logits)  # [B, S, T]
    # In bf16 every op is rounded as eager PyTorch rounds it: identical bits. In float32 the sigmoids
    # of XLA and PyTorch may differ in the last bit, which the products carry to a few units in the
    # last place of 1.0.
    atol = {"float32": 4 * 2.0**-24, "bfloat16": 0.0}[dtype]
    np.testing.assert_allclose(
        np.asarray(exit_distribution(jax_logits).astype(jnp.float32)), _to_numpy(torch_pdf), rtol=0, atol=atol
    )

    # Upstream's cumsum (torch.cumsum on the CPU, wider accumulator) and >= on the same pdf: bitwise.
    pdf = jnp.asarray(_to_numpy(torch_pdf)).astype(dtype)
    torch_cum = torch.cumsum(torch_pdf, dim=-1)
    cum = cumulative_exit_probs(pdf)
    np.testing.assert_array_equal(np.asarray(cum.astype(jnp.float32)), _to_numpy(torch_cum))

    early_at_one = 0
    for threshold in (0.25, 0.5, 0.9, 0.99, 1.0):
        mask = torch_cum >= torch.tensor(threshold, dtype=torch_pdf.dtype)
        expected = torch.where(mask.any(-1), mask.int().argmax(-1), num_loops - 1).numpy()
        steps = np.asarray(threshold_exit_loops(pdf, threshold))
        np.testing.assert_array_equal(steps, expected)
        if threshold == 1.0:
            early_at_one = int((steps < num_loops - 1).sum())
    # The rounding case must actually be exercised: threshold 1.0 stopping a token before the last loop.
    assert early_at_one > 0


def test_exit_pdf_sums_to_one():
    pdf = exit_distribution(jnp.asarray(_gate_logits(4, (8, 16), seed=0)))
    np.testing.assert_allclose(pdf.sum(-1), 1.0, atol=1e-6)


def test_exit_policy_validation():
    with pytest.raises(ValueError, match="needs a loop index"):
        ExitPolicy("loop")
    with pytest.raises(ValueError, match="needs a threshold"):
        ExitPolicy("threshold")
    with pytest.raises(ValueError, match="unknown exit policy"):
        ExitPolicy("first")


def test_exit_policy_command_line_forms():
    config = OuroConfig.preset("tiny", total_ut_steps=4)
    assert ExitPolicy.parse("last", config) == ExitPolicy.last()
    assert ExitPolicy.parse("loop:2", config) == ExitPolicy.at_loop(2)
    assert ExitPolicy.parse("step:2", config) == ExitPolicy.at_loop(2)  # the older spelling
    assert ExitPolicy.parse("threshold:0.5", config) == ExitPolicy.at_threshold(0.5)
    assert ExitPolicy.parse("weighted", config) == ExitPolicy.weighted()
    for bad in ("loop:4", "loop:x", "first", "threshold"):
        with pytest.raises(GenerationError, match="bad exit policy"):
            ExitPolicy.parse(bad, config)
