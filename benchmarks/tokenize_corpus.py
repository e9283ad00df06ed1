"""Tokens per second and peak host memory of tokenizing a corpus into shards (`melt-train tokenize`).

    python benchmarks/tokenize_corpus.py [--size-mb 1024] [--workers N] [--piece-mb 64] [--keep DIR]

Writes a .jsonl corpus of about `--size-mb` MB into a temporary folder (records {"text": ...} of 200 to
4,000 characters of random lowercase words, drawn with a fixed seed), then tokenizes it with the byte
tokenizer through `melt_jax.data.tokenized.tokenize_to_shards`, the function the command calls, with
`--workers` processes. Printed: one JSON line with

  size_mb, documents, tokens, shards, workers     what was tokenized
  seconds, tokens_per_s                           wall time of tokenize_to_shards (start of the worker
                                                  processes, reading, tokenizing, writing, renaming)
  peak_rss_mb_main                                getrusage(RUSAGE_SELF).ru_maxrss of this process
  peak_rss_mb_worker                              getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest
                                                  resident set of any one worker process
  peak_rss_mb_total_bound                         main + workers x the largest worker: a bound on what
                                                  the processes held at any one moment
  output_mb                                       bytes of the tokenized folder (shards are compressed)

The corpus is written before the measured part; its writing is not timed, and it holds at most one
record in memory at a time. The temporary folder is removed at the end unless `--keep` names a folder
to write the corpus and output into.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from melt_jax.data.tokenized import tokenize_to_shards


def write_corpus(path: Path, size_mb: int, seed: int = 0) -> int:
    """A .jsonl file of about `size_mb` MB of random-word records; returns the records written."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    # A pool of records reused in shuffled order: generating every record anew would dominate the run.
    pool = []
    for _ in range(2048):
        chars = letters[rng.integers(0, 26, int(rng.integers(200, 4000)))]
        chars[rng.random(len(chars)) < 0.18] = ord(" ")
        pool.append((json.dumps({"text": chars.tobytes().decode()}) + "\n").encode())
    target, written, records = size_mb << 20, 0, 0
    with open(path, "wb") as f:
        while written < target:
            for i in rng.permutation(len(pool)):
                f.write(pool[i])
                written += len(pool[i])
                records += 1
                if written >= target:
                    break
    return records


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--piece-mb", type=int, default=64)
    parser.add_argument("--keep", help="write the corpus and output here and keep them")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        corpus = root / "corpus.jsonl"
        started = time.perf_counter()
        write_corpus(corpus, args.size_mb)
        print(f"# corpus of {corpus.stat().st_size / 2**20:.0f} MB written in {time.perf_counter() - started:.0f} s")
        print(f"# {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}")
        report = tokenize_to_shards(
            str(corpus), root / "tokens", workers=args.workers, piece_bytes=args.piece_mb << 20, overwrite=True
        )
        main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = {
            "size_mb": round(corpus.stat().st_size / 2**20, 1),
            "documents": report.num_documents,
            "tokens": report.num_tokens,
            "shards": report.num_shards,
            "workers": args.workers,
            "seconds": round(report.seconds, 2),
            "tokens_per_s": round(report.tokens_per_second),
            "peak_rss_mb_main": round(main_mb, 1),
            "peak_rss_mb_worker": round(worker_mb, 1),
            "peak_rss_mb_total_bound": round(main_mb + args.workers * worker_mb, 1),
            "output_mb": round(folder_bytes(report.output) / 2**20, 1),
        }
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
