"""Self-speculative decoding (melt_jax/inference/speculative.py) against plain greedy decoding, CPU.

For each model, greedy generation at batch 1 with `generate` (all loops every step) and with
`generate_speculative` for draft loops d = 1, 2 and blocks k = 2, 4, 8. Reported per setting: the
acceptance rate (drafted tokens kept / drafted), new tokens per round (accepted drafts + the
verifier's token), loops computed per new token (plain: T; speculative: (k d + T) per round), decode
tokens/s (GenerationTiming: the new tokens after the first over the decode loop's seconds) and its ratio
to plain decoding measured in the same run, and the share of tokens equal to plain decoding's (Ouro:
all, by construction; MELT: the rounds' blocks are chunks, docs/melt.md 'Self-speculative decoding').
Each setting runs once to compile and warm up, then --repeats times (default 3); the decode speed is
the median (the tokens are the same every time).

Models:
  random          Ouro with random weights, H=256, L=4, T=4, V=1024 (benchmarks/ouro_speed.py's model),
                  and MELT from it with random gates (W_z, U_z ~ 0.1 N(0, 1), b_z = -1); 128 new tokens
                  after 32 random prompt tokens. Loops disagree: acceptance is low.
  pipeline        with --pipeline DIR, the output of `melt-train pipeline output_dir=DIR` (README): the
                  trained LoopLM teacher (DIR/looplm/model) and its MELT student (DIR/melt_phase2/model),
                  H=64, L=1, T=4, byte tokens; 48 new tokens after two solved examples of the synthetic
                  task and a third prompt (the models were trained on 64-token rows).

    python benchmarks/speculative.py [--pipeline runs/pipeline] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import jax
import numpy as np
from generate_speed import random_weights
from machine_load import busy_report, cpu_times, machine_line
from ouro_speed import HF_CONFIG as SMALL

from melt_jax.data import ByteTokenizer, SyntheticTaskConfig, generate_example
from melt_jax.inference import SamplingConfig, generate, generate_speculative, load_model
from melt_jax.model import MeltConfig, MeltModel, OuroModel, with_layer_layout

DRAFT_LOOPS = (1, 2)
BLOCKS = (2, 4, 8)


def random_models() -> dict:
    """name -> (model, params, prompt, max_new) of the random Ouro and MELT (layers unrolled)."""
    config, params, melt_params, _, _ = random_weights(SMALL)
    prompt = np.random.default_rng(0).integers(0, SMALL["vocab_size"], 32).tolist()
    ouro = with_layer_layout(OuroModel(config), params, scan_layers=False)
    melt = with_layer_layout(MeltModel(MeltConfig.from_ouro(config, chunk_size=32)), melt_params, scan_layers=False)
    return {"random Ouro": (*ouro, prompt, 128), "random MELT": (*melt, prompt, 128)}


def pipeline_models(folder: Path) -> dict:
    """name -> (model, params, prompt, max_new) of a pipeline run's teacher and student."""
    tokenizer, rng = ByteTokenizer(), np.random.default_rng(7)
    prompt = []
    for i in range(3):
        question, answer, _ = generate_example(rng, SyntheticTaskConfig())
        prompt += tokenizer.encode(question)
        if i < 2:  # solved examples, laid out as the training rows are
            prompt += tokenizer.encode(answer + "\n") + [tokenizer.eos_id]
    return {
        "pipeline teacher (Ouro)": (*load_model(folder / "looplm" / "model"), prompt, 48),
        "pipeline student (MELT)": (*load_model(folder / "melt_phase2" / "model"), prompt, 48),
    }


def median_tps(results) -> float:
    return statistics.median(result.timing.decode_tokens_per_s for result in results)


def measure(model, params, prompt: list[int], max_new: int, repeats: int) -> list[dict]:
    """One row per setting (plain first): the median decode speed of `repeats` runs after a warm-up."""
    sampling = SamplingConfig(max_new_tokens=max_new)
    plain = [generate(model, params, [prompt], sampling) for _ in range(repeats + 1)][1:]
    rows = [
        dict(
            setting="plain",
            acceptance=float("nan"),
            per_round=1.0,
            loops_per_token=float(model.config.num_loops),
            tps=median_tps(plain),
            same=1.0,
        )
    ]
    for d in DRAFT_LOOPS:
        for k in BLOCKS:
            runs = [
                generate_speculative(model, params, [prompt], sampling, draft_loops=d, block=k)
                for _ in range(repeats + 1)
            ][1:]
            result = runs[-1]
            new = len(result.tokens[0]) - 1  # the first new token comes from the prefill
            same = np.mean(np.array(result.tokens[0]) == np.array(plain[0].tokens[0]))
            rows.append(
                dict(
                    setting=f"d={d}, k={k}",
                    acceptance=result.stats.acceptance_rate,
                    per_round=new / result.stats.rounds,
                    loops_per_token=result.timing.decode_loops / new,
                    tps=median_tps(runs),
                    same=float(same),
                )
            )
    for row in rows:
        row["ratio"] = row["tps"] / rows[0]["tps"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", type=Path, default=None, help="output_dir of `melt-train pipeline`")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    args = parser.parse_args()
    times_at_start = cpu_times()
    print("## Self-speculative decoding against plain greedy decoding, CPU, batch 1\n")
    print(f"{machine_line()}; jax {jax.__version__}; float32; median of {args.repeats} timed runs per setting\n")
    models = random_models()
    if args.pipeline is not None:
        models.update(pipeline_models(args.pipeline))
    print(
        "| model | setting | acceptance | tokens / round | loops / token | decode tokens/s | vs plain | "
        "same tokens as plain |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (model, params, prompt, max_new) in models.items():
        for row in measure(model, params, prompt, max_new, args.repeats):
            acceptance = "" if np.isnan(row["acceptance"]) else f"{row['acceptance']:.2f}"
            print(
                f"| {name} | {row['setting']} | {acceptance} | {row['per_round']:.2f} | {row['loops_per_token']:.2f} | "
                f"{row['tps']:,.0f} | {row['ratio']:.2f}x | {100 * row['same']:.0f}% |",
                flush=True,
            )
    print(f"\n{busy_report(times_at_start)}")


if __name__ == "__main__":
    main()
