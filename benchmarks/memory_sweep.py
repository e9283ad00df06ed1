"""Decode-step memory of Ouro-1.4B and MELT-1.6B against the number of loops T and the sequence length.

Compiles (never runs) the jit decode step on abstract bf16 shapes of the real configs, batch 1, and
reads XLA's memory_analysis() of the compiled step: the resident arguments (weights + KV cache, the
cache donated and updated in place), the KV cache alone, and the temporaries. Lengths are in units of
1,000 tokens, as in the MELT paper's table. Prints markdown tables and writes a PNG plot of the
resident memory (vs T, vs length).

On a CPU backend the temporaries include float32 copies of bf16 weights and cache slots, because XLA's
CPU dots upcast bf16; a float32 compile shows no copy of the cache (the update is in place). GPU and TPU
backends compute bf16 dots natively.

    python benchmarks/memory_sweep.py [--out benchmarks/memory_sweep.png] [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from melt_jax.inference import decode_step
from melt_jax.model import MeltConfig, MeltModel, OuroConfig, OuroModel, abstract_params

GB = 1e9
LENGTHS = [1000, 2000, 4000, 8000, 16000, 32000]
LOOPS = [1, 2, 4, 8]


def build(kind: str, loops: int):
    ouro = OuroConfig.preset("ouro-1.4b", total_ut_steps=loops)
    if kind == "ouro":
        return OuroModel(ouro)
    return MeltModel(MeltConfig.from_ouro(ouro))


def measure(kind: str, loops: int, length: int) -> dict:
    """Memory of one compiled decode step (batch 1, cache of `length` positions), in bytes."""
    model = build(kind, loops)
    params = abstract_params(model)
    cache = jax.eval_shape(lambda: model.init_cache(1, length))
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    start = time.perf_counter()
    compiled = decode_step.lower(model, params, token, cache).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv = cache.k.size * cache.k.dtype.itemsize + cache.v.size * cache.v.dtype.itemsize
    resident = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return dict(
        kind=kind,
        loops=loops,
        length=length,
        weights=weights,
        kv=kv,
        temp=mem.temp_size_in_bytes,
        total=resident,
        compile_s=seconds,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/memory_sweep.png")
    parser.add_argument("--quick", action="store_true", help="two lengths and two loop counts only")
    args = parser.parse_args()
    lengths = [1000, 32000] if args.quick else LENGTHS
    loops = [1, 4] if args.quick else LOOPS

    by_loops = [measure(kind, t, 32000) for kind in ("ouro", "melt") for t in loops]
    by_length = [measure(kind, 4, n) for kind in ("ouro", "melt") for n in lengths]

    print("Decode step, batch 1, bf16, 32K-token cache, against loops T (GB):\n")
    print("| model | T | KV cache | KV bytes/token | weights | resident total | CPU temporaries |")
    print("|---|---|---|---|---|---|---|")
    for r in by_loops:
        name = "Ouro-1.4B" if r["kind"] == "ouro" else "MELT-1.6B"
        print(
            f"| {name} | {r['loops']} | {r['kv'] / GB:.2f} | {r['kv'] // r['length']:,} | {r['weights'] / GB:.2f} "
            f"| {r['total'] / GB:.2f} | {r['temp'] / GB:.2f} |"
        )
    print("\nDecode step, batch 1, bf16, T = 4, against the cache length (GB):\n")
    print("| model | tokens | KV cache | weights | resident total | CPU temporaries |")
    print("|---|---|---|---|---|---|")
    for r in by_length:
        name = "Ouro-1.4B" if r["kind"] == "ouro" else "MELT-1.6B"
        print(
            f"| {name} | {r['length']:,} | {r['kv'] / GB:.2f} | {r['weights'] / GB:.2f} | {r['total'] / GB:.2f} "
            f"| {r['temp'] / GB:.2f} |"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, label in (("ouro", "Ouro-1.4B"), ("melt", "MELT-1.6B")):
        rows = [r for r in by_loops if r["kind"] == kind]
        ax1.plot([r["loops"] for r in rows], [r["total"] / GB for r in rows], marker="o", label=label)
        rows = [r for r in by_length if r["kind"] == kind]
        ax2.plot([r["length"] / 1000 for r in rows], [r["total"] / GB for r in rows], marker="o", label=label)
    ax1.set(xlabel="loops T", ylabel="weights + KV cache (GB)", title="32K-token cache, bf16, batch 1")
    ax2.set(xlabel="cache length (K tokens)", ylabel="weights + KV cache (GB)", title="T = 4, bf16, batch 1")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
