"""How the processes of a melt-train run join (jax.distributed), one per host.

`--distributed auto` (the default) joins them when the command line names them (`--coordinator HOST:PORT
--num-processes N --process-id I`) or when the environment is one jax's own cluster detection reads: a
TPU VM (every host of a pod slice runs the same command; one host is a slice of one process), a SLURM
step of several tasks (srun), or Open MPI with several ranks (mpirun). There
jax.distributed.initialize() is called with no arguments, and jax finds the coordinator, the number of
processes and this one's id. `--distributed on` calls it whatever the environment says,
`--distributed off` never (one process). A single process on a CPU or a GPU host calls nothing.

Collectives between the CPU devices of several processes need an implementation (gloo); it is set only
when the run's backend is the CPU, since TPUs and GPUs bring their own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

from melt_jax.platforms import runs_on_cpu, tpu_chips_visible
from melt_jax.train.config import RunConfigError

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedStart:
    """A call of jax.distributed.initialize: its keyword arguments ({}: jax detects them from the
    environment) and why it is made, in words."""

    arguments: dict
    reason: str


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1"))
    except ValueError:
        return 1


def detected_cluster(environ: Mapping[str, str], on_tpu_vm: bool) -> str | None:
    """The multi-process environment jax.distributed.initialize() would detect, in words (None: none).
    The variables are those jax's cluster detection reads (jax/_src/clusters)."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in environ for name in slurm) and _int(environ, "SLURM_NTASKS") > 1:
        return f"a SLURM step of {environ['SLURM_NTASKS']} tasks"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI with {environ['OMPI_COMM_WORLD_SIZE']} ranks"
    if on_tpu_vm:
        return "a TPU VM (the hosts of its slice)"
    return None


def distributed_start(
    mode: str,
    coordinator: str | None,
    num_processes: int,
    process_id: int,
    environ: Mapping[str, str],
    on_tpu_vm: bool,
) -> DistributedStart | None:
    """How this process joins the run (None: it runs alone), from the --distributed mode, the
    --coordinator/--num-processes/--process-id flags and the environment (see the module docstring).
    RunConfigError for flags that contradict each other."""
    if mode not in MODES:
        raise RunConfigError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if num_processes < 1:
        raise RunConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise RunConfigError(f"--process-id must be in [0, --num-processes={num_processes}), got {process_id}")
    if num_processes > 1:
        if mode == "off":
            raise RunConfigError(f"--distributed off runs one process, but --num-processes is {num_processes}")
        if not coordinator:
            raise RunConfigError("--num-processes > 1 needs --coordinator HOST:PORT")
        arguments = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return DistributedStart(arguments, f"process {process_id} of {num_processes} (--coordinator {coordinator})")
    if mode == "off":
        return None
    if mode == "on":
        return DistributedStart({}, "--distributed on")
    cluster = detected_cluster(environ, on_tpu_vm)
    return None if cluster is None else DistributedStart({}, cluster)


def initialize_distributed(start: DistributedStart | None) -> None:
    """Joins the processes of the run as `start` says (nothing for None); CPU collectives over gloo
    only when the backend is the CPU."""
    if start is None:
        return
    if runs_on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**start.arguments)


def start_from_environment(mode: str, coordinator: str | None, num_processes: int, process_id: int) -> None:
    """distributed_start on this machine's environment, then initialize_distributed."""
    on_tpu_vm = mode == "auto" and num_processes <= 1 and not runs_on_cpu() and tpu_chips_visible()
    initialize_distributed(distributed_start(mode, coordinator, num_processes, process_id, os.environ, on_tpu_vm))
