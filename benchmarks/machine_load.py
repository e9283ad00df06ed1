"""How busy the machine was during a benchmark run (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_line() -> str:
    """'machine: <cpu>, <n> usable cores, load average at start <l>' for a benchmark's header."""
    return (
        f"machine: {platform.processor() or platform.machine()}, {usable_cores()} usable cores, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )


def cpu_times() -> list[int] | None:
    """The aggregate 'cpu' line of /proc/stat (jiffies: user nice system idle iowait irq softirq steal
    ...), or None where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def busy_report(start: list[int] | None) -> str:
    """How busy the machine was since `start`: this run shares it with other work."""
    end = cpu_times()
    if start is None or end is None:
        return "machine load during the run: unknown"
    delta = [b - a for a, b in zip(start, end)]
    total = sum(delta[:8]) or 1
    busy = total - delta[3] - delta[4]
    return (
        f"machine during the run: {100 * busy / total:.0f}% of CPU time busy (all processes), "
        f"{100 * delta[7] / total:.1f}% stolen by the hypervisor; load average now {os.getloadavg()[0]:.2f}"
    )
