"""On a machine without a TPU chip, the command lines start no TPU backend and print no libtpu warnings,
and compiling for a TPU topology still works (melt_jax/platforms.py). Run in subprocesses without the
tests' JAX_PLATFORMS=cpu, as a user's command would run."""

import os
import subprocess
import sys

import pytest

from melt_jax.platforms import _tpu_chips
from melt_jax.testing.hf_checkpoints import random_ouro_state_dict, tiny_hf_config, write_hf_checkpoint

pytestmark = pytest.mark.skipif(_tpu_chips() != 0, reason="a machine without TPU chips")

# What libtpu writes when it starts without a chip: "E0000 ... INVALID_ARGUMENT: ... TPU_WORKER_HOSTNAMES",
# "could not determine TPU accelerator type", "Logging before InitGoogle()".
NOISE = ("E0000", "TPU_", "libtpu", "InitGoogle", "accelerator type")


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in NOISE)]


def test_a_command_on_a_cpu_machine_prints_no_tpu_warnings(tmp_path):
    hf_config = tiny_hf_config()
    src = write_hf_checkpoint(tmp_path / "hf", hf_config, random_ouro_state_dict(hf_config, seed=0))
    done = subprocess.run(
        [sys.executable, "-m", "melt_jax.convert", "import", str(src), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=_user_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert _noise(done.stderr) == []


def test_tpu_topologies_compile_quietly_beside_the_cpu_backend():
    script = (
        "import jax, melt_jax\n"
        "from melt_jax.aot import topology_devices\n"
        "print(len(topology_devices('v5p:2x2x2')), jax.default_backend())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_user_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8", "cpu"]
    assert _noise(done.stderr) == []
