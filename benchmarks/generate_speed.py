"""Generation speed and memory: melt_jax's jitted sampler (Ouro and MELT) against the eager PyTorch
references (melt_jax.testing.torch_ouro.OuroReference, melt_jax.testing.torch_melt.MeltReference) on the same
weights, on CPU.

Model (--model): "small" H=256, L=4 layers, T=4 loops, 4 heads of 64 (MHA), I=688, V=1024; "wide" H=1024,
L=8, 16 heads of 64, I=2752 (weights 0.4 GB, read T times per token); float32; random Ouro weights
written to a temporary Hugging Face checkpoint (read by melt_jax with `load_hf_checkpoint`, given to
the references as a state dict), plus random MELT gates (W_z, U_z ~ 0.1 N(0, 1), b_z = -1) for MELT.

Workload: greedy generation of N_NEW = 128 tokens after a prompt of N_PROMPT = 32 random tokens, at
batch 1 and 8 (every row's prompt is 32 tokens). Both sides prefill the whole prompt as one chunk, then
decode one token at a time (MELT: chunk size 1), computing all T loops and choosing from the last.
  melt_jax   `generation.generate` (jit prefill, then one `lax.while_loop` over the decode steps, cache of
             32 + 128 slots) with the layers unrolled, as `load_model` gives them; compiled and warmed up
             first; the decode time is GenerationTiming.decode_s. The same with the scanned layer
             stack of training ("scanned layers") is timed beside it.
  PyTorch    a Python loop over the reference's cached forward (`OuroReference._run` with its list of
             T*L growing KV tensors; `MeltReference._run_chunk` with its per-layer cache), argmax on the
             last loop's logits, under torch.inference_mode with torch.set_num_threads(cores).
decode tokens/s = B * 127 / decode seconds (the first new token comes from the prefill). The sides run
alternately, repeat by repeat, medians reported; the generated tokens are compared (same computation).
A second table compares melt_jax's Ouro and MELT after a LONG_PROMPT = 1024-token prompt.

Memory: each (implementation, batch) runs again in a fresh process that loads the weights, generates
once to compile / warm up, resets the kernel's peak-RSS counter (/proc/self/clear_refs), and generates
again: "peak RSS" is that process's peak resident memory during the second generation and "added" the
peak minus the resident memory before it (cache, activations, workspace). The KV cache sizes are
computed from the shapes (OuroConfig.kv_cache_bytes).

    python benchmarks/generate_speed.py [--model small|wide] [--repeats 5] [--speed-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from machine_load import busy_report, cpu_times, machine_line, usable_cores
from ouro_speed import HF_CONFIG as SMALL  # (the same model as the Ouro speed benchmark)

from melt_jax.convert import load_hf_checkpoint
from melt_jax.inference import SamplingConfig, generate
from melt_jax.model import MeltConfig, MeltModel, OuroConfig, OuroModel, with_layer_layout
from melt_jax.testing.hf_checkpoints import random_ouro_state_dict, tiny_hf_config, with_gates, write_hf_checkpoint
from melt_jax.testing.torch_melt import MeltReference, random_melt_gates
from melt_jax.testing.torch_ouro import OuroReference

N_PROMPT = 32
N_NEW = 128
LONG_PROMPT = 1024  # melt_jax only: Ouro against MELT where the cache is larger
BATCHES = (1, 8)
# melt_jax decodes with the layers unrolled (the layout `load_model` gives); "-scanned" is the stack
# of training, timed for comparison only.
IMPLEMENTATIONS = ("jax-ouro", "jax-melt", "torch-ouro", "torch-melt")
SCANNED = ("jax-ouro-scanned", "jax-melt-scanned")
TARGET_RATIO = {"small": 3.0, "wide": 1.5}
SAMPLING = SamplingConfig(max_new_tokens=N_NEW)
# "wide": the width at which a scanned layer stack made decoding slower than eager PyTorch.
MODELS = {
    "small": SMALL,
    "wide": tiny_hf_config(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=64,
        total_ut_steps=4,
        max_position_embeddings=4096,
        rope_theta=10_000.0,
    ),
}
HF_CONFIG = SMALL  # the model measured; main() sets it from --model


def configs() -> dict:
    ouro = OuroConfig.from_hf_config(HF_CONFIG)
    return {"ouro": ouro, "melt": MeltConfig.from_ouro(ouro, chunk_size=N_PROMPT, gate_bias_init=-1.0)}


def prompts_for(batch: int, length: int = N_PROMPT) -> np.ndarray:
    return np.random.default_rng(batch).integers(0, HF_CONFIG["vocab_size"], (batch, length))


# --------------------------------------------------------------------------------------------------
# The four generators on the same weights: generate(prompts [B, P]) -> (decode seconds, tokens [B, N])


def random_weights(hf_config: dict) -> tuple:
    """(OuroConfig, Ouro params, MELT params, HF state dict, HF gates) of random Ouro weights (seed 0)
    read back through a temporary HF checkpoint, and random MELT gates (seed 1) added to them."""
    state_dict = random_ouro_state_dict(hf_config, seed=0)
    gates = random_melt_gates(hf_config, seed=1, scale=0.1, bias=-1.0)
    with tempfile.TemporaryDirectory() as folder:
        write_hf_checkpoint(folder, hf_config, state_dict)
        config, params = load_hf_checkpoint(folder, dtype="float32")
    return config, params, with_gates(params, hf_config, gates), state_dict, gates


def load_generators(names=IMPLEMENTATIONS) -> dict:
    config, params, melt_params, state_dict, gates = random_weights(HF_CONFIG)
    torch_state = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    melt_config = configs()["melt"]
    builders = {
        "jax-ouro": lambda: jax_generator(*with_layer_layout(OuroModel(config), params, scan_layers=False)),
        "jax-melt": lambda: jax_generator(*with_layer_layout(MeltModel(melt_config), melt_params, scan_layers=False)),
        "jax-ouro-scanned": lambda: jax_generator(OuroModel(config), params),
        "jax-melt-scanned": lambda: jax_generator(MeltModel(melt_config), melt_params),
        "torch-ouro": lambda: torch_ouro_generator(OuroReference(HF_CONFIG, torch_state, dtype=torch.float32)),
        "torch-melt": lambda: torch_melt_generator(MeltReference(HF_CONFIG, torch_state, gates, dtype=torch.float32)),
    }
    return {name: builders[name]() for name in names}


def jax_generator(model, params):
    params = jax.device_put(params)

    def run(prompts: np.ndarray):
        result = generate(model, params, prompts.tolist(), SAMPLING, chunk_size=prompts.shape[1])
        return result.timing.decode_s, np.array(result.tokens)

    return run


def torch_ouro_generator(ref: OuroReference):
    def run(prompts: np.ndarray):
        ids = torch.from_numpy(prompts)
        with torch.inference_mode():
            cache: list = [None] * (ref.T * ref.L)
            token = ref._run(ids, 0, cache)["step_logits"][-1][:, -1].argmax(-1)  # [B]
            tokens = [token]
            start = time.perf_counter()
            for position in range(N_PROMPT, N_PROMPT + N_NEW - 1):
                token = ref._run(token[:, None], position, cache)["step_logits"][-1][:, -1].argmax(-1)
                tokens.append(token)
            seconds = time.perf_counter() - start
        return seconds, torch.stack(tokens, dim=1).numpy()

    return run


def torch_melt_generator(ref: MeltReference):
    def run(prompts: np.ndarray):
        ids = torch.from_numpy(prompts)
        with torch.inference_mode():
            cache = ref.new_cache()
            token = ref._run_chunk(ids, cache, 1.0)["step_logits"][-1][:, -1].argmax(-1)  # [B]
            tokens = [token]
            start = time.perf_counter()
            for _ in range(N_NEW - 1):
                token = ref._run_chunk(token[:, None], cache, 1.0)["step_logits"][-1][:, -1].argmax(-1)
                tokens.append(token)
            seconds = time.perf_counter() - start
        return seconds, torch.stack(tokens, dim=1).numpy()

    return run


# --------------------------------------------------------------------------------------------------
# Throughput (all four in this process, round-robin) and memory (one fresh process each)


def bench_speed(generators: dict, repeats: int) -> dict:
    """(name, batch) -> {'tps': decode tokens/s (median), 'tokens': the generated tokens}."""
    results = {}
    for batch in BATCHES:
        prompts = prompts_for(batch)
        outputs = {name: run(prompts)[1] for name, run in generators.items()}  # compile + warm-up
        seconds = {name: [] for name in generators}
        for _ in range(repeats):
            for name, run in generators.items():
                seconds[name].append(run(prompts)[0])
        for name in generators:
            tps = batch * (N_NEW - 1) / statistics.median(seconds[name])
            results[name, batch] = {"tps": tps, "tokens": outputs[name]}
    return results


def bench_long_context(generators: dict, repeats: int) -> dict:
    """batch -> {name: decode tokens/s} of the melt_jax generators after LONG_PROMPT prompt tokens."""
    results = {}
    for batch in BATCHES:
        prompts = prompts_for(batch, LONG_PROMPT)
        for run in generators.values():
            run(prompts)  # compile + warm-up
        seconds = {name: [] for name in generators}
        for _ in range(repeats):
            for name, run in generators.items():
                seconds[name].append(run(prompts)[0])
        results[batch] = {name: batch * (N_NEW - 1) / statistics.median(s) for name, s in seconds.items()}
    return results


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_worker(name: str, batch: int) -> None:
    """Prints {'peak': bytes, 'added': bytes} of one generation after a warm-up (see the docstring)."""
    torch.set_num_threads(usable_cores())
    run = load_generators([name])[name]
    prompts = prompts_for(batch)
    run(prompts)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    run(prompts)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak": 1024 * peak, "added": 1024 * (peak - before)}))


def bench_memory(model: str) -> dict:
    results = {}
    for batch in BATCHES:
        for name in IMPLEMENTATIONS:
            done = subprocess.run(
                [sys.executable, __file__, "--model", model, "--memory-worker", name, str(batch)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[name, batch] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------------------------------


def print_long_context(long: dict) -> None:
    print(f"\nmelt_jax only, {N_NEW} new tokens after {LONG_PROMPT} (cache {LONG_PROMPT + N_NEW} positions):\n")
    print("| batch | Ouro tokens/s | MELT tokens/s | MELT / Ouro | Ouro KV cache | MELT KV cache |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, tps in long.items():
        sizes = [configs()[m].kv_cache_bytes(batch, LONG_PROMPT + N_NEW) / 2**20 for m in ("ouro", "melt")]
        print(
            f"| {batch} | {tps['jax-ouro']:,.0f} | {tps['jax-melt']:,.0f} | {tps['jax-melt'] / tps['jax-ouro']:.2f}x | "
            f"{sizes[0]:,.0f} MB | {sizes[1]:,.0f} MB |"
        )


def print_report(speed: dict, memory: dict, target: float) -> None:
    print(
        "| model | batch | melt_jax tokens/s | PyTorch eager tokens/s | melt_jax / eager | scanned layers tokens/s | "
        "melt_jax peak RSS (added) | eager peak RSS (added) | KV cache | same tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mb = lambda n: f"{n / 2**20:,.0f} MB"  # noqa: E731
    for batch in BATCHES:
        for model in ("ouro", "melt"):
            jx, pt = speed[f"jax-{model}", batch], speed[f"torch-{model}", batch]
            scanned = speed[f"jax-{model}-scanned", batch]
            unknown = {"peak": float("nan"), "added": float("nan")}
            jm, pm = memory.get((f"jax-{model}", batch), unknown), memory.get((f"torch-{model}", batch), unknown)
            cache = configs()[model].kv_cache_bytes(batch, N_PROMPT + N_NEW)
            same = float(np.mean((jx["tokens"] == pt["tokens"]) & (scanned["tokens"] == pt["tokens"])))
            print(
                f"| {'MELT' if model == 'melt' else 'Ouro'} | {batch} | {jx['tps']:,.0f} | {pt['tps']:,.0f} | "
                f"{jx['tps'] / pt['tps']:.2f}x | {scanned['tps']:,.1f} | {mb(jm['peak'])} ({mb(jm['added'])}) | "
                f"{mb(pm['peak'])} ({mb(pm['added'])}) | {cache / 2**20:.2f} MB | {100 * same:.0f}% |"
            )
    print()
    for batch in BATCHES:
        melt, ouro = speed["jax-melt", batch]["tps"], speed["jax-ouro", batch]["tps"]
        print(f"batch {batch}: melt_jax MELT / Ouro decode = {melt / ouro:.2f}x")
    ouro_ratio = speed["jax-ouro", 1]["tps"] / speed["torch-ouro", 1]["tps"]
    melt_ratio = speed["jax-melt", 1]["tps"] / speed["torch-melt", 1]["tps"]
    melt_vs_ouro = speed["jax-melt", 1]["tps"] / speed["jax-ouro", 1]["tps"]
    print(
        f"Targets at batch 1: MELT decode no slower than Ouro ({melt_vs_ouro:.2f}x: "
        f"{'met' if melt_vs_ouro >= 1 else 'missed'}); >= {target:.1f}x the eager reference "
        f"(Ouro {ouro_ratio:.2f}x, MELT {melt_ratio:.2f}x: "
        f"{'met' if min(ouro_ratio, melt_ratio) >= target else 'missed'})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--model", choices=sorted(MODELS), default="small", help="small: H=256 L=4; wide: H=1024 L=8")
    parser.add_argument("--speed-only", action="store_true", help="skip the memory and long-prompt tables")
    parser.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global HF_CONFIG
    HF_CONFIG = MODELS[args.model]
    if args.memory_worker:
        memory_worker(args.memory_worker[0], int(args.memory_worker[1]))
        return

    times_at_start = cpu_times()
    torch.set_num_threads(usable_cores())
    print("## Generation: melt_jax sampler (jit) vs PyTorch reference (eager), CPU\n")
    print(f"{machine_line()}; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(
        f"model: H={HF_CONFIG['hidden_size']}, L={HF_CONFIG['num_hidden_layers']}, T={HF_CONFIG['total_ut_steps']}, "
        f"V={HF_CONFIG['vocab_size']}, float32; greedy, {N_NEW} new tokens after {N_PROMPT}; "
        f"{args.repeats} repeats, medians\n"
    )
    generators = load_generators((*IMPLEMENTATIONS, *SCANNED))
    speed = bench_speed(generators, args.repeats)
    if args.speed_only:
        print_report(speed, {}, TARGET_RATIO[args.model])
    else:
        long = bench_long_context({name: generators[name] for name in ("jax-ouro", "jax-melt")}, args.repeats)
        del generators
        memory = bench_memory(args.model)
        print_report(speed, memory, TARGET_RATIO[args.model])
        print_long_context(long)
    print(f"\n{busy_report(times_at_start)}")


if __name__ == "__main__":
    main()
