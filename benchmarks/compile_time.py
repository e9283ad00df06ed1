"""Compile time of the Ouro forward and decode step against the number of loops T and of layers L.

Ouro scans over its layers (stacked parameters) and over its loops, so the compiled program should
not grow with L or T. This script measures, on abstract inputs (nothing is allocated or run):

  forward      melt_jax.inference.decoding.forward on tokens [1, 128] (exit policy: last loop)
  decode step  melt_jax.inference.decoding.decode_step on token [1] with a cache of 256 positions

for T = 1, 2, 4, 8 at L = 4 and for L = 1, 4, 16 at T = 4 (H=256, 4 heads of 64, I=688, V=1024,
float32). Each measurement is fresh: jax.clear_caches(), a new jax.jit of the function, then the
wall time of .lower(...) (trace + lower to StableHLO) and of .compile() (XLA), and the CPU time of
.compile() (less sensitive to other work on the machine); the median of
--repeats such measurements (taken round-robin over the configs, in shuffled order) is printed, with
the ratio to T=1 (resp. L=1), and the number of lines of the optimised HLO (a noise-free measure of
the program's size). Target: T=8 compiles within 1.3x of T=1. XLA flags are left at their defaults
(the tests set --xla_backend_optimization_level=0, which this script must not inherit; it refuses to
run with it).

    python benchmarks/compile_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time

import jax
import jax.numpy as jnp
from machine_load import busy_report, cpu_times, machine_line  # noqa: E402

from melt_jax.inference import decode_step, forward
from melt_jax.model import ExitPolicy, OuroConfig, OuroModel, abstract_params, init_cache

BASE = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=688,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=10_000.0,
    torch_dtype="float32",
    dtype="float32",
    param_dtype="float32",
)
FORWARD_LEN = 128
CACHE_LEN = 256
BATCH = 1
POLICY = ExitPolicy.last()
TARGET = 1.3
LOOPS = (1, 2, 4, 8)  # at L = 4
LAYERS = (1, 4, 16)  # at T = 4


def compile_seconds(kind: str, config: OuroConfig) -> tuple[float, float, float, int]:
    """(wall seconds of .lower(), wall seconds of .compile(), CPU seconds of .compile() (all threads of
    this process), lines of the optimised HLO) of a fresh jit of the forward or of the decode step."""
    jax.clear_caches()
    gc.collect()
    model = OuroModel(config)
    params = abstract_params(model)
    if kind == "forward":
        fn = jax.jit(forward.__wrapped__, static_argnames=("model", "exit_policy", "return_loop_logits"))
        args = (model, params, jax.ShapeDtypeStruct((BATCH, FORWARD_LEN), jnp.int32))
        kwargs = dict(exit_policy=POLICY)
    else:
        fn = jax.jit(decode_step.__wrapped__, static_argnames=("model", "exit_policy"), donate_argnames=("cache",))
        cache = jax.eval_shape(lambda: init_cache(config, BATCH, CACHE_LEN))
        args = (model, params, jax.ShapeDtypeStruct((BATCH,), jnp.int32), cache)
        kwargs = dict(exit_policy=POLICY)
    start = time.perf_counter()
    lowered = fn.lower(*args, **kwargs)
    lowered_at = time.perf_counter()
    cpu_start = time.process_time()
    compiled = lowered.compile()
    done = time.perf_counter()
    cpu = time.process_time() - cpu_start
    return lowered_at - start, done - lowered_at, cpu, compiled.as_text().count("\n")


def measure(configs: dict, repeats: int) -> dict:
    """key -> kind -> (median lower s, median compile s, median compile CPU s, HLO lines). Round-robin:
    each repeat compiles every config once, in a shuffled order, so that background load hits all alike."""
    samples = {key: {"forward": [], "decode": []} for key in configs}
    order = [(key, kind) for key in configs for kind in ("forward", "decode")]
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for key, kind in order:
            samples[key][kind].append(compile_seconds(kind, configs[key]))
    return {
        key: {
            kind: (*(statistics.median(s[i] for s in runs) for i in range(3)), runs[0][3])
            for kind, runs in by_kind.items()
        }
        for key, by_kind in samples.items()
    }


def print_table(title: str, name: str, values, results, base) -> None:
    print(f"### {title}\n")
    print(
        f"| {name} | lower s | compile s | compile / {name}={base} | compile CPU s | CPU / {name}={base} | "
        f"lower + compile / {name}={base} | optimised HLO lines |"
    )
    print("|---:|" + "---:|" * 7)
    lower0, comp0, cpu0, _ = results[base]
    for value in values:
        lower, comp, cpu, lines = results[value]
        print(
            f"| {value} | {lower:.3f} | {comp:.3f} | {comp / comp0:.2f}x | {cpu:.3f} | {cpu / cpu0:.2f}x | "
            f"{(lower + comp) / (lower0 + comp0):.2f}x | {lines:,} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh compiles per measurement (median)")
    args = parser.parse_args()

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags:
        raise SystemExit(f"XLA_FLAGS sets the backend optimisation level ({flags!r}); unset it to measure defaults")
    times_at_start = cpu_times()
    print("## Compile time of the Ouro forward and decode step\n")
    print(
        f"{machine_line()}; jax {jax.__version__} ({jax.default_backend()}); XLA_FLAGS={flags!r}; "
        f"persistent compilation cache: {jax.config.jax_compilation_cache_dir!r}"
    )
    print(
        f"config: hidden_size={BASE['hidden_size']}, num_attention_heads={BASE['num_attention_heads']}, "
        f"num_key_value_heads={BASE['num_key_value_heads']}, head_dim={BASE['head_dim']}, "
        f"intermediate_size={BASE['intermediate_size']}, vocab_size={BASE['vocab_size']}, float32; "
        f"forward on [{BATCH}, {FORWARD_LEN}] tokens, decode step on [{BATCH}] with a {CACHE_LEN}-position cache, "
        f"exit policy last loop; medians of {args.repeats} fresh compiles; 'total' = lower + compile\n"
    )

    configs = {
        (loops, layers): OuroConfig(**BASE, num_hidden_layers=layers, total_ut_steps=loops)
        for loops, layers in [(t, 4) for t in LOOPS] + [(4, l) for l in LAYERS if l != 4]
    }
    results = measure(configs, args.repeats)

    for kind, label in (
        ("forward", f"forward, tokens [{BATCH}, {FORWARD_LEN}]"),
        ("decode", f"decode step, cache of {CACHE_LEN}"),
    ):
        print_table(
            f"{label}, against the number of loops T (L = 4)",
            "T",
            LOOPS,
            {t: results[t, 4][kind] for t in LOOPS},
            base=1,
        )
        print_table(
            f"{label}, against the number of layers L (T = 4)",
            "L",
            LAYERS,
            {l: results[4, l][kind] for l in LAYERS},
            base=1,
        )

    for kind in ("forward", "decode"):
        ratio = results[8, 4][kind][1] / results[1, 4][kind][1]
        cpu = results[8, 4][kind][2] / results[1, 4][kind][2]
        total = sum(results[8, 4][kind][:2]) / sum(results[1, 4][kind][:2])
        verdict = "meets" if ratio <= TARGET else "misses"
        print(
            f"Target {kind}: T=8 compile within {TARGET}x of T=1: {ratio:.2f}x wall ({verdict} it); "
            f"{cpu:.2f}x CPU time; lower + compile {total:.2f}x wall."
        )
    print(f"\n{busy_report(times_at_start)}")


if __name__ == "__main__":
    main()
