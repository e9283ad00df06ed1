"""How many sequences of a context length one chip can decode: Ouro against MELT, compiled, never run.

For each model, in the layer layout of inference (layers unrolled, as `load_model` gives them),
compiles the jit decode step (`melt_jax.inference.decoding.decode_step`, cache donated) on abstract
bf16 shapes for one chip of a TPU topology (libtpu's compiler: no TPU needed;
`pip install -e ".[tpu]"`) or one GPU (`--topology gpu:h200`: XLA's GPU compiler, no GPU needed;
`pip install -e ".[cuda]"`) at batch 1, 2, 4, ... until the compiler refuses it, then bisects to the
largest batch that fits. Prints per batch the weights, the KV cache, the step's temporaries (and
their share of the cache), the peak against the chip's memory, the program's kernels and while loops,
and the bytes its kernels write (`melt_jax.aot.kernel_writes`: intermediates written and read back,
on top of the weights and cache a step reads); then the sampler's first program
(`melt_jax.inference.decoding.start_generation`: an empty cache, the chunked prefill of
--prefill-batch prompts of the context length in chunks of --chunk tokens, keeping only the last
position's hidden state, and the first new token), with its temporaries against the cache it fills.
Attention is --attention (`config.attention`): "auto" by default, the chip's kernels for the
prefill's chunks (splash or blockwise on TPU, the Pallas kernel on GPU) and dense decoding.

    python benchmarks/decode_capacity.py [--topology v6e:1x1] [--context 32768] [--chunk 512]
        [--preset ouro-1.4b] [--max-batch 64] [--prefill-batch 1] [--attention auto]
        [--json FILE]

Without --topology ("local") it compiles for this machine's first device, whose memory is unknown on
CPU: the search then stops at --max-batch.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from melt_jax.aot import GIB, CompileReport, compile_and_measure, topology_devices
from melt_jax.inference import SamplingConfig, decode_step, start_generation
from melt_jax.model import ExitPolicy, MeltConfig, OuroConfig, abstract_params, model_for
from melt_jax.model.attention import IMPLEMENTATIONS, describe_attention


def models(preset: str, chunk: int, attention: str = "auto") -> dict:
    ouro = OuroConfig.preset(preset, scan_layers=False, attention=attention)
    return {"Ouro": model_for(ouro), "MELT": model_for(MeltConfig.from_ouro(ouro, chunk_size=chunk))}


def on_device(tree, device):
    sharding = NamedSharding(Mesh([device], ("one",)), PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def decode_report(model, device, batch: int, context: int) -> tuple[CompileReport, int, int]:
    """(report, weight bytes, cache bytes) of one decode step of `batch` rows over a `context` cache."""
    params = on_device(abstract_params(model), device)
    cache = on_device(jax.eval_shape(lambda: model.init_cache(batch, context)), device)
    token = on_device(jax.ShapeDtypeStruct((batch,), jnp.int32), device)
    report = compile_and_measure(lambda: traced_for(device, decode_step.lower, model, params, token, cache), [device])
    return report, nbytes(params), nbytes(cache)


def prefill_report(model, device, context: int, chunk: int, batch: int = 1) -> tuple[CompileReport, int]:
    """(report, cache bytes) of the prefill of `batch` prompts of `context` - 1 tokens into a cache of
    `context` slots, leaving room for one new token."""
    params = on_device(abstract_params(model), device)
    tokens = on_device(jax.ShapeDtypeStruct((batch, context - 1), jnp.int32), device)
    per_row = on_device(jax.ShapeDtypeStruct((batch,), jnp.int32), device)  # lengths, limits, seeds
    stop_ids = on_device(jax.ShapeDtypeStruct((8,), jnp.int32), device)
    static = dict(exit_policy=ExitPolicy(), rule=SamplingConfig().token_rule, chunk_size=chunk, max_new=1)
    report = compile_and_measure(
        lambda: traced_for(
            device, start_generation.lower, model, params, tokens, per_row, per_row, per_row, stop_ids, **static
        ),
        [device],
    )
    return report, nbytes(jax.eval_shape(lambda: model.init_cache(batch, context)))


def traced_for(device, lower, *args, **kwargs):
    """`lower(*args, **kwargs)` traced under a mesh of `device`, so that the model makes the choices of
    that device's platform (melt_jax.model.attention.target_platform)."""
    with jax.set_mesh(Mesh([device], ("one",))):
        return lower(*args, **kwargs)


