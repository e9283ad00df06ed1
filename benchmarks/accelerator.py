"""Greedy decoding of Ouro-1.4B and MELT-1.6B shapes on whatever device JAX has (CPU, GPU, TPU): ms per
decode step, tok/s, time to first token, bytes read per step against the device's memory bandwidth,
peak device memory (the decode table of issue 24).

Models: `OuroConfig.preset("ouro-1.4b", scan_layers=False)` (layers unrolled, as `load_model` gives
them) and MELT-1.6B from it (`MeltConfig.from_ouro(ouro, chunk_size=--chunk)`), bf16, random weights
made on the device by a jitted init (`melt_jax.model.init_params`: nothing is built on the host).
Attention is `--attention` (config.attention), "auto" by default: the device's kernels for the
prompt's chunks (the Pallas kernel on GPU, splash or blockwise on TPU), dense for decoding; with
"xla" (the library's default) Ouro's batch-16 prefill at 4K does not fit an H200.
`--small` (the default on CPU) shrinks them to H=128, L=2, T=4, 2 heads of 64, I=344, V=512 and the
workloads below to prompt 32 + 16 new (short) and 240 + 16 new (the "4k" cases).

Cases (name model-bBATCH[-4k]): Ouro and MELT at batch 1, 8, 64 with a 64-token prompt and 256 new
tokens, and at batch 4, 16 with a 4,000-token prompt and 64 new tokens; MELT also at 4x each Ouro
batch (b4, b32, b256; b16-4k, b64-4k), where its cache (one slot array per layer) is as large as
Ouro's (T*L slot arrays). `--cases ouro-b1,melt-b16-4k` runs some of them.

Each case: `generate` (melt_jax.inference, greedy, no stop tokens, exact buckets) once to compile and
warm up, then --repeats timed runs (medians reported). `GenerationTiming.prefill_s` is the time to
first token (the prefill + first-token program, timed on its own with block_until_ready);
`decode_s` the decode loop, over `decode_steps` = new - 1 steps.
    ms/step      = 1000 * decode_s / decode_steps
    tok/s        = batch * decode_steps / decode_s
    bytes/step   = T * (every weight but the embedding and the head: the layer stack, the final norm,
                   the exit gate)  +  head (lm_head)  +  batch * H * itemsize (the embedding rows)
                   + batch * kv_bytes_per_token * (P + (steps + 1) / 2)
                 where kv_bytes_per_token = slots * 2 * K * D * itemsize (slots = T*L for Ouro, L for
                 MELT) and P + (steps + 1) / 2 is the mean number of cache positions step i = 1..steps
                 attends to (P + i: the prompt, the tokens before it and its own).
    bandwidth    = bytes/step / (ms/step / 1000) / --bandwidth (bytes/s); the default comes from the
                 device kind (H200 4.8e12, H100 SXM 3.35e12, TPU v5p 2.76e12, v6e 1.64e12,
                 v5e 8.19e11); None on CPU unless given.
    peak         `device.memory_stats()["peak_bytes_in_use"]` after the case: the process's peak so
                 far (cases run in the order listed, smallest first; None where the backend has none).
A case that fails (e.g. out of memory) is a row with its error. Each row is appended to --out as one
JSON line as soon as its case ends; a markdown table is printed at the end.

    python benchmarks/accelerator.py [--small | --full] [--cases ...] [--repeats 3] [--out FILE]
        [--bandwidth BYTES_PER_S] [--chunk 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.inference import SamplingConfig, generate
from melt_jax.model import MeltConfig, OuroConfig, init_params, model_for
from melt_jax.model.attention import IMPLEMENTATIONS, describe_attention

SMALL = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
)
# (substring of jax's device_kind, bytes/s of HBM), first match wins: "TPU v5 lite" is v5e, "TPU v5" v5p.
BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100", 3.35e12),
    ("v6 lite", 1.64e12),
    ("v6e", 1.64e12),
    ("v5 lite", 8.19e11),
    ("v5e", 8.19e11),
    ("v5p", 2.76e12),
    ("TPU v5", 2.76e12),
)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # "ouro" | "melt"
    batch: int
    prompt: int
    new: int
    long: bool

    @property
    def name(self) -> str:
        return f"{self.model}-b{self.batch}" + ("-4k" if self.long else "")


def all_cases(small: bool) -> list[Case]:
    short, long = ((32, 16), (240, 16)) if small else ((64, 256), (4000, 64))
    cases = []
    for batches, (prompt, new), is_long in (((1, 8, 64), short, False), ((4, 16), long, True)):
        for batch in batches:
            cases.append(Case("ouro", batch, prompt, new, is_long))
            cases.append(Case("melt", batch, prompt, new, is_long))
        for batch in batches:  # MELT at the batch whose cache equals Ouro's (T = 4)
            if 4 * batch not in batches:
                cases.append(Case("melt", 4 * batch, prompt, new, is_long))
    return sorted(cases, key=lambda c: (c.long, c.batch, c.model))


def configs(small: bool, chunk: int, attention: str = "auto") -> dict:
    ouro = OuroConfig.preset("ouro-1.4b", scan_layers=False, attention=attention, **(SMALL if small else {}))
    return {"ouro": ouro, "melt": MeltConfig.from_ouro(ouro, chunk_size=chunk)}


def weight_bytes(params) -> tuple[int, int, int]:
    """(bytes read once per loop, the head's bytes, the embedding table's bytes) of a param tree."""
    per_loop = head = embed = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        top = str(getattr(path[0], "key", path[0]))
        if top == "lm_head":
            head += size
        elif top == "embedder":
            embed += size
        else:
            per_loop += size
    return per_loop, head, embed


def bytes_per_step(config: OuroConfig, params, case: Case) -> int:
    """Bytes one decode step reads, from the shapes (the module docstring's formula)."""
    per_loop, head, _ = weight_bytes(params)
    itemsize = jnp.dtype(config.jnp_dtype).itemsize
    steps = case.new - 1
    weights = config.total_ut_steps * per_loop + head + case.batch * config.hidden_size * itemsize
    cache = case.batch * config.kv_bytes_per_token() * (case.prompt + (steps + 1) / 2)
    return int(weights + cache)


def default_bandwidth(device) -> float | None:
    kind = device.device_kind
    return next((value for key, value in BANDWIDTH if key.lower() in kind.lower()), None)


def peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats raise or return None
        return None
    return (stats or {}).get("peak_bytes_in_use")


def time_case(model, params, case: Case, repeats: int) -> dict:
    """Medians over `repeats` timed runs after one warm-up run."""
    prompts = np.random.default_rng(case.batch).integers(0, model.config.vocab_size, (case.batch, case.prompt))
    sampling = SamplingConfig(max_new_tokens=case.new)
    options = dict(buckets=None, batch_buckets=None)

    def run():
        return generate(model, params, prompts.tolist(), sampling, **options).timing

    warm = run()
    timings = [run() for _ in range(repeats)]
    decode_s = statistics.median(t.decode_s for t in timings)
    steps = timings[0].decode_steps
    return dict(
        compile_s=warm.compile_s,
        decode_steps=steps,
        ms_per_step=1000 * decode_s / steps,
        tok_per_s=case.batch * steps / decode_s,
        ttft_ms=1000 * statistics.median(t.prefill_s for t in timings),
    )


def measure(name_model: dict, case: Case, args, device) -> dict:
    model, params = name_model[case.model]
    row = dict(case=case.name, **dataclasses.asdict(case), device=device.device_kind)
    row["bytes_per_step"] = bytes_per_step(model.config, params, case)
    row["kv_cache_bytes"] = model.config.kv_cache_bytes(case.batch, case.prompt + case.new)
    start = time.perf_counter()
    try:
        row.update(time_case(model, params, case, args.repeats), error=None)
        seconds = row["ms_per_step"] / 1000
        row["bandwidth_fraction"] = row["bytes_per_step"] / seconds / args.bandwidth if args.bandwidth else None
    except Exception as e:  # out of memory and other failures are rows, not crashes
        row.update(error=f"{type(e).__name__}: {str(e)[:500]}")
    row["wall_s"] = time.perf_counter() - start
    row["peak_bytes"] = peak_bytes(device)
    return row


def report(row: dict, out: str | None) -> dict:
    """Prints a case's row as one JSON line and, with `out`, appends it to that file as soon as the case
    ends (a run cut short keeps the cases it finished). Returns the row."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| case | batch | prompt + new | ms / step | tok/s | TTFT ms | MB read / step | of bandwidth | peak GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['batch']} | {r['prompt']} + {r['new']} | {r['error'][:120]} | | | | | |")
            continue
        frac = r.get("bandwidth_fraction")
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 1e9:.2f}"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['prompt']} + {r['new']} | {r['ms_per_step']:.2f} | "
            f"{r['tok_per_s']:,.1f} | {r['ttft_ms']:.1f} | {r['bytes_per_step'] / 1e6:,.1f} | "
            f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {peak} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", default=None, help="tiny shapes (default on CPU)")
    size.add_argument("--full", dest="small", action="store_false", help="the real shapes (default off CPU)")
    parser.add_argument("--cases", help="comma-separated case names, e.g. ouro-b1,melt-b16-4k (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="append one JSON line per case to this file")
    parser.add_argument("--bandwidth", type=float, help="device memory bandwidth, bytes/s")
    parser.add_argument("--chunk", type=int, default=512, help="MELT's chunk_size (prefill chunk)")
    parser.add_argument(
        "--attention", choices=IMPLEMENTATIONS, default="auto", help="config.attention (auto: the device's kernels)"
    )
    return parser.parse_args(argv)


def select(cases: list[Case], names: str | None) -> list[Case]:
    if not names:
        return cases
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c.name for c in cases}
    if unknown := [n for n in wanted if n not in known]:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(c.name for c in cases)}")
    return [c for c in cases if c.name in wanted]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = jax.devices()[0]
    if args.small is None:
        args.small = device.platform == "cpu"
    args.bandwidth = args.bandwidth or default_bandwidth(device)
    cases = select(all_cases(args.small), args.cases)
    chunk = min(args.chunk, 32) if args.small else args.chunk
    print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, bandwidth {args.bandwidth}")
    print(f"{'small' if args.small else 'full'} shapes, MELT chunk {chunk}, repeats {args.repeats}")
    print(f"attention: {describe_attention(args.attention, device.platform)}", flush=True)
    loaded = {}
    rows = []
    for case in cases:
        if case.model not in loaded:
            model = model_for(configs(args.small, chunk, args.attention)[case.model])
            loaded[case.model] = (model, init_params(model, jax.random.key(0)))
        rows.append(report(measure(loaded, case, args, device), args.out))
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
