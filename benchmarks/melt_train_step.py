"""Time of one training step (loss and gradient) of MELT's two-pass and sequential chunked forwards
against Ouro's plain step, on the same weights and tokens, as ratios from one run.

    python benchmarks/melt_train_step.py [--seq 1024] [--chunk 128] [--repeats 3]

Default size: H=256, L=4, T=4, 4 heads, S=1024, C=128, batch 1, float32. The loss is the mean
next-token cross-entropy of every loop's logits (the all-loop objective of distillation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from melt_jax.config import MeltConfig, OuroConfig
from melt_jax.losses import mean_next_token_loss
from melt_jax.melt import MeltModel, melt_from_ouro
from melt_jax.melt_training import sequential_forward, two_pass_forward
from melt_jax.ouro import OuroModel
from melt_jax.params import init_params


def all_loop_loss(model, params, hidden_steps, tokens):
    logits = model.apply({"params": params}, hidden_steps, method=type(model).logits)  # [T, B, S, V]
    return jnp.mean(jax.vmap(lambda lg: mean_next_token_loss(lg, tokens))(logits))


def timed(step, params, tokens, repeats):
    """(compile seconds, median step seconds) of a jitted value-and-grad step."""
    start = time.perf_counter()
    jax.block_until_ready(step(params, tokens))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, tokens))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ouro_config = OuroConfig.preset(
        "tiny", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, head_dim=64, vocab_size=1024, total_ut_steps=4, max_position_embeddings=4096,
    )
    ouro = OuroModel(ouro_config)
    ouro_params = jax.device_get(init_params(ouro, jax.random.key(0)))
    melt_config, melt_params = melt_from_ouro(ouro_config, ouro_params, chunk_size=args.chunk)
    melt = MeltModel(melt_config)
    tokens = jax.random.randint(jax.random.key(1), (1, args.seq), 0, ouro_config.vocab_size)

    def ouro_loss(params, tokens):
        out = ouro.apply({"params": params}, tokens, exit_policy=None)
        return all_loop_loss(ouro, params, out.hidden_steps, tokens)

    def melt_loss(forward_fn):
        def loss(params, tokens):
            out = forward_fn(melt, params, tokens, args.chunk)
            return all_loop_loss(melt, params, out.hidden_steps, tokens)

        return loss

    steps = {
        "Ouro (plain)": (ouro_loss, ouro_params),
        "MELT two-pass": (melt_loss(two_pass_forward), melt_params),
        "MELT sequential": (melt_loss(sequential_forward), melt_params),
    }
    results = {}
    for name, (loss, params) in steps.items():
        step = jax.jit(jax.value_and_grad(loss))
        results[name] = timed(step, jax.device_put(params), tokens, args.repeats)

    base = results["Ouro (plain)"][1]
    print(f"H=256, L=4, T=4, S={args.seq}, C={args.chunk}, batch 1, float32, {jax.devices()[0].platform}, "
          f"median of {args.repeats}\n")
    print("| step | compile (s) | step (s) | vs Ouro |")
    print("|---|---|---|---|")
    for name, (compile_s, step_s) in results.items():
        print(f"| {name} | {compile_s:.1f} | {step_s:.3f} | {step_s / base:.2f}x |")


if __name__ == "__main__":
    main()
