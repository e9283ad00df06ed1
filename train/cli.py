"""Command line of the training program.

    melt-train stage    [--config FILE] [field=value ...]   one stage (see melt_jax.train.config)
    melt-train pipeline [--config FILE] [field=value ...]   teacher -> MELT phase 1 -> phase 2 -> report
    melt-train compile  [--config FILE] [--topology v5p:2x2x2] [field=value ...]
                        compiles one stage's training step without running it and prints what each
                        device holds; exit status 0 when it fits, 1 when it does not

Several processes (one per host) join with --coordinator HOST:PORT --num-processes N --process-id I
(jax.distributed; on CPU with gloo collectives). Bad input exits with status 2 and a message naming it,
among it a rerun into an output_dir trained with other settings (--accept-changes continues it with
the new ones where they may change: step counts, schedules, learning rates). SIGINT and SIGTERM save a
checkpoint at the step reached and exit with status 128 + the signal's number (130, 143).
"""

from __future__ import annotations

import argparse
import sys

import jax

from melt_jax.errors import MeltJaxError

from .compile import compile_stage
from .config import RunConfigError, load_train_config
from .pipeline import load_pipeline_config, run_pipeline
from .signals import StageInterrupted
from .trainer import run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melt-train", description="Train LoopLM teachers and distill them into MELT.")
    parser.add_argument(
        "command",
        choices=("stage", "pipeline", "compile"),
        help="one stage, the whole pipeline, or one stage's step compiled to read its memory",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides field=value (e.g. steps=200 optimizer.learning_rate=3e-4)"
    )
    parser.add_argument("--config", help="a JSON or YAML config file")
    parser.add_argument(
        "--topology",
        help="compile: a TPU topology to compile for, e.g. v5p:2x2x2 or v6e:1x1 (needs the tpu extra), or one "
        "GPU, gpu:h200 or gpu:h100 (needs the cuda extra); default: this machine's devices",
    )
    parser.add_argument(
        "--accept-changes",
        action="store_true",
        help="stage, pipeline: continue a run in output_dir with changed step counts, schedules or "
        "learning rates (without it, a rerun with other settings than the run's stops)",
    )
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for a run over several processes")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    return parser


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins the processes of a multi-process run (nothing to do for one process)."""
    if args.num_processes <= 1:
        return
    if not args.coordinator:
        raise RunConfigError("--num-processes > 1 needs --coordinator HOST:PORT")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        initialize_distributed(args)
        if args.topology is not None and args.command != "compile":
            raise RunConfigError("--topology is an option of melt-train compile")
        if args.command == "compile":
            report = compile_stage(load_train_config(args.config, args.overrides), args.topology)
            print("\n".join(report.lines()))
            return 0 if report.fits else 1
        if args.command == "pipeline":
            config = load_pipeline_config(args.config, args.overrides)
            summary = run_pipeline(config, accept_changes=args.accept_changes)
            return 0 if summary["within_margin"] else 1
        result = run_stage(load_train_config(args.config, args.overrides), accept_changes=args.accept_changes)
        print(f"[{args.command}] {result.steps} steps in {result.seconds:.0f} s; model saved to {result.model_dir}")
        print(f"evaluation: {result.evaluation}")
        return 0
    except (MeltJaxError, FileNotFoundError) as e:
        print(f"melt-train: error: {e}", file=sys.stderr)
        return 2
    except StageInterrupted as e:
        print(f"melt-train: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
