"""The choice of how attention is computed: the implementations' names, their block sizes, the "auto"
rule and the fallback of the kernels, and the platform a program is traced for.

This module imports nothing of the model: the model config validates its `attention` field here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from melt_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class KernelNeeds:
    """What a kernel asks of the config and of the program, known without importing the kernel:
    blocks that are whole multiples of `block_multiple`, and `platform` (None: any) with `described`
    naming the kernel in the error when the program is traced for another."""

    block_multiple: int = 1
    platform: str | None = None
    described: str = ""


# The splash kernel's blocks are whole multiples of the TPU's 128 lanes.
SPLASH_LANES = 128
# Implementations that are accelerator kernels: each computes the calls its module says it takes
# (dispatch.KERNEL_CALLS) and falls back to the "auto" rule elsewhere (`Implementation.resolve`).
KERNELS = {
    "splash": KernelNeeds(block_multiple=SPLASH_LANES),
    "cudnn": KernelNeeds(platform="gpu", described="cuDNN flash attention, GPU only"),
    "pallas_gpu": KernelNeeds(),
}
IMPLEMENTATIONS = ("auto", "xla", "blockwise", *KERNELS)
# The kernels "auto" tries, in this order, on a call with more than AUTO_DENSE_MAX_LOGITS logits per
# head, on the platform the program is traced for: the first that takes the call computes it. cuDNN
# comes first on GPU (NVIDIA's own kernel, for the calls it takes); the Pallas GPU kernel takes
# segment ids and the two-pass pattern. On CPU "auto" picks no kernel (they would run interpreted).
AUTO_KERNELS = {"tpu": ("splash",), "gpu": ("cudnn", "pallas_gpu")}
# "auto" stays dense up to this many logits per head (S * M): 512 KiB of float32 per head. Counting
# logits rather than keys keeps decoding (a few queries over a long cache) dense.
AUTO_DENSE_MAX_LOGITS = 128 * 1024
DEFAULT_BLOCK = 512


def check_implementation(name, query_block, key_block, what: str = "attention") -> None:
    """ConfigError naming `what` (e.g. "config field attention") unless `name` is one of
    IMPLEMENTATIONS and both block sizes are positive integers (multiples of 128 for "splash")."""
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"{what} must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    multiple = KERNELS[name].block_multiple if name in KERNELS else 1
    for suffix, value in (("query_block", query_block), ("key_block", key_block)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{what}_{suffix} must be a positive integer, got {value!r}")
        if value % multiple:
            raise ConfigError(f"{what}_{suffix} must be a multiple of {multiple} for {name}, got {value}")


def target_platform() -> str:
    """The platform of the program being traced: that of the devices of the mesh set by `jax.set_mesh`
    (the training program and `melt-train compile` trace under one, a TPU topology's compile-only
    devices included), else the default backend's ("cpu", "gpu", "tpu")."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return jax.default_backend() if device is None else device.platform


def control_flow_on_device() -> bool:
    """Whether the program being traced decides data-dependent control flow (a while loop's next
    iteration, a conditional's branch) on the device (CPU, TPU). On GPU each such decision sends its
    predicate to the host: there inference reads a cache's slot arrays with static shapes instead of
    stopping after the filled part, and computes both sides of a select instead of branching."""
    return target_platform() != "gpu"


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How attention is computed: `name` one of IMPLEMENTATIONS, and the block sizes of "blockwise"
    and "splash" (clipped to the sequence)."""

    name: str = "xla"
    query_block: int = DEFAULT_BLOCK
    key_block: int = DEFAULT_BLOCK

    def __post_init__(self):
        check_implementation(self.name, self.query_block, self.key_block)

    def resolve(self, num_queries: int, num_keys: int, takes: Callable[[str], bool] = lambda name: False) -> str:
        """The implementation of S = num_queries queries over M = num_keys keys, where takes(kernel)
        says whether a kernel computes this call (its mask and shapes): `name` for "xla",
        "blockwise", and a kernel that takes the call; otherwise, and for "auto", "xla" up to
        AUTO_DENSE_MAX_LOGITS logits per head and above that "auto"'s first kernel of the platform
        the program is traced for (AUTO_KERNELS) that takes the call, else "blockwise"."""
        if self.name in ("xla", "blockwise") or (self.name in KERNELS and takes(self.name)):
            return self.name
        if num_queries * num_keys <= AUTO_DENSE_MAX_LOGITS:
            return "xla"
        if self.name == "auto":
            for kernel in AUTO_KERNELS.get(target_platform(), ()):
                if takes(kernel):
                    return kernel
        return "blockwise"

    def choose(self, num_queries: int, num_keys: int, takes: Callable[[str], bool] = lambda name: False) -> str:
        """`resolve`, once the kernel is known to run where the program is being traced for: a kernel
        bound to a platform ("cudnn": GPU) asked for a program traced for another is a ConfigError
        (whatever the path)."""
        needs = KERNELS.get(self.name)
        if needs is not None and needs.platform is not None and target_platform() != needs.platform:
            elsewhere = [repr(n) for n in IMPLEMENTATIONS if n not in KERNELS or KERNELS[n].platform is None]
            raise ConfigError(
                f"config field attention is {self.name!r} ({needs.described}), but this program is "
                f"traced for backend {target_platform()!r}; use {', '.join(elsewhere[:-1])} or {elsewhere[-1]}"
            )
        return self.resolve(num_queries, num_keys, takes)


def describe_attention(name: str, platform: str) -> str:
    """One line saying what the implementation `name` computes attention with in a program for
    `platform` ("cpu", "gpu", "tpu"): for a run's log and a compile report. Only "auto" depends on
    the platform."""
    if name != "auto":
        return f"{name} on {platform}"
    kernels = AUTO_KERNELS.get(platform, ())
    many = f"the first of {', '.join(kernels)} that takes the call, else blockwise" if kernels else "blockwise"
    return f"auto on {platform}: xla up to {AUTO_DENSE_MAX_LOGITS:,} logits per head, above that {many}"


DENSE = Implementation("xla")
