"""Shared test set-up: 8 host CPU devices for sharding tests, fp32 matmuls, and tiny checkpoints."""

import os

# Must be in place before jax is imported anywhere. 8 host devices for the sharding tests; LLVM
# optimisation off, which makes compiling the tests' tiny programs (the bulk of their time) ~2-3x
# faster; it changes how fast code runs, not what it computes.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
import tiny_models  # noqa: E402

# Parity tests compare fp32 numbers to 1e-4; make sure no matmul is done in reduced precision.
jax.config.update("jax_default_matmul_precision", "highest")


# The tiny models of tests/tiny_models.py, one per structure for the whole session: a test asks for
# `ouro_of(structure)` and every test module that asks for the same structure gets the same object,
# so the same config (and, with equal shapes, the same compiled programs).


@pytest.fixture(scope="session")
def checkpoint_of():
    """structure -> TinyCheckpoint (HF config and numpy weights; no jax)."""
    return functools.cache(tiny_models.build_checkpoint)


@pytest.fixture(scope="session")
def ouro_of(checkpoint_of, tmp_path_factory):
    """structure -> TinyOuro (the checkpoint through the converter: OuroConfig and float32 params)."""

    @functools.cache
    def build(structure):
        folder = tmp_path_factory.mktemp(f"ouro-{structure}")
        return tiny_models.build_ouro(checkpoint_of(structure), folder)

    return build


@pytest.fixture(scope="session")
def melt_of(ouro_of):
    """structure -> TinyMelt (the Ouro weights plus random gates; MeltConfig with chunk size 8)."""
    return functools.cache(lambda structure: tiny_models.build_melt(ouro_of(structure)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The PyTorch references run tiny models: intra-op threads only add overhead (7x slower on a busy
    2-core box). For modules that run them: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Drops every compiled program after each test module. XLA's CPU backend maps memory regions for
    each executable it keeps (two test modules leave ~24,000 mappings); over the whole suite they
    pass the kernel's limit (vm.max_map_count, 65,530 by default), after which a compile crashes
    the process. Clearing also empties the caches of shared fixtures' programs, which the next module
    compiles again."""
    yield
    jax.clear_caches()
    gc.collect()