def largest_batch(model, device, context: int, max_batch: int, log) -> tuple[int, list[dict]]:
    """The largest batch whose decode step fits (0: not even one), and a row per batch compiled."""
    rows = []

    def fits(batch: int) -> bool:
        report, weights, cache = decode_report(model, device, batch, context)
        row = dict(batch=batch, weights=weights, cache=cache, **report.as_dict())
        rows.append(row)
        log(row)
        return report.fits

    if not fits(1):
        return 0, rows
    good, batch = 1, 2
    while batch <= max_batch and fits(batch):
        good, batch = batch, batch * 2
    bad = batch if batch <= max_batch else None
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good, rows


def format_row(name: str, row: dict) -> str:
    gib = lambda b: "-" if b is None else f"{b / GIB:.2f}"  # noqa: E731
    share = "-" if row["temp"] is None else f"{100 * row['temp'] / row['cache']:.1f}%"
    return (
        f"| {name} | {row['batch']} | {gib(row['weights'])} | {gib(row['cache'])} | {gib(row['temp'])} | {share} | "
        f"{gib(row['peak'])} | {'yes' if row['fits'] else 'no'} | {row['kernels']} | {row['while_loops']} | "
        f"{gib(row['kernel_writes'])} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--topology",
        default="v6e:1x1",
        help='a TPU topology, a GPU ("gpu:h200", "gpu:h100"; the cuda extra), or "local"',
    )
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (and MELT's chunk_size)")
    parser.add_argument("--preset", default="ouro-1.4b")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--prefill-batch", type=int, default=1, help="prompts prefilled at once")
    parser.add_argument(
        "--attention", choices=IMPLEMENTATIONS, default="auto", help="config.attention (auto: the chip's kernels)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    device = topology_devices(None if args.topology == "local" else args.topology)[0]
    results = {}
    print(f"## Decode at context {args.context:,} on one {device.device_kind} ({args.preset}, bf16)\n")
    print(f"attention: {describe_attention(args.attention, device.platform)}\n")
    print(
        "| model | batch | weights GiB | KV cache GiB | temporaries GiB | temp / cache | peak GiB | fits "
        "| kernels | while loops | kernels write GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for name, model in models(args.preset, args.chunk, args.attention).items():
        best, rows = largest_batch(model, device, args.context, args.max_batch, log=lambda r, n=name: None)
        for row in sorted(rows, key=lambda r: r["batch"]):
            print(format_row(name, row), flush=True)
        prefill, cache = prefill_report(model, device, args.context, args.chunk, args.prefill_batch)
        results[name] = dict(largest_batch=best, decode=rows, prefill=dict(prefill.as_dict(), cache=cache))
    print()
    for name, result in results.items():
        prefill = result["prefill"]
        if prefill["fits"]:
            share = f"{100 * prefill['temp'] / prefill['cache']:.1f}%"
            where = (
                f"peak {prefill['peak'] / GIB:.2f} GiB, temporaries {prefill['temp'] / GIB:.2f} GiB ({share} of "
                f"its {prefill['cache'] / GIB:.2f} GiB cache)"
            )
        else:
            where = f"does not fit ({prefill['error']})"
        print(
            f"- {name}: largest decode batch {result['largest_batch']}; chunked prefill of {args.prefill_batch} "
            f"prompt(s) of {args.context - 1:,} tokens (chunks of {args.chunk}): {where}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), device=device.device_kind, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
