"""Dense ("xla") against blockwise attention on CPU: forward + backward time and XLA's temporary memory.

Causal self-attention of one sequence (B = 1, 4 query heads and 2 key/value heads of 64, float32,
the model's head layout) through `melt_jax.model.attention.attend`, at S = 1,024 and 8,192 tokens
(`--lengths`). Timed: the jitted gradient of sum(attend(q, k, v) * w) with respect to q, k and v
(one forward and one backward), and the jitted forward alone; each after a warm-up call, the two
implementations run alternately repeat by repeat, medians reported. Memory: `temp_size_in_bytes` of
the compiled gradient's `memory_analysis()`, against the S * S * 4 bytes of one head's dense float32
logits. The two implementations' gradients are compared (max abs diff), so the timings are of the
same computation.

Target (the attention issue): blockwise no slower than dense at 1,024 tokens, faster at 8,192.

    python benchmarks/attention_speed.py [--lengths 1024 8192] [--repeats 3] [--block 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine_load import busy_report, cpu_times, machine_line  # noqa: E402

from melt_jax.model.attention import Implementation, attend, causal_mask  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 64
IMPLEMENTATIONS = ("xla", "blockwise")


def inputs(seq: int):
    """q [1, S, N, D], k, v [1, S, K, D], a cotangent w like q, and the causal mask of S tokens."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, seq, NUM_HEADS, HEAD_DIM), jnp.float32)
    k = jax.random.normal(keys[1], (1, seq, NUM_KV_HEADS, HEAD_DIM), jnp.float32)
    v = jax.random.normal(keys[2], (1, seq, NUM_KV_HEADS, HEAD_DIM), jnp.float32)
    w = jax.random.normal(keys[3], q.shape, jnp.float32)
    positions = jnp.arange(seq, dtype=jnp.int32)[None, :]
    return q, k, v, w, causal_mask(positions, positions)


def compiled(name: str, block: int, q, k, v, w, mask):
    """(forward, gradient) of attention by implementation `name`, jitted and compiled."""
    implementation = Implementation(name, block, block)

    def forward(q, k, v, mask):
        return attend(q, k, v, mask, implementation=implementation)

    def gradient(q, k, v, w, mask):
        return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v, mask) * w), argnums=(0, 1, 2))(q, k, v)

    return (
        jax.jit(forward).lower(q, k, v, mask).compile(),
        jax.jit(gradient).lower(q, k, v, w, mask).compile(),
    )


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def measure(seq: int, repeats: int, block: int) -> dict:
    q, k, v, w, mask = inputs(seq)
    programs = {name: compiled(name, block, q, k, v, w, mask) for name in IMPLEMENTATIONS}
    result = {name: {"forward": [], "grad": []} for name in IMPLEMENTATIONS}
    grads = {}
    for name, (forward, gradient) in programs.items():  # warm-up
        jax.block_until_ready(forward(q, k, v, mask))
        grads[name] = jax.block_until_ready(gradient(q, k, v, w, mask))
    for _ in range(repeats):
        for name, (forward, gradient) in programs.items():
            result[name]["grad"].append(timed(gradient, q, k, v, w, mask))
            result[name]["forward"].append(timed(forward, q, k, v, mask))
    for name, (_, gradient) in programs.items():
        result[name] = {
            "forward_s": statistics.median(result[name]["forward"]),
            "grad_s": statistics.median(result[name]["grad"]),
            "temp_bytes": gradient.memory_analysis().temp_size_in_bytes,
        }
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads["xla"], grads["blockwise"]))
    return {"seq": seq, "diff": diff, **result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=512, help="query and key block of blockwise")
    args = parser.parse_args(argv)
    print(machine_line())
    print(
        f"jax {jax.__version__}, {jax.default_backend()}; B=1, N={NUM_HEADS}, K={NUM_KV_HEADS}, D={HEAD_DIM}, "
        f"float32, causal; blockwise blocks {args.block} x {args.block}; {args.repeats} repeats, medians"
    )
    start = cpu_times()
    rows = []
    for seq in args.lengths:
        rows.append(measure(seq, args.repeats, args.block))
        print(f"  S={seq} done", flush=True)
    print()
    print("| S | implementation | fwd+bwd ms | forward ms | temp MiB | temp / (S*S*4) | fwd+bwd vs xla | temp vs xla |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        dense = row["xla"]
        for name in IMPLEMENTATIONS:
            r = row[name]
            print(
                f"| {row['seq']:,} | {name} | {1e3 * r['grad_s']:,.1f} | {1e3 * r['forward_s']:,.1f} "
                f"| {r['temp_bytes'] / 2**20:,.1f} | {r['temp_bytes'] / (row['seq'] ** 2 * 4):.2f} "
                f"| {r['grad_s'] / dense['grad_s']:.2f}x | {r['temp_bytes'] / max(dense['temp_bytes'], 1):.3f}x |"
            )
    print()
    for row in rows:
        print(f"S={row['seq']:,}: max abs difference of the gradients, blockwise vs xla: {row['diff']:.2e}")
    print(busy_report(start))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
