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


def _platforms_without_tpu() -> list[str] | None:
    """The backends jax would try, best first, without 'tpu' (None: unknown)."""
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return None
        xla_bridge._discover_and_register_pjrt_plugins()
        factories = xla_bridge._backend_factories
        ordered = sorted(factories, key=lambda name: -factories[name].priority)
    except Exception:  # a jax whose internals differ: leave the choice to jax
        return None
    return [name for name in ordered if name != "tpu"]


def skip_absent_tpu() -> bool:
    """Keeps jax from starting its TPU backend on a machine with no TPU chip (see the module
    docstring); returns whether it changed jax's platforms."""
    chosen = os.environ.get("JAX_PLATFORMS") or getattr(jax.config, "jax_platforms", None)
    if chosen or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    if _tpu_chips() != 0:
        return False
    platforms = _platforms_without_tpu()
    if not platforms:
        return False
    jax.config.update("jax_platforms", ",".join(platforms))
    return True


def describe_chipless_host() -> None:
    """On a machine with no TPU chip, tells libtpu that it is one host with no TPU workers besides
    itself (TPU_WORKER_HOSTNAMES, TPU_HOST_BOUNDS; values already set are kept), which libtpu otherwise
    looks up in vain and warns about when it loads to compile for a TPU topology. Compile-only devices
    come from the topology's name, not from these."""
    if _tpu_chips() == 0:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
