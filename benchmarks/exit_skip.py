"""Early exit that skips loops: loops computed, accuracy and decode speed at exit thresholds, CPU.

For each model and each policy (all loops with the last loop's output; `threshold:X` with its loops
skipped, X in --thresholds):

- loops per token: the mean of (exit loop + 1) over the tokens of held-out task texts fed one token per
  step through the KV cache (Ouro) or in chunks of the config's chunk_size (MELT, the regime it was
  trained in), i.e. what a token needs; loops per step: what the steps computed (the largest exit in
  the step's batch of 64 rows, or chunk);
- accuracy: teacher-forced exact match of the answer tokens of those texts (`prompt answer\\n` of the
  pipeline's task), each answer predicted from a cache built under the same policy;
- decode tokens/s at batch 1 (greedy, 64 new tokens after a 32-token prompt of task text), and its
  ratio to all loops. One run, medians of --repeats; the machine's load is printed.

Models: the pipeline's teacher (Ouro) and student (MELT) when --pipeline DIR holds a finished
`melt-train pipeline` run (DIR/looplm/model, DIR/melt_phase2/model), and a random Ouro (H=256, L=4,
T=4) whose exit gates are untrained (every loop's exit probability ~ 1/2).

    python benchmarks/exit_skip.py [--pipeline runs/pipeline] [--thresholds 0.5,0.7,0.9] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from machine_load import busy_report, cpu_times, machine_line

from melt_jax.data import SyntheticTaskConfig, answer_batch, load_tokenizer, synthetic_reasoning_dataset
from melt_jax.inference import SamplingConfig, generate, load_model
from melt_jax.model import ExitPolicy, OuroConfig, init_params, model_for, scan_chunks, with_layer_layout

NUM_EXAMPLES = 64
SEQ_LEN = 16  # one task text ("3+4=7\n" and the like) per row
NEW_TOKENS = 64


@functools.partial(jax.jit, static_argnames=("model", "policy", "chunk_size"))
def teacher_forced(model, params, tokens, policy: ExitPolicy, chunk_size: int):
    """tokens [B, S] run through a cache chunk after chunk under `policy`: (predicted ids [B, S], exit
    loops [B, S], loops computed per chunk [n])."""
    batch, seq = tokens.shape

    def run_chunk(cache, chunk, start):
        out = model.apply({"params": params}, chunk, cache=cache, exit_policy=policy)
        exits = out.exit_loops if out.exit_loops is not None else jnp.full(chunk.shape, model.config.num_loops - 1)
        return out.cache, (jnp.argmax(out.logits, axis=-1), exits, out.loops_computed[None])

    token_axes = (1, 1, 0)
    _, (predicted, exits, loops) = scan_chunks(run_chunk, model.init_cache(batch, seq), tokens, chunk_size, token_axes)
    return predicted, exits, loops


def task_rows(tokenizer) -> dict[str, np.ndarray]:
    data = synthetic_reasoning_dataset(SyntheticTaskConfig(num_examples=NUM_EXAMPLES, seed=12345))
    return answer_batch(tokenizer, data["prompt"], [a + "\n" for a in data["answer"]], SEQ_LEN)


def measure(model, params, rows, prompt, policy: ExitPolicy, repeats: int) -> dict:
    chunk = getattr(model.config, "chunk_size", 1)  # MELT's own chunk; Ouro token by token
    tokens = jnp.asarray(rows["tokens"])
    predicted, exits, loops = jax.device_get(teacher_forced(model, params, tokens, policy, chunk))
    mask = rows["answer_mask"][:, 1:] > 0
    correct = np.where(mask, predicted[:, :-1] == rows["tokens"][:, 1:], True).all(axis=1)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    generate(model, params, [prompt], sampling, exit_policy=policy)  # compile
    runs = [generate(model, params, [prompt], sampling, exit_policy=policy).timing for _ in range(repeats)]
    return dict(
        loops_per_token=float(np.mean(exits + 1)),
        loops_per_step=float(np.mean(loops)),
        accuracy=float(correct.mean()),
        tokens_per_s=statistics.median(t.decode_tokens_per_s for t in runs),
        decode_loops_per_step=statistics.median(t.loops_per_step for t in runs),
    )


def models(pipeline: Path | None) -> dict:
    out = {}
    if pipeline is not None:
        out["teacher (Ouro)"] = load_model(pipeline / "looplm" / "model")
        out["student (MELT)"] = load_model(pipeline / "melt_phase2" / "model")
    config = OuroConfig(
        vocab_size=259, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        total_ut_steps=4,
    )  # fmt: skip
    random = model_for(config)
    out["random Ouro"] = with_layer_layout(random, init_params(random, jax.random.key(0)), scan_layers=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, help="a finished `melt-train pipeline` output_dir")
    parser.add_argument("--thresholds", default="0.5,0.7,0.9")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = cpu_times()
    tokenizer = load_tokenizer("byte")
    rows = task_rows(tokenizer)
    prompt = [int(t) for t in rows["tokens"][:4].reshape(-1) if t != tokenizer.pad_id][:32]
    policies = {"all loops (last)": ExitPolicy.last()}
    for x in args.thresholds.split(","):
        policies[f"threshold:{x}, skipping"] = ExitPolicy.at_threshold(float(x), skip_loops=True)
    print("## Early exit that skips loops (CPU)\n")
    print(f"{machine_line()}; jax {jax.__version__}; {NUM_EXAMPLES} task texts; decode batch 1, {NEW_TOKENS} tokens\n")
    print(
        "| model | policy | loops per token | loops per step (64 rows) | answer accuracy | "
        "decode loops per step (batch 1) | decode tokens/s | vs all loops |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (model, params) in models(args.pipeline).items():
        base = None
        for label, policy in policies.items():
            m = measure(model, params, rows, prompt, policy, args.repeats)
            base = base or m["tokens_per_s"]
            print(
                f"| {name} | {label} | {m['loops_per_token']:.2f} | {m['loops_per_step']:.2f} | {m['accuracy']:.3f} | "
                f"{m['decode_loops_per_step']:.2f} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / base:.2f}x |",
                flush=True,
            )
    print(f"\n{busy_report(times)}")


if __name__ == "__main__":
    main()
