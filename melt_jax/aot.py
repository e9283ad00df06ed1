"""Ahead-of-time compilation for the devices a program will run on, and what it costs them.

A program lowered with abstract inputs (`jax.ShapeDtypeStruct`s sharded on a mesh) compiles for the
devices of that mesh without running. With libtpu installed (the `tpu` extra), `topology_devices`
gives the compile-only devices of any TPU topology ("v5p:2x2x2", "v6e:2x2", ...) on a machine with no
TPU, and the TPU compiler then lays out the program for those chips: `memory_analysis()` gives the
bytes each chip holds, and a program that does not fit a chip fails with RESOURCE_EXHAUSTED.
`compile_and_measure` turns both outcomes into a `CompileReport`. With the CUDA build of jaxlib (the
`cuda` extra), `topology_devices("gpu:h200")` gives a compile-only GPU from a target description
(melt_jax/gpu_targets/): XLA's GPU compiler then lays out the program the GPU would run (its memory,
its kernels, its while loops), whose size it does not check against the chip; the report does.

Bytes are per device. XLA reports chip memory in binary units: the reports print GiB.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from melt_jax.errors import ConfigError
from melt_jax.platforms import describe_chipless_host

GIB = 1024**3

# The TPU compiler's message for a program that does not fit, e.g. "... exceeds available HBM (95.74G)".
_AVAILABLE_HBM = re.compile(r"available HBM \((\d+(?:\.\d+)?)([KMGT])\)")
_UNIT = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DEVICE_MEMORY = re.compile(r"device_memory_size: (\d+)")


# Target descriptions of GPUs for XLA's GPU compiler (`gpu:<name>` topologies).
GPU_TARGETS = Path(__file__).parent / "gpu_targets"


def gpu_target_config(name: str) -> str:
    """The text of the GPU target description `name`: one shipped in melt_jax/gpu_targets ("h100",
    "h200") or the path of a target_config .txtpb file. ConfigError when it is neither."""
    shipped = GPU_TARGETS / f"{name.lower()}.txtpb"
    path = shipped if shipped.is_file() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GPU_TARGETS.glob("*.txtpb")))
        raise ConfigError(f"GPU target {name!r} is neither one of {known} nor a target_config .txtpb file")
    return path.read_text()


def gpu_devices(name: str) -> list[jax.Device]:
    """One compile-only device of the GPU described by `name` (see `gpu_target_config`), for which XLA's
    GPU compiler lays out programs without a GPU (the CUDA build of jaxlib must be installed: `pip
    install -e ".[cuda]"`)."""
    from jax.experimental import topologies

    text = gpu_target_config(name)
    # No CUDA driver on a machine without a GPU: the plugin's version checks would refuse to load.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        return list(topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text).devices)
    except Exception as e:  # noqa: BLE001 - a missing plugin is a NotImplementedError, the rest runtime errors
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"cannot make a compile-only device of GPU target {name!r}: {message} "
            '(the CUDA build of jax comes with the cuda extra: pip install -e ".[cuda]"; on a machine '
            "without a GPU, JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 must be set before jax starts its backends)"
        ) from None


def topology_devices(topology: str | None) -> list[jax.Device]:
    """The devices a program is compiled for: this process's view of all devices when `topology` is
    None; the compile-only devices of the TPU topology named like "v5p:2x2x2" or "v6e:1x1" (libtpu
    must be installed: `pip install -e ".[tpu]"`); one compile-only GPU for "gpu:h200", "gpu:h100" or
    "gpu:<path of a target_config .txtpb>" (`gpu_devices`). ConfigError naming the topology when it
    is unknown or its compiler is missing."""
    if topology is None:
        return list(jax.devices())
    if topology.startswith("gpu:"):
        return gpu_devices(topology.removeprefix("gpu:"))
    from jax.experimental import topologies

    # libtpu lets one process at a time own the TPU chips of a machine (a lock file); compile-only
    # devices own no chip, so several compiling processes may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    describe_chipless_host()

    match = re.fullmatch(r"[a-z0-9]+:(\d+(?:x\d+)*)", topology)
    if match is None:
        raise ConfigError(f"TPU topology {topology!r} is not of the form 'v5p:2x2x2' (chip generation:chip grid)")
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as first:  # noqa: BLE001 - libtpu reports every problem as a runtime error
        # A topology smaller than the default host (one chip, "v6e:1x1") is one host of its own size.
        grid = [int(d) for d in match.group(1).split("x")]
        bounds = (grid + [1, 1, 1])[:3]
        try:
            return list(
                topologies.get_topology_desc(
                    topology_name=topology, platform="tpu", chips_per_host_bounds=bounds
                ).devices
            )
        except Exception:  # noqa: BLE001
            pass
        message = str(first).splitlines()[0] if str(first) else type(first).__name__
        raise ConfigError(
            f"cannot make devices of TPU topology {topology!r}: {message} "
            '(libtpu comes with the tpu extra: pip install -e ".[tpu]")'
        ) from None


def _probe_capacity(device: jax.Device) -> int | None:
    """The memory of one compile-only TPU chip, read from the compiler's message for a program that
    cannot fit any chip (a 1 PiB output)."""
    mesh = Mesh([device], ("one",))
    too_big = jax.jit(
        lambda: jnp.zeros((2**48,), jnp.float32), out_shardings=NamedSharding(mesh, PartitionSpec())
    )  # 1 PiB
    try:
        too_big.lower().compile()
    except Exception as e:  # noqa: BLE001
        found = _AVAILABLE_HBM.search(str(e))
        if found:
            return int(float(found.group(1)) * _UNIT[found.group(2)])
    return None


@functools.cache
def _capacity_of_kind(platform: str, device_kind: str, device: jax.Device) -> int | None:
    if platform == "tpu":
        return _probe_capacity(device)
    if platform == "gpu":  # a compile-only GPU: the memory its target description gives
        for path in GPU_TARGETS.glob("*.txtpb"):
            text = path.read_text()
            found = _DEVICE_MEMORY.search(text)
            if f'device_description_str: "{device_kind}"' in text and found:
                return int(found.group(1))
    return None


def device_memory_bytes(device: jax.Device) -> int | None:
    """Bytes one device can hold: the runtime's limit for a device of this process (GPU, TPU), the
    compiler's for a compile-only TPU chip, None where neither says (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - compile-only devices have no runtime statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return _capacity_of_kind(device.platform, device.device_kind, device)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What one compiled program needs on each device (bytes), or why it did not compile.

    peak = arguments + outputs - aliased (outputs that reuse donated argument buffers) + temporaries:
    what the device holds at the program's high point. `capacity` is the device's memory (None when
    unknown); `fits` is False when the compiler ran out of memory (then `error` holds its message and
    the byte counts are None)."""

    device_kind: str
    num_devices: int
    capacity: int | None
    compile_seconds: float
    fits: bool
    argument: int | None = None
    output: int | None = None
    alias: int | None = None
    temp: int | None = None
    code: int | None = None
    flops: float | None = None
    kernels: int | None = None
    while_loops: int | None = None
    conditionals: int | None = None
    kernel_writes: int | None = None  # bytes the kernels write, updates in place aside (see kernel_writes)
    error: str | None = None
    attention: str | None = None  # how the program computes attention, when the caller says

    @property
    def peak(self) -> int | None:
        if self.argument is None:
            return None
        return self.argument + self.output - self.alias + self.temp

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), peak=self.peak)

    def lines(self) -> list[str]:
        """The report as text lines, bytes in GiB."""
        where = f"{self.num_devices} x {self.device_kind}"
        capacity = "unknown" if self.capacity is None else f"{self.capacity / GIB:.2f} GiB"
        head = [f"devices        {where}, memory per device {capacity}", f"compile        {self.compile_seconds:.1f} s"]
        if self.attention is not None:
            head.append(f"attention      {self.attention}")
        if not self.fits:
            return [*head, "fits           NO", f"why            {self.error}"]
        gib = format_bytes
        body = [
            f"arguments      {gib(self.argument)}",
            f"outputs        {gib(self.output)}",
            f"aliased        {gib(self.alias)}   (outputs in donated argument buffers)",
            f"temporaries    {gib(self.temp)}",
            f"peak           {gib(self.peak)}"
            + ("" if self.capacity is None else f"   {100 * self.peak / self.capacity:.1f}% of the device"),
            f"code           {gib(self.code)}",
            f"flops          {self.flops:.4g} per device" if self.flops is not None else "flops          unknown",
            f"program        {self.kernels} kernels, {self.while_loops} while loops, {self.conditionals} conditionals",
            f"kernels write  {gib(self.kernel_writes)}   (updates in place aside)",
            "fits           yes",
        ]
        return head + body


def format_bytes(num_bytes: int) -> str:
    """Bytes in GiB, or MiB below 1 GiB, right-aligned to 10 places."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:10.3f} GiB"
    return f"{num_bytes / 1024**2:10.3f} MiB"


