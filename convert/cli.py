"""Command line of the converter: `melt-convert` / `python -m melt_jax.convert`.

    melt-convert import HF_DIR OUT_DIR [--dtype float32|bfloat16|float16] [--overwrite]
        Hugging Face Ouro folder -> melt_jax checkpoint directory (orbax, see melt_jax/checkpoint.py).
    melt-convert export CKPT_DIR HF_DIR [--dtype ...] [--max-shard-size 5GB] [--overwrite]
        melt_jax checkpoint directory -> Hugging Face folder (config.json + safetensors), in the
        checkpoint's dtype unless --dtype says otherwise.

The tokenizer and generation files of the source (tokenizer.json, tokenizer_config.json,
generation_config.json, ...: melt_jax.checkpoint.GENERATION_FILES) are copied with the weights by every
command, so that a converted checkpoint generates without --tokenizer.

Progress goes to stderr, a one-line summary to stdout. Bad input prints `melt-convert: error: ...` to
stderr and exits with status 2, a failure while writing (a full disk) with status 1, leaving no output
behind (melt_jax.errors.exit_status, the convention of every melt_jax command line).
"""

from __future__ import annotations

import argparse
import re
import time

from melt_jax.checkpoint import check_destination, generation_files, load_params, numpy_dtype, save_params
from melt_jax.dtypes import STORABLE_NAMES
from melt_jax.errors import MeltJaxError, exit_status
from melt_jax.model.params import count_params

from .hf_export import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint, stored_dtype
from .hf_import import load_hf_checkpoint
from .mapping import hf_tensor_plan

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024 (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _format_bytes(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _summary(action: str, config, params, dtype: str, seconds: float, dest: str) -> str:
    """One line: tensors, parameters, bytes (in `dtype`), seconds."""
    num_params = count_params(params)
    num_bytes = num_params * numpy_dtype(dtype).itemsize
    return (
        f"{action}: {len(hf_tensor_plan(config))} tensors, {num_params:,} parameters, "
        f"{_format_bytes(num_bytes)} ({dtype}), {seconds:.1f} s -> {dest}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melt-convert",
        description=(
            "Convert Ouro and MELT checkpoints between Hugging Face format and melt_jax (orbax) checkpoints, "
            "and initialise MELT from Ouro."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = sorted(STORABLE_NAMES)

    p = sub.add_parser("import", help="Hugging Face folder -> melt_jax checkpoint directory")
    p.add_argument(
        "hf_dir", metavar="HF_DIR", help="folder with config.json and model.safetensors / shards / pytorch_model.bin"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="melt_jax checkpoint directory to create")
    p.add_argument("--dtype", choices=dtypes, default="float32", help="dtype of the params (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("export", help="melt_jax checkpoint directory -> Hugging Face folder")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="melt_jax checkpoint directory")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face folder to create")
    p.add_argument(
        "--dtype", choices=dtypes, default=None, help="dtype of the stored tensors (default: the checkpoint's)"
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        metavar="SIZE",
        help="largest safetensors file before sharding, e.g. 5GB (default), 500MB, 2GiB",
    )
    p.add_argument("--overwrite", action="store_true", help="replace HF_DIR if it exists")

    p = sub.add_parser("to-melt", help="melt_jax Ouro checkpoint -> MELT checkpoint with initialised gates")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="melt_jax checkpoint directory of an Ouro model")
    p.add_argument("out_dir", metavar="OUT_DIR", help="MELT checkpoint directory to create")
    p.add_argument("--gate-bias", type=float, default=-4.0, help="initial b_z of every gate (default: -4)")
    p.add_argument("--chunk-size", type=int, default=128, help="default prefill/training chunk (default: 128)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def run_import(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    check_destination(args.out_dir, args.overwrite)  # fail before reading gigabytes
    config, params = load_hf_checkpoint(args.hf_dir, args.dtype, progress=True)
    files = generation_files(args.hf_dir)
    save_params(args.out_dir, config, params, overwrite=args.overwrite, files=files)
    return _summary("import", config, params, args.dtype, time.perf_counter() - start, args.out_dir)


def run_export(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    check_destination(args.hf_dir, args.overwrite)
    config, params = load_params(args.ckpt_dir)
    dtype = args.dtype or stored_dtype(config, params)
    save_hf_checkpoint(
        config,
        params,
        args.hf_dir,
        dtype,
        args.max_shard_size,
        overwrite=args.overwrite,
        progress=True,
        files=generation_files(args.ckpt_dir),
    )
    return _summary("export", config, params, dtype, time.perf_counter() - start, args.hf_dir)


def run_to_melt(args: argparse.Namespace) -> str:
    from melt_jax.model.ouro_to_melt import melt_from_ouro

    start = time.perf_counter()
    check_destination(args.out_dir, args.overwrite)
    ouro_config, ouro_params = load_params(args.ckpt_dir)
    config, params = melt_from_ouro(ouro_config, ouro_params, gate_bias_init=args.gate_bias, chunk_size=args.chunk_size)
    save_params(args.out_dir, config, params, overwrite=args.overwrite, files=generation_files(args.ckpt_dir))
    return _summary("to-melt", config, params, config.param_dtype, time.perf_counter() - start, args.out_dir)


COMMANDS = {"import": run_import, "export": run_export, "to-melt": run_to_melt}


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        summary = COMMANDS[args.command](args)
    except (MeltJaxError, OSError) as e:
        return exit_status("melt-convert", e)
    print(summary)
    return 0
