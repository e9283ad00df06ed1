"""Shared test set-up: 8 host CPU devices for sharding tests, fp32 matmuls, and tiny checkpoints."""

import os

# Must be in place before jax is imported anywhere. 8 host devices for the sharding tests; LLVM
# optimisation off, which makes compiling the tests' tiny programs (the bulk of their time) ~2-3x
# faster; it changes how fast code runs, not what it computes.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare fp32 numbers to 1e-4; make sure no matmul is done in reduced precision.
jax.config.update("jax_default_matmul_precision", "highest")
