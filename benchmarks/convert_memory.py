"""Peak host memory of the checkpoint converter on a large synthetic Ouro checkpoint.

Builds a bf16 Hugging Face checkpoint with the real shapes of Ouro-2.6B (5.3 GB; `--preset ouro-1.4b`
for 2.9 GB, `--layers N` for another depth), then runs the command line converter in a child process:

    import HF -> melt_jax (orbax) checkpoint    (--dtype, default bfloat16)
    export melt_jax checkpoint -> HF            (bf16, default 5 GB shards)

and prints, for each, the child's peak resident memory (max RSS) next to the size of the params, and
the RSS of a child that only imports the same modules (the fixed cost of Python + jax + orbax). All
files are deleted at the end (unless --keep).

    python benchmarks/convert_memory.py [--preset ouro-2.6b] [--dir /tmp] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from melt_jax.checkpoint import numpy_dtype
from melt_jax.convert.hf_export import write_safetensors
from melt_jax.convert.mapping import hf_tensor_plan
from melt_jax.dtypes import STORABLE_NAMES
from melt_jax.model import OuroConfig

GB = 1e9


def run_child(args: list[str]) -> tuple[float, float]:
    """Runs `python args...` in a child process: (peak RSS of the child in bytes, seconds).

    The peak is read with GNU time (-f %M, in KiB), which measures only this child.
    """
    start = time.perf_counter()
    cmd = ["/usr/bin/time", "-f", "maxrss_kib=%M", sys.executable, *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    line = [l for l in result.stderr.splitlines() if l.startswith("maxrss_kib=")][-1]
    return int(line.split("=")[1]) * 1024, seconds


def write_synthetic_checkpoint(folder: Path, config: OuroConfig) -> int:
    """Writes config.json + model.safetensors of random-looking bf16 weights; returns the file size.

    Values are slices of one 128 MB pool of random bf16 numbers in +-[0.0078, 1) (generating 2.7
    billion fresh random numbers would dominate the run time and measures nothing more).
    """
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config.to_json_string())
    rng = np.random.default_rng(0)
    pool_size = 64 * 2**20
    pool = rng.integers(0x3C00, 0x3F80, size=pool_size, dtype=np.uint16)
    pool |= rng.integers(0, 2, size=pool_size, dtype=np.uint16) << 15  # random sign
    pool = pool.view(numpy_dtype("bfloat16"))
    plan = hf_tensor_plan(config)
    shapes = {t.name: t.rule.hf_tensor_shape(config) for t in plan}
    offsets = iter(range(0, 10**12, 7919))

    def fetch(name: str) -> np.ndarray:
        shape = shapes[name]
        n = math.prod(shape)
        rolled = np.roll(pool, -(next(offsets) % pool_size))  # a per-tensor starting point
        out = np.empty(n, pool.dtype)
        for k in range(0, n, pool_size):  # tile the pool
            m = min(pool_size, n - k)
            out[k : k + m] = rolled[:m]
        return out.reshape(shape)

    write_safetensors(
        folder / "model.safetensors", [(t.name, shapes[t.name]) for t in plan], "bfloat16", fetch, {"format": "pt"}
    )
    return (folder / "model.safetensors").stat().st_size


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ouro-2.6b", help="config preset with the real shapes (default ouro-2.6b)")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smaller runs)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(STORABLE_NAMES), help="import dtype")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the files (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()

    overrides = {"torch_dtype": "bfloat16"}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    config = OuroConfig.preset(args.preset, **overrides)
    num_params = sum(math.prod(t.rule.hf_tensor_shape(config)) for t in hf_tensor_plan(config))
    need = num_params * (2 + numpy_dtype(args.dtype).itemsize + 2) * 1.05
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"need {need / GB:.1f} GB free in {args.dir}, have {free / GB:.1f} GB; try --layers")

    work = Path(tempfile.mkdtemp(prefix="melt_convert_memory_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        hf_bytes = write_synthetic_checkpoint(work / "hf", config)
        print(
            f"synthetic {args.preset} (L={config.num_hidden_layers}) bf16 checkpoint: {num_params:,} parameters, "
            f"{hf_bytes / GB:.2f} GB, written in {time.perf_counter() - t0:.0f} s"
        )

        base_rss, _ = run_child(["-c", "import melt_jax.convert.cli, melt_jax.checkpoint, orbax.checkpoint, jax"])
        print(f"baseline (python + jax + orbax + converter imported): peak RSS {base_rss / GB:.2f} GB")

        params_bytes = num_params * numpy_dtype(args.dtype).itemsize
        rss, seconds = run_child(
            ["-m", "melt_jax.convert", "import", str(work / "hf"), str(work / "ckpt"), "--dtype", args.dtype]
        )
        print(
            f"import -> {args.dtype} orbax: peak RSS {rss / GB:.2f} GB for {params_bytes / GB:.2f} GB of params "
            f"(ratio {rss / params_bytes:.2f}; {(rss - base_rss) / params_bytes:.2f} above baseline), "
            f"checkpoint {hf_bytes / GB:.2f} GB -> orbax {dir_size(work / 'ckpt') / GB:.2f} GB, {seconds:.0f} s"
        )

        rss, seconds = run_child(
            ["-m", "melt_jax.convert", "export", str(work / "ckpt"), str(work / "out"), "--dtype", "bfloat16"]
        )
        out_bytes = dir_size(work / "out")
        print(
            f"export {args.dtype} orbax -> bf16 HF: peak RSS {rss / GB:.2f} GB "
            f"for {params_bytes / GB:.2f} GB of params "
            f"(ratio {rss / params_bytes:.2f}; {(rss - base_rss) / params_bytes:.2f} above baseline), "
            f"{out_bytes / GB:.2f} GB written, {seconds:.0f} s"
        )
    finally:
        if args.keep:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
