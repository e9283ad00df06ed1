"""Which jax backends melt_jax lets jax start: every backend jax would start, except the TPU backend on
a machine without a TPU chip.

libtpu (the `tpu` and `test` extras) is installed on CPU machines too, to compile for TPU topologies
without a TPU (melt_jax/aot.py). Left alone, jax then tries its TPU backend at the first use of a
device, and libtpu, finding no chip, loads 200 MB and writes six lines of warnings to stderr (among
them `E0000 ... INVALID_ARGUMENT: ... TPU_WORKER_HOSTNAMES`) before jax falls back to the CPU.
`skip_absent_tpu`, run when melt_jax is imported, sets jax's `jax_platforms` to the other backends
when no TPU chip is visible. It changes nothing where the user chose the platforms (JAX_PLATFORMS,
`jax_platforms`, JAX_FORCE_TPU_INIT), where a TPU chip is present (a TPU VM uses its TPU), or once
jax's backends are running. Compiling for a TPU topology loads libtpu on its own and is not affected;
`describe_chipless_host` tells libtpu beforehand what it would otherwise warn about not finding.
"""

from __future__ import annotations

import os

import jax


def _tpu_chips() -> int | None:
    """The number of TPU chips jax sees on this machine (None: unknown)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except Exception:  # a jax without the helper: assume a TPU may be present
        return None


def _platforms_without_tpu() -> str | None:
    """The backends for a machine without a TPU chip, from the accelerators it has: "cuda,cpu" with
    an NVIDIA GPU, "rocm,cpu" with an AMD GPU, else "cpu" (None: unknown). Read from the hardware,
    not from jax's plugins: starting a plugin here would run its checks before a caller could set
    them up (melt_jax.aot compiles for a GPU on a machine without one; its CUDA plugin then stays
    registered under "cpu" alone)."""
    try:
        from jax._src import hardware_utils

        if hardware_utils.has_visible_nvidia_gpu():
            return "cuda,cpu"
        if hardware_utils.num_available_amd_gpus(stop_at=1):
            return "rocm,cpu"
    except Exception:  # a jax whose helpers differ: leave the choice to jax
        return None
    return "cpu"


def _backends_running() -> bool:
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except Exception:  # a jax without the helper: assume they are, and change nothing
        return True


def skip_absent_tpu() -> bool:
    """Keeps jax from starting its TPU backend on a machine with no TPU chip (see the module
    docstring); returns whether it changed jax's platforms."""
    chosen = os.environ.get("JAX_PLATFORMS") or getattr(jax.config, "jax_platforms", None)
    if chosen or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    if _tpu_chips() != 0 or _backends_running():
        return False
    platforms = _platforms_without_tpu()
    if not platforms:
        return False
    jax.config.update("jax_platforms", platforms)
    return True


def describe_chipless_host() -> None:
    """On a machine with no TPU chip, tells libtpu that it is one host with no TPU workers besides
    itself (TPU_WORKER_HOSTNAMES, TPU_HOST_BOUNDS; values already set are kept), which libtpu otherwise
    looks up in vain and warns about when it loads to compile for a TPU topology. Compile-only devices
    come from the topology's name, not from these."""
    if _tpu_chips() == 0:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


def tpu_chips_visible() -> bool:
    """Whether this machine has TPU chips (a TPU VM); False where that is unknown."""
    return (_tpu_chips() or 0) > 0


def runs_on_cpu() -> bool:
    """Whether jax's default backend will be its CPU: the first platform chosen (JAX_PLATFORMS,
    `jax_platforms`, or skip_absent_tpu's choice on a machine without accelerators) is "cpu". Read
    from the settings, without starting a backend (jax.distributed.initialize must come first)."""
    chosen = os.environ.get("JAX_PLATFORMS") or getattr(jax.config, "jax_platforms", None) or ""
    return chosen.split(",")[0].strip() == "cpu"
