"""How melt-train's processes join (train/distributed.py): when jax.distributed.initialize is called,
with which arguments, and gloo CPU collectives only on the CPU backend. Decided from flags and
environment variables alone, so it is tested here without a cluster; the 2-process run itself is in
tests/test_training.py."""

import jax
import pytest

from melt_jax.train import distributed
from melt_jax.train.cli import main as train_main
from melt_jax.train.config import RunConfigError
from melt_jax.train.distributed import DistributedStart, distributed_start

SLURM = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-4]", SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_LOCALID="0")
OPEN_MPI = dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.0.0.1:34911", OMPI_COMM_WORLD_SIZE="2")


def start(mode="auto", coordinator=None, num_processes=1, process_id=0, environ=None, on_tpu_vm=False):
    return distributed_start(mode, coordinator, num_processes, process_id, environ or {}, on_tpu_vm)


def test_one_process_on_a_plain_machine_joins_nothing():
    assert start() is None
    assert start(environ=dict(SLURM, SLURM_NTASKS="1")) is None  # a SLURM job of one task
    assert start(environ=dict(OPEN_MPI, OMPI_COMM_WORLD_SIZE="1")) is None
    assert start(environ={"SLURM_NTASKS": "4"}) is None  # outside an srun step


@pytest.mark.parametrize(
    "environ, on_tpu_vm, reason",
    [(SLURM, False, "SLURM step of 4 tasks"), (OPEN_MPI, False, "Open MPI with 2 ranks"), ({}, True, "TPU VM")],
)
def test_a_multi_process_environment_is_left_to_jax_to_detect(environ, on_tpu_vm, reason):
    joined = start(environ=environ, on_tpu_vm=on_tpu_vm)
    assert joined.arguments == {} and reason in joined.reason  # jax.distributed.initialize() without arguments
    assert start("off", environ=environ, on_tpu_vm=on_tpu_vm) is None


def test_flags_name_the_processes_and_on_forces_a_start():
    joined = start(coordinator="host0:1234", num_processes=2, process_id=1, environ=SLURM)
    assert joined.arguments == dict(coordinator_address="host0:1234", num_processes=2, process_id=1)
    assert start("on") == DistributedStart({}, "--distributed on")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_processes=2), "--num-processes > 1 needs --coordinator HOST:PORT"),
        (dict(mode="off", coordinator="h:1", num_processes=2), "--distributed off runs one process"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), r"--process-id must be in \[0, --num-processes=2\)"),
        (dict(num_processes=0), "--num-processes must be >= 1"),
    ],
)
def test_contradicting_flags_are_bad_input(kwargs, message):
    with pytest.raises(RunConfigError, match=message):
        start(**kwargs)


@pytest.mark.parametrize("platforms, gloo", [("cpu", True), ("tpu", False), ("cuda,cpu", False)])
def test_gloo_collectives_only_on_the_cpu_backend(monkeypatch, platforms, gloo):
    calls = []
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(("initialize", kw)))
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    distributed.initialize_distributed(DistributedStart({}, "test"))
    expected = [("jax_cpu_collectives_implementation", "gloo")] if gloo else []
    assert calls == [*expected, ("initialize", {})]


def test_the_command_line_reports_bad_flags(tmp_path, capsys):
    assert train_main(["stage", f"output_dir={tmp_path / 'run'}", "--num-processes", "2"]) == 2
    assert "--num-processes > 1 needs --coordinator" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exited:
        train_main(["stage", "--distributed", "sometimes"])
    assert exited.value.code == 2
