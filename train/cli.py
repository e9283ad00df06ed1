"""Command line of the training program.

    melt-train stage    [--config FILE] [field=value ...]   one stage (see melt_jax.train.config)
    melt-train pipeline [--config FILE] [field=value ...]   teacher -> MELT phase 1 -> phase 2 -> report
                        (teacher=CKPT: distill that trained LoopLM instead of training one)
    melt-train compile  [--config FILE] [--topology v5p:2x2x2] [field=value ...]
                        compiles one stage's training step without running it and prints what each
                        device holds; exit status 0 when it fits, 1 when it does not
    melt-train show-config [stage|pipeline]
                        every field of the stage's (default) or the pipeline's config, with its
                        default and meaning
    melt-train tokenize SOURCE OUTPUT [--tokenizer byte|PATH] [--text-field text] [--workers N]
                        tokenizes a .txt/.json/.jsonl/.parquet file or folder (or a hub dataset, streamed)
                        once into the tokenized folder OUTPUT (ArrayRecord shards + manifest.json), which
                        a stage reads with data.source=OUTPUT (melt_jax.data.tokenized)

Several processes (one per host) join through jax.distributed (train/distributed.py): on a TPU VM,
in a SLURM step of several tasks or under Open MPI with several ranks by themselves (--distributed
auto, the default), elsewhere with --coordinator HOST:PORT --num-processes N --process-id I; on CPU
devices with gloo collectives. --distributed off runs one process whatever the environment says.

Errors print `melt-train: error: ...` on stderr and exit with status 2 for bad input, 1 for a run
that failed once started (melt_jax.errors.exit_status); a run that fails leaves no output directory
it created and left empty. A rerun into an output_dir trained with other settings is bad input
(--accept-changes continues it with the new ones where they may change: step counts, schedules,
learning rates). SIGINT and SIGTERM save a checkpoint at the step reached and exit with status 128 +
the signal's number (130, 143).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from melt_jax.data.tokenized import tokenize_to_shards
from melt_jax.errors import DataError, MeltJaxError, exit_status

from .compile import compile_stage
from .config import RunConfigError, load_train_config
from .config_docs import show_config
from .distributed import MODES, start_from_environment
from .pipeline import load_pipeline_config, run_pipeline
from .signals import StageInterrupted
from .trainer import StageResult, run_stage

COMMANDS = ("stage", "pipeline", "compile", "show-config", "tokenize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melt-train",
        description="Train LoopLM teachers and distill them into MELT.",
        epilog="`melt-train show-config stage` and `melt-train show-config pipeline` list every config field "
        "with its default and meaning.",
    )
    parser.add_argument(
        "command",
        choices=COMMANDS,
        help="one stage, the whole pipeline, one stage's step compiled to read its memory, the config "
        "fields (show-config [stage|pipeline]), or a corpus tokenized into shards (tokenize SOURCE OUTPUT)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides field=value (e.g. steps=200 optimizer.learning_rate=3e-4; on the pipeline "
        "train.batch_size=32); tokenize: SOURCE OUTPUT",
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
    parser.add_argument(
        "--distributed",
        choices=MODES,
        default="auto",
        help="join the processes of a multi-host run through jax.distributed: auto (default) on a TPU VM, "
        "in a SLURM step of several tasks, under Open MPI with several ranks, or with --num-processes > 1; "
        "on: always; off: never (one process)",
    )
    tokenize = parser.add_argument_group("tokenize")
    tokenize.add_argument("--tokenizer", default="byte", help='"byte" (default) or a tokenizer.json file or folder')
    tokenize.add_argument("--text-field", default="text", help="the records' text field (default: text)")
    tokenize.add_argument("--split", default="train", help="a hub dataset's split (default: train)")
    tokenize.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    tokenize.add_argument(
        "--piece-mb", type=int, default=64, help=".txt/.jsonl files are split into pieces of this size, one shard each"
    )
    tokenize.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for a run over several processes")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    return parser


def format_stage_result(stage: str, result: StageResult) -> str:
    """The table `melt-train stage` ends with: steps, time, the final held-out evaluation (per-loop
    loss and accuracy, loops numbered from 0) and where the model is."""
    lines = [f"[{stage}] {result.steps} steps in {result.seconds:.0f} s; model saved to {result.model_dir}"]
    ev = result.evaluation
    if not ev:
        return "\n".join([*lines, "no held-out evaluation (eval_batches=0)"])
    accuracy = ev.get("accuracy_per_loop")
    lines += ["", "| loop | held-out loss | held-out accuracy |", "|---:|---:|---:|"]
    for t, loss in enumerate(ev["loss_per_loop"]):
        lines.append(f"| {t} | {loss:.4f} | {'-' if accuracy is None else f'{accuracy[t]:.3f}'} |")
    tokens = f"{ev['num_tokens']:.0f} {ev.get('tokens_scored', 'scored')} tokens"
    examples = f", accuracy on {ev['num_examples']} examples" if "num_examples" in ev else ""
    return "\n".join([*lines, f"({tokens}{examples}; loops numbered from 0)"])


@contextlib.contextmanager
def removed_if_left_empty(directory: str):
    """Removes `directory` (and the empty folders it holds, and the parents made for it) when the
    block fails and `directory` did not exist before it and holds no file: a failed start leaves
    nothing behind."""
    path = Path(directory).absolute()
    existed = path.exists()
    while not path.parent.exists():
        path = path.parent
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            for folder, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
                os.rmdir(folder)
        raise


def run_tokenize(args: argparse.Namespace) -> int:
    """`melt-train tokenize SOURCE OUTPUT`: prints what was written and the tokens per second."""
    if len(args.overrides) != 2:
        raise DataError(f"tokenize takes SOURCE OUTPUT, got {' '.join(args.overrides) or 'nothing'}")
    source, output = args.overrides
    report = tokenize_to_shards(
        source,
        output,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        split=args.split,
        workers=args.workers,
        piece_bytes=args.piece_mb << 20,
        overwrite=args.overwrite,
    )
    print(
        f"{report.num_documents} documents, {report.num_tokens} tokens in {report.num_shards} shards written to "
        f"{report.output} in {report.seconds:.1f} s ({report.tokens_per_second:,.0f} tokens/s)"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "tokenize":
        return run_tokenize(args)
    if args.command == "show-config":
        kinds = args.overrides or ["stage"]
        if len(kinds) != 1 or kinds[0] not in ("stage", "pipeline"):
            raise RunConfigError(f"show-config takes 'stage' or 'pipeline', got {' '.join(kinds)}")
        print(show_config(kinds[0]))
        return 0
    start_from_environment(args.distributed, args.coordinator, args.num_processes, args.process_id)
    if args.topology is not None and args.command != "compile":
        raise RunConfigError("--topology is an option of melt-train compile")
    if args.command == "compile":
        report = compile_stage(load_train_config(args.config, args.overrides), args.topology)
        print("\n".join(report.lines()))
        return 0 if report.fits else 1
    if args.command == "pipeline":
        config = load_pipeline_config(args.config, args.overrides)
        with removed_if_left_empty(config.output_dir):
            summary = run_pipeline(config, accept_changes=args.accept_changes)
        return 0 if summary["within_margin"] else 1
    config = load_train_config(args.config, args.overrides)
    with removed_if_left_empty(config.output_dir):
        result = run_stage(config, accept_changes=args.accept_changes)
    print(format_stage_result(config.stage, result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        return _run(args)
    except (MeltJaxError, OSError) as e:
        return exit_status("melt-train", e)
    except StageInterrupted as e:
        print(f"melt-train: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
