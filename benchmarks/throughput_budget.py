"""Decode throughput at a memory budget: the most sequences Ouro and MELT of the same size can decode
at a context length within a budget of bytes, and the tokens/s each gets at that batch. CPU.

For each model the decode step (`melt_jax.inference.decoding.decode_step`, layers unrolled as
`load_model` gives them, cache donated) is compiled at batch 1, 2, 4, ... and bisected to the largest
batch whose compiled footprint (arguments + outputs - aliased + temporaries: weights, KV cache of
--context positions, the step's temporaries) stays within --budget-mb; memory is read from XLA's
`memory_analysis`, never from a run. Then `generate` runs that batch: prompts of --context minus
--new-tokens random tokens, --new-tokens greedy tokens, so the decode steps read a cache that is
nearly full; decode tokens/s = all rows' decode tokens / decode seconds (median of --repeats, after a
compile run). Ouro and MELT alternate, repeat by repeat.

Model: H=256, L=4, T=4, 4 heads of 64 (MHA), I=688, V=1024, float32, random weights (MELT: random
gates) — a scaled-down Ouro whose cache per token is 32 KiB (MELT: 8 KiB). For a TPU chip's budget at
real size, `benchmarks/decode_capacity.py` finds the largest batch by compiling for the chip.

    python benchmarks/throughput_budget.py [--context 1024] [--budget-mb 256] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from machine_load import busy_report, cpu_times, machine_line

from melt_jax.aot import compile_and_measure
from melt_jax.inference import SamplingConfig, decode_step, generate
from melt_jax.model import MeltConfig, OuroConfig, abstract_params, init_params, model_for

MIB = 2**20
OURO = OuroConfig(
    vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    total_ut_steps=4, max_position_embeddings=65536, scan_layers=False,
)  # fmt: skip


def footprint(model, batch: int, context: int) -> int:
    """Bytes of the compiled decode step of `batch` rows over a `context`-slot cache."""
    cache = jax.eval_shape(lambda: model.init_cache(batch, context))
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    report = compile_and_measure(
        lambda: decode_step.lower(model, abstract_params(model), token, cache), jax.devices()[:1]
    )
    return report.peak


def largest_batch(model, context: int, budget: int, max_batch: int = 4096) -> tuple[int, int]:
    """(the largest batch whose decode step fits `budget` bytes, its footprint); (0, one row's) if none."""
    sizes = {}

    def fits(batch: int) -> bool:
        sizes[batch] = footprint(model, batch, context)
        return sizes[batch] <= budget

    if not fits(1):
        return 0, sizes[1]
    good, batch = 1, 2
    while batch <= max_batch and fits(batch):
        good, batch = batch, 2 * batch
    bad = batch
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good, sizes[good]


def random_params(model):
    params = init_params(model, jax.random.key(0))
    if model.config.model_type == "melt":
        for i in range(model.config.num_layers):
            gates = params[f"layers_{i}"]["kv_gate"]
            gates["w_z"] = 0.1 * jax.random.normal(jax.random.key(i + 1), gates["w_z"].shape)
            gates["b_z"] = jnp.full_like(gates["b_z"], -1.0)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="cache positions per sequence")
    parser.add_argument("--budget-mb", type=float, default=256.0, help="weights + cache + temporaries, MiB")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = cpu_times()
    budget = int(args.budget_mb * MIB)
    models = {"Ouro": model_for(OURO), "MELT": model_for(MeltConfig.from_ouro(OURO, chunk_size=64))}
    print("## Decode throughput at a memory budget (CPU)\n")
    print(f"{machine_line()}; jax {jax.__version__}")
    print(
        f"model H={OURO.hidden_size}, L={OURO.num_layers}, T={OURO.num_loops}, float32; context {args.context:,} "
        f"positions; budget {args.budget_mb:,.0f} MiB (weights + KV cache + step temporaries, compiled)\n"
    )
    batches, runs, sizes = {}, {}, {}
    for name, model in models.items():
        batches[name], sizes[name] = largest_batch(model, args.context, budget)
    prompt_length = args.context - args.new_tokens
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    work = {}
    for name, model in models.items():
        if not batches[name]:
            continue
        rng = np.random.default_rng(0)
        prompts = rng.integers(0, OURO.vocab_size, (batches[name], prompt_length)).tolist()
        params = random_params(model)
        exact = dict(buckets=None, batch_buckets=None)  # the cache is exactly the context
        generate(model, params, prompts, sampling, **exact)  # compile
        work[name] = (model, params, prompts, exact)
        runs[name] = []
    for _ in range(args.repeats):
        for name, (model, params, prompts, exact) in work.items():
            runs[name].append(generate(model, params, prompts, sampling, **exact).timing.decode_tokens_per_s)
    print("| model | KV cache per sequence | largest batch | compiled footprint | decode tokens/s (all rows) |")
    print("|---|---:|---:|---:|---:|")
    for name, model in models.items():
        tps = statistics.median(runs[name]) if name in runs else float("nan")
        cache = model.config.kv_cache_bytes(1, args.context)
        print(f"| {name} | {cache / MIB:,.1f} MiB | {batches[name]} | {sizes[name] / MIB:,.1f} MiB | {tps:,.0f} |")
    if all(name in runs for name in models):
        ouro, melt = (statistics.median(runs[n]) for n in ("Ouro", "MELT"))
        print(
            f"\nAt {args.context:,} tokens of context in {args.budget_mb:,.0f} MiB, MELT decodes {batches['MELT']} "
            f"sequences at {melt:,.0f} tokens/s against Ouro's {batches['Ouro']} at {ouro:,.0f} "
            f"({melt / ouro:.2f}x the throughput)."
        )
    print(f"\n{busy_report(times)}")


if __name__ == "__main__":
    main()