_KERNEL = re.compile(r" (?:fusion|custom-call)\(")
_WHILE = re.compile(r" while\(")
_CONDITIONAL = re.compile(r" conditional\(")
# One instruction's line: "[ROOT ]%name = <shape> <op>(...": its name, result shape(s) and op.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _array_bytes(shape_text: str) -> list[int]:
    """Bytes of each array in an HLO shape such as "(f32[2,3]{1,0}, bf16[4]{0})"."""
    sizes = []
    for dtype, dims in _ARRAY.findall(shape_text):
        bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype) or 0)
        if bits:  # token[] and the like hold no data
            sizes.append(math.prod(int(d) for d in dims.split(",") if d) * max(bits // 8, 1))
    return sizes


def kernel_writes(hlo_text: str) -> int:
    """Bytes the kernels of a compiled program (`compiled.as_text()`) write to device memory, each
    counted once where it is written: the sum of their results, except the results of
    dynamic-update-slice kernels (updates in place: a cache written a row at a time), counted as
    nothing. A decoding step that writes much more than its logits and new rows materialises
    intermediates that a kernel reads back: traffic on top of the weights and cache it must read."""
    written = 0
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match and match.group(3) in ("fusion", "custom-call") and "dynamic_update_slice" not in match.group(1):
            written += sum(_array_bytes(match.group(2)))
    return written


def program_counts(hlo_text: str) -> dict[str, int]:
    """Counts in a compiled program's text (`compiled.as_text()`): kernels (fusions and custom calls:
    what a GPU launches), while loops and conditionals (where a GPU's host waits on the device for a
    predicate), each counted once where it is written, not once per iteration; and the bytes the
    kernels write (`kernel_writes`)."""
    return dict(
        kernels=len(_KERNEL.findall(hlo_text)),
        while_loops=len(_WHILE.findall(hlo_text)),
        conditionals=len(_CONDITIONAL.findall(hlo_text)),
        kernel_writes=kernel_writes(hlo_text),
    )


def is_out_of_memory(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def _first_line_with(text: str, needle: str) -> str:
    return next((line.strip() for line in text.splitlines() if needle in line), text.strip().splitlines()[0])


def compile_and_measure(lower: Callable[[], jax.stages.Lowered], devices: Sequence[jax.Device]) -> CompileReport:
    """Lowers and compiles a program (`lower()` returns it lowered for `devices`) and reports its
    per-device memory, or that it does not fit; other compile errors propagate."""
    capacity = device_memory_bytes(devices[0])
    base = dict(device_kind=devices[0].device_kind, num_devices=len(devices), capacity=capacity)
    started = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:  # noqa: BLE001 - only out-of-memory is an answer; the rest is re-raised
        if not is_out_of_memory(e):
            raise
        seconds = time.perf_counter() - started
        return CompileReport(**base, compile_seconds=seconds, fits=False, error=_first_line_with(str(e), "memory"))
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) and cost else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    report = CompileReport(
        **base,
        compile_seconds=seconds,
        fits=True,
        argument=int(memory.argument_size_in_bytes),
        output=int(memory.output_size_in_bytes),
        alias=int(memory.alias_size_in_bytes),
        temp=int(memory.temp_size_in_bytes),
        code=int(memory.generated_code_size_in_bytes),
        flops=flops,
        **program_counts(compiled.as_text()),
    )
    if capacity is not None and report.peak > capacity:  # CPU/GPU compilers do not refuse such programs
        return dataclasses.replace(
            report,
            fits=False,
            error=f"peak {report.peak / GIB:.2f} GiB exceeds the device's {capacity / GIB:.2f} GiB",
        )
    return report


def abstract_arrays(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
